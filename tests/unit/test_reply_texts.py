"""SMTP replies: every reply to a command carries an enhanced status code; refusals get a label."""

from __future__ import annotations

import re

import pytest

from mta.inbound import reply_texts
from mta.inbound.reply_texts import enhance, rejection_reason

# Stock replies as aiosmtpd 1.4.6 writes them (aiosmtpd/smtp.py), with the
# enhanced code each should get.
STOCK = [
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    (
        "252 Cannot VRFY user, but will accept message and attempt delivery",
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
    ),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: nested MAIL command", "503 5.5.1 Error: nested MAIL command"),
    ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
    (
        "500 Line too long (see RFC5321 4.5.3.1.6)",
        "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)",
    ),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ('500 Error: command "FOO" not recognized', '500 5.5.2 Error: command "FOO" not recognized'),
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("501 Syntax: EHLO hostname", "501 5.5.4 Syntax: EHLO hostname"),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
    (
        "554 Command refused due to lack of security",
        "554 5.7.0 Command refused due to lack of security",
    ),
    (
        "555 MAIL FROM parameters not recognized or not implemented",
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
    ),
]


@pytest.mark.parametrize(("stock", "expected"), STOCK)
def test_enhance_adds_the_fitting_code_to_stock_replies(stock: str, expected: str) -> None:
    assert enhance(stock) == expected


@pytest.mark.parametrize(("stock", "_"), STOCK)
def test_enhanced_code_class_matches_the_reply_code(stock: str, _: str) -> None:
    code, enhanced = enhance(stock).split(" ")[:2]
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced)
    assert enhanced[0] == code[0]


@pytest.mark.parametrize(
    "reply",
    [
        "250 2.0.0 Ok: queued as 0123456789ABCDEF",
        "501 5.5.2 Can't decode base64",
        "538 5.7.11 Encryption required for requested authentication mechanism",
        "421 4.7.0 MAIL sent too many times",
        "235 2.7.0 Authentication successful",
        "535 5.7.8 Authentication credentials invalid",
        "553 5.1.3 Error: malformed address",
        "250 2.1.5",
    ],
)
def test_enhance_leaves_replies_that_have_a_code_untouched(reply: str) -> None:
    assert enhance(reply) == reply


def test_enhance_is_idempotent() -> None:
    for stock, _ in STOCK:
        assert enhance(enhance(stock)) == enhance(stock)


def test_enhance_falls_back_to_the_class_code() -> None:
    assert enhance("451 Try again") == "451 4.0.0 Try again"
    assert enhance("550 No") == "550 5.0.0 No"


def test_enhance_of_a_bare_code() -> None:
    assert enhance("250") == "250 2.0.0"


def test_a_number_in_the_text_is_not_mistaken_for_a_code() -> None:
    assert enhance("500 4.5.3.1.6 is the section") == "500 5.5.2 4.5.3.1.6 is the section"


def test_our_own_replies_all_carry_an_enhanced_code() -> None:
    ours = [
        reply_texts.OK,
        reply_texts.SENDER_OK,
        reply_texts.RECIPIENT_OK,
        reply_texts.NO_ROOM,
        reply_texts.TOO_MANY_RECIPIENTS,
        reply_texts.INTERNAL_ERROR,
        reply_texts.BARE_LINE_ENDING,
        reply_texts.SHUTTING_DOWN.format(host="h"),
        reply_texts.TIMEOUT.format(host="h"),
        reply_texts.TOO_MANY_CONNECTIONS.format(host="h", ip="192.0.2.1"),
        reply_texts.SERVER_BUSY.format(host="h"),
        reply_texts.relay_denied("a@b"),
        reply_texts.bad_address("a b", "recipient"),
        reply_texts.queued("0123456789ABCDEF"),
    ]
    for reply in ours:
        assert enhance(reply) == reply, reply


# --- rejection_reason ---


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (enhance("552 Error: Too much mail data"), "message_too_big"),
        ("552 5.3.4 Error: message size exceeds fixed maximum message size", "message_too_big"),
        (enhance("500 Line too long (see RFC5321 4.5.3.1.6)"), "line_too_long"),
        (enhance("500 Command line too long"), "command_too_long"),
        ("535 5.7.8 Authentication credentials invalid", "auth_failed"),
        (reply_texts.relay_denied("x@example.org"), "relay_denied"),
        (reply_texts.BARE_LINE_ENDING, "bare_line_ending"),
        ("550 5.6.0 Error: message has no From header (RFC 5322 3.6)", "bad_header"),
        ("550 5.6.0 Error: message has more than one From header (RFC 5322 3.6)", "bad_header"),
        (reply_texts.NO_ROOM, "spool_full"),
        (reply_texts.TOO_MANY_RECIPIENTS, "too_many_recipients"),
        (reply_texts.TOO_MANY_CONNECTIONS.format(host="h", ip="192.0.2.1"), "too_many_connections"),
        (reply_texts.SERVER_BUSY.format(host="h"), "too_many_connections"),
        (reply_texts.bad_address("a b@x", "sender"), "bad_address"),
        (reply_texts.INTERNAL_ERROR, "internal_error"),
    ],
)
def test_rejection_reason_labels_refusals(reply: str, reason: str) -> None:
    assert rejection_reason(reply) == reason


@pytest.mark.parametrize(
    "reply",
    [
        reply_texts.OK,
        reply_texts.queued("0123456789ABCDEF"),
        reply_texts.TIMEOUT.format(host="h"),
        reply_texts.SHUTTING_DOWN.format(host="h"),
        enhance("503 Error: need RCPT command"),
        enhance('500 Error: command "FOO" not recognized'),
    ],
)
def test_rejection_reason_is_none_for_what_is_not_counted(reply: str) -> None:
    assert rejection_reason(reply) is None
