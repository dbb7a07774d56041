"""Domain names: the one rule, checked against each caller's rule from before it.

The three functions below are the rules signing, routing and configuration
each had of their own; the shared ones must give what they gave.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mta import config
from mta.mail.address import address_is_valid, parse_ip
from mta.mail.domain import is_domain_name, lowercase_name, normalize_domain
from mta.outbound.routes import ResolveError, domain_key
from mta.signing.keys import dkim_domain

_SIGNING_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_SIGNING_NAME = re.compile(rf"{_SIGNING_LABEL}(?:\.{_SIGNING_LABEL})*")
_ROUTES_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ROUTES_DOMAIN = re.compile(rf"^(?=.{{1,253}}$)(?:{_ROUTES_LABEL}\.)*{_ROUTES_LABEL}$")


def signing_before(domain: str) -> str | None:
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(name) > 253 or not _SIGNING_NAME.fullmatch(name):
        return None
    return name


def routes_before(domain: str) -> str | None:
    name = domain.lower().removesuffix(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            name = ""
    return name if _ROUTES_DOMAIN.match(name) else None


def config_before(text: str) -> str | None:
    name = text.strip().rstrip(".").lower()
    return None if not name or " " in name or "@" in name else name


def routes_now(domain: str) -> str | None:
    try:
        return domain_key(domain)
    except ResolveError:
        return None


def config_now(text: str) -> str | None:
    try:
        return config.lowercase_domain(text)
    except ValueError:
        return None


label = st.text(alphabet="abcXYZ019-_", min_size=1, max_size=8) | st.sampled_from(
    ["bücher", "ÉCOLE", "xn--bcher-kva", "a" * 63, "a" * 64, "", "K"]
)
names = st.builds(
    lambda labels, dots, spaces: spaces + ".".join(labels) + "." * dots + spaces,
    st.lists(label, min_size=1, max_size=5),
    st.integers(0, 3),
    st.sampled_from(["", " ", "\t", "\n"]),
)
domains = names | st.text(max_size=30)


@given(domains)
@example("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61)
@example("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 62)
def test_signing_keeps_its_rule(domain: str) -> None:
    assert dkim_domain(domain) == signing_before(domain)


@given(domains)
def test_routing_keeps_its_rule_for_every_domain_it_took(domain: str) -> None:
    before = routes_before(domain)
    if before is not None and not domain.endswith("\n"):
        assert routes_now(domain) == before


@given(domains)
def test_routing_now_also_takes_a_domain_only_around_its_edges(domain: str) -> None:
    """What routing refused before and takes now differs only in surrounding
    whitespace or extra final dots, which the one rule removes."""
    now = routes_now(domain)
    if now is not None and routes_before(domain) is None:
        assert routes_before(domain.strip().rstrip(".")) == now


@given(domains)
def test_configuration_keeps_its_rule(text: str) -> None:
    assert config_now(text) == config_before(text)


def test_a_trailing_newline_no_longer_passes_as_part_of_a_name() -> None:
    # The old patterns ended in "$", which also matches before a final newline.
    assert routes_before("example.test\n") == "example.test\n"
    assert routes_now("example.test\n") == "example.test"
    assert not address_is_valid("a@example.test\n")


@pytest.mark.parametrize(
    ("name", "underscore", "valid"),
    [
        ("example.test", False, True),
        ("Example.TEST", False, True),
        ("_dmarc.example.test", False, False),
        ("_dmarc.example.test", True, True),
        ("-bad.test", False, False),
        ("bad..test", False, False),
        ("", False, False),
        ("a" * 64, True, False),
    ],
)
def test_what_a_domain_name_is(name: str, underscore: bool, valid: bool) -> None:
    assert is_domain_name(name, underscore=underscore) is valid


def test_the_rule() -> None:
    assert lowercase_name(" Example.TEST.. ") == "example.test"
    assert normalize_domain("Bücher.Test.") == "xn--bcher-kva.test"
    assert normalize_domain("s_1.example.test") is None
    assert normalize_domain("s_1.example.test", underscore=True) == "s_1.example.test"


@pytest.mark.parametrize(
    ("text", "ip"),
    [("10.0.0.1", "10.0.0.1"), ("[IPv6:2001:DB8::1]", "2001:db8::1"), ("relay.test", None)],
)
def test_one_ip_parser(text: str, ip: str | None) -> None:
    assert parse_ip(text) == ip
    if ip is None:
        with pytest.raises(ValueError, match="is not an IP address"):
            config.ip_address(text)
    else:
        assert config.ip_address(text) == ip
