"""Each site's limits from the layers (mta.outbound.shaping): a static route is
the operator's own next hop, which the shipped default's caution is not for."""

from __future__ import annotations

import io
import json

from mta.cli.policy import show
from mta.config import parse
from mta.outbound.shaping import Shaping
from mta.policy.limits import Limits, site_for
from mta.policy.providers import DEFAULT_LIMITS
from mta.spool.store import Spool


def test_a_static_routes_site_has_no_shipped_default_but_what_is_configured() -> None:
    shaping = Shaping(parse({"policy": {"default": {"max_connections": 40}}}))
    by_mx = site_for("shop.example", ["mx.hoster.example"], shaping.suffixes, group_by_mx=True)
    smarthost = site_for("shop.example", ["relay.internal"], shaping.suffixes, static=True)
    assert shaping.limits(by_mx, "shop.example")[0] == Limits(
        40,
        DEFAULT_LIMITS.max_messages_per_connection,
        DEFAULT_LIMITS.max_rate,
        DEFAULT_LIMITS.max_recipients,
    )
    limits, origins = shaping.limits(smarthost, "shop.example")
    assert limits == Limits(max_connections=40)  # nothing else limits it
    assert origins["max_connections"] == "[policy.default]"


def test_a_static_route_to_a_providers_host_keeps_the_providers_limits() -> None:
    shaping = Shaping(parse({}))
    relay = site_for("shop.example", ["smtp-relay.google.com"], shaping.suffixes, static=True)
    limits, origins = shaping.limits(relay, "shop.example")
    assert relay.provider == "gmail" and set(origins.values()) == {"shipped gmail"}
    assert limits.max_connections is not None and limits.max_rate is not None


def test_policy_show_says_what_limits_a_static_route(spool: Spool) -> None:
    config = parse({"policy": {"default": {"max_connections": 40}}})
    out = io.StringIO()
    show(spool, config, True, out)
    limits = json.loads(out.getvalue())["limits"]
    assert limits["default"]["limits"]["max_rate"] == DEFAULT_LIMITS.max_rate
    assert limits["static_routes"]["limits"] == {
        "max_connections": 40,
        "max_messages_per_connection": None,
        "max_rate": None,
        "max_recipients": None,
    }
    text = io.StringIO()
    show(spool, config, False, text)
    assert "  static routes " in text.getvalue()
