"""Effective limits per (source, site): MX rollup into sites, precedence, throttled scaling."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.limits import Limits, Site, effective, site_for

PROVIDERS = {
    "gmail": [".google.com", ".googlemail.com"],
    "yahoo": [".yahoodns.net"],
    "outlook": [".olc.protection.outlook.com"],
    "office365": [".mail.protection.outlook.com"],
}


def test_domains_on_googles_mx_share_the_gmail_site() -> None:
    gmail = site_for(
        "gmail.com", ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"], PROVIDERS
    )
    hosted = site_for("example.org", ["aspmx.l.google.com.", "alt1.aspmx.l.google.com."], PROVIDERS)
    assert gmail == hosted == Site("gmail", "gmail")


def test_an_unrelated_domain_is_its_own_site() -> None:
    assert site_for("Example.NET.", ["mx1.example.net"], PROVIDERS) == Site("example.net", None)
    assert site_for("example.net", [], PROVIDERS) == Site("example.net", None)  # implicit MX
    assert site_for("example.net", ["mx.example.net"], {}) == Site("example.net", None)


def test_matching_ignores_case_and_trailing_dots() -> None:
    assert site_for("a.test", ["MTA5.AM0.YahooDNS.NET."], PROVIDERS).name == "yahoo"
    assert site_for("a.test", ["mx.yahoodns.net"], {"yahoo": [".YahooDNS.net."]}).name == "yahoo"


def test_only_the_first_preference_mx_decides() -> None:
    # A domain that only uses Google as a backup MX is not Google's.
    site = site_for("example.org", ["mx1.example.org", "aspmx.l.google.com"], PROVIDERS)
    assert site == Site("example.org", None)


def test_suffixes_match_whole_labels() -> None:
    providers = {"google": ["google.com"]}
    assert site_for("a.test", ["google.com"], providers).name == "google"
    assert site_for("a.test", ["aspmx.l.google.com"], providers).name == "google"
    assert site_for("a.test", ["mx.evilgoogle.com"], providers).name == "a.test"
    assert site_for("a.test", ["mx.evilgoogle.com"], {"gmail": [".google.com"]}).name == "a.test"


def test_the_longest_matching_suffix_wins() -> None:
    providers = {"microsoft": [".outlook.com"], "office365": [".mail.protection.outlook.com"]}
    mx = ["example-org.mail.protection.outlook.com"]
    assert site_for("example.org", mx, providers) == Site("office365", "office365")
    assert site_for("hotmail.com", ["hotmail-com.olc.protection.outlook.com"], providers).name == (
        "microsoft"
    )


def test_empty_suffixes_match_nothing() -> None:
    assert site_for("a.test", ["mx.a.test"], {"all": ["", "."]}) == Site("a.test", None)


def test_a_single_suffix_string_is_one_suffix() -> None:
    providers = {"gmail": ".google.com"}
    assert site_for("a.test", ["aspmx.l.google.com"], providers).name == "gmail"  # type: ignore[dict-item]


DEFAULT = Limits(
    max_connections=20, max_messages_per_connection=100, max_rate=50.0, max_recipients=100
)
BY_PROVIDER = {"gmail": Limits(max_connections=5, max_rate=10.0)}
BY_DOMAIN = {"example.org": Limits(max_rate=1.0), "gmail.com": Limits(max_recipients=50)}
GMAIL = Site("gmail", "gmail")


def test_domain_over_provider_over_default() -> None:
    assert effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "example.org") == Limits(
        max_connections=5, max_messages_per_connection=100, max_rate=1.0, max_recipients=100
    )
    assert effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "gmail.com") == Limits(
        max_connections=5, max_messages_per_connection=100, max_rate=10.0, max_recipients=50
    )
    assert effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "other.test") == Limits(
        max_connections=5, max_messages_per_connection=100, max_rate=10.0, max_recipients=100
    )


def test_a_site_without_provider_gets_domain_over_default() -> None:
    site = Site("example.net", None)
    by_domain = {"example.net": Limits(max_connections=2)}
    assert effective(DEFAULT, BY_PROVIDER, by_domain, site, "example.net") == Limits(
        max_connections=2, max_messages_per_connection=100, max_rate=50.0, max_recipients=100
    )
    assert effective(DEFAULT, BY_PROVIDER, {}, site, "example.net") == DEFAULT
    assert effective(DEFAULT, {}, {}, Site("yahoo", "yahoo"), "yahoo.com") == DEFAULT


def test_domain_lookup_tolerates_case_and_trailing_dot() -> None:
    assert effective(DEFAULT, {}, BY_DOMAIN, GMAIL, "Example.ORG.").max_rate == 1.0


def test_unset_everywhere_is_unlimited() -> None:
    assert effective(Limits(), {}, {}, GMAIL, "gmail.com") == Limits()


def test_merged_over_takes_each_field_separately() -> None:
    own = Limits(max_rate=2.0, max_recipients=10)
    base = Limits(max_connections=3, max_rate=9.0)
    assert own.merged_over(base) == Limits(max_connections=3, max_rate=2.0, max_recipients=10)
    assert Limits().merged_over(base) == base
    assert own.merged_over(Limits()) == own


def test_scaled_halves_connections_and_rate_only() -> None:
    assert DEFAULT.scaled(0.5) == Limits(
        max_connections=10, max_messages_per_connection=100, max_rate=25.0, max_recipients=100
    )
    assert DEFAULT.scaled(1) == DEFAULT


def test_scaled_keeps_at_least_one_connection_and_a_positive_rate() -> None:
    tiny = Limits(max_connections=3, max_rate=1e-300)
    scaled = tiny.scaled(1e-300)
    assert scaled.max_connections == 1
    assert scaled.max_rate is not None and scaled.max_rate > 0
    assert Limits(max_connections=3).scaled(0.5).max_connections == 1  # rounded down
    assert Limits(max_connections=1).scaled(0.1).max_connections == 1


def test_scaled_leaves_unlimited_unlimited() -> None:
    assert Limits().scaled(0.5) == Limits()


@pytest.mark.parametrize("factor", [0, -1, 1.5, math.nan, True])
def test_scaled_refuses_a_factor_outside_0_to_1(factor: float) -> None:
    with pytest.raises(ValueError, match="factor must be above 0 and at most 1"):
        DEFAULT.scaled(factor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_connections": 0}, "max_connections must be a whole number, 1 or more, got 0"),
        ({"max_messages_per_connection": -1}, "max_messages_per_connection must be"),
        ({"max_recipients": 2.5}, "max_recipients must be"),
        ({"max_connections": True}, "max_connections must be"),
        ({"max_rate": 0}, "max_rate must be a number of messages per second above 0, got 0"),
        ({"max_rate": math.inf}, "max_rate must be"),
        ({"max_rate": "10/s"}, "max_rate must be"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)  # type: ignore[arg-type]


counts = st.none() | st.integers(min_value=1, max_value=10_000)
rates = st.none() | st.floats(min_value=1e-6, max_value=1e6)
limits = st.builds(Limits, counts, counts, rates, counts)


@given(limits, st.floats(min_value=1e-9, max_value=1))
def test_scaled_never_raises_a_limit_and_never_reaches_zero(base: Limits, factor: float) -> None:
    scaled = base.scaled(factor)
    if base.max_connections is None:
        assert scaled.max_connections is None
    else:
        assert scaled.max_connections is not None
        assert 1 <= scaled.max_connections <= base.max_connections
    if base.max_rate is None:
        assert scaled.max_rate is None
    else:
        assert scaled.max_rate is not None
        assert 0 < scaled.max_rate <= base.max_rate
    assert scaled.max_messages_per_connection == base.max_messages_per_connection
    assert scaled.max_recipients == base.max_recipients


@given(limits, limits, limits)
def test_merging_is_associative_and_set_fields_win(a: Limits, b: Limits, c: Limits) -> None:
    assert a.merged_over(b).merged_over(c) == a.merged_over(b.merged_over(c))
    merged = a.merged_over(b)
    for name in ("max_connections", "max_messages_per_connection", "max_rate", "max_recipients"):
        mine = getattr(a, name)
        assert getattr(merged, name) == (getattr(b, name) if mine is None else mine)


@given(
    st.text(alphabet="abcxyz.-", min_size=1, max_size=20),
    st.lists(st.text(alphabet="abcgoogle.-", max_size=30), max_size=3),
)
def test_site_for_never_raises(domain: str, mx_hosts: list[str]) -> None:
    site = site_for(domain, mx_hosts, PROVIDERS)
    assert site.provider is None or site.name == site.provider in PROVIDERS
