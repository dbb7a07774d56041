"""The Received field names only what its parsers read unambiguously, whatever
the client's EHLO name and recipient (mta.inbound.message.received_field)."""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.inbound.message import received_field
from mta.mail.address import is_address_literal

NOW = 1_700_000_000.0
QID = "06H13HS0N80M1W00AAAAAA"

# The whole field: from a domain, an address literal, or "unknown" with the
# shown HELO in a comment; the client as an address literal; one ";" before the date.
STRICT = re.compile(
    r"Received: from (?:[A-Za-z0-9.-]+|\[[0-9A-Za-z:.]+\]|unknown(?: \(HELO [A-Za-z0-9._:?-]+\))?)"
    r" \(\[(?:[0-9.]+|IPv6:[0-9a-f:.]+)\]\)\r\n"
    r"\tby mta\.test \(mta\) with ESMTP id " + QID + r"(?:\r\n\tfor <[^\s<>;()\"\\]+>)?;\r\n"
    r"\t(?P<date>[^\r\n;()]+)\r\n"
)


def field(helo: str, recipients: list[str], client_ip: str = "10.0.0.5") -> str:
    return received_field(
        helo=helo,
        client_ip=client_ip,
        hostname="mta.test",
        protocol="ESMTP",
        queue_id=QID,
        recipients=recipients,
        now=NOW,
    ).decode("ascii")


def first_line(helo: str, client_ip: str = "10.0.0.5") -> str:
    return field(helo, [], client_ip).split("\r\n")[0]


def test_an_ehlo_name_with_semicolon_and_quotes_is_shown_in_a_comment() -> None:
    assert first_line('evil; "by x" (y)') == (
        "Received: from unknown (HELO evil???by?x???y?) ([10.0.0.5])"
    )


@pytest.mark.parametrize(
    "helo", ["app1.internal", "h", "MAIL.Example.COM", "[192.0.2.1]", "[IPv6:2001:db8::1]"]
)
def test_a_domain_or_address_literal_is_named_as_it_is(helo: str) -> None:
    assert first_line(helo) == f"Received: from {helo} ([10.0.0.5])"


@pytest.mark.parametrize(
    "helo", ["[::1]", "[IPv6:192.0.2.1]", "[300.1.1.1]", "a..b", "-a.test", "a_b.test", "x y"]
)
def test_anything_else_is_unknown(helo: str) -> None:
    assert first_line(helo).startswith("Received: from unknown (HELO ")
    assert not is_address_literal(helo)


def test_the_client_is_an_address_literal() -> None:
    assert first_line("h", "::1") == "Received: from h ([IPv6:::1])"
    assert first_line("h", "192.0.2.7") == "Received: from h ([192.0.2.7])"


def test_a_long_ehlo_name_is_cut() -> None:
    assert first_line("x" * 300 + "!") == f"Received: from unknown (HELO {'x' * 64}) ([10.0.0.5])"


def test_a_lone_recipient_is_shown_with_plain_characters_only() -> None:
    assert '\tfor <?a;b?"@x.test>' not in field("h", ['"a;b"@x.test'])
    assert "\tfor <?a?b?@x.test>;" in field("h", ['"a;b"@x.test'])
    assert "\tfor <only@example.org>;" in field("h", ["only@example.org"])


@given(st.text(), st.text(), st.sampled_from(["10.0.0.5", "2001:db8::7"]))
def test_any_ehlo_name_and_recipient_give_a_well_formed_field(
    helo: str, recipient: str, client_ip: str
) -> None:
    text = field(helo, [recipient], client_ip)
    match = STRICT.fullmatch(text)
    assert match, text
    assert text.count(";") == 1  # the one before the date
    assert parsedate_to_datetime(match.group("date")).timestamp() == NOW
