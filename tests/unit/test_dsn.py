"""Bounce messages (RFC 3464 DSNs), read back with Python's email parser and dkimpy."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Sequence
from email.message import EmailMessage, Message
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.outbound import dsn
from mta.outbound.dsn import Failure, build_dsn
from mta.signing.keys import generate_key, load_key
from mta.signing.signer import Signer

NOW = 1_700_000_100.0
ARRIVED = 1_700_000_000.0
QUEUE_ID = "06H13HS0N80M1W00"
HOST = "mta.example.com"

ORIGINAL_HEADERS = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\r\n"
    b" s=s1; h=from; bh=abc=; b=def=\r\n"
    b"Received: from app1 (app1.internal [10.0.0.1]) by mta.example.com\r\n"
    b"From: Shop <news@example.org>\r\n"
    b"To: customer@example.net\r\n"
    b"Subject: Your order\r\n"
    b"Message-ID: <order-1@example.org>\r\n"
)
ORIGINAL_BODY = b"Secret body: your password is hunter2\r\n.\r\n--not a boundary\r\n"
ORIGINAL = ORIGINAL_HEADERS + b"\r\n" + ORIGINAL_BODY

UNKNOWN = Failure(
    "customer@example.net",
    "5.1.1",
    "550 5.1.1 <customer@example.net>: Recipient address rejected: User unknown",
    "mx1.example.net",
)
NO_MX = Failure("x@nowhere.example", "5.4.4", "Host or domain name not found", None)


def make(
    failures: Sequence[Failure] = (UNKNOWN,),
    original: bytes = ORIGINAL,
    sender: str = "bounces@example.org",
) -> bytes:
    return build_dsn(
        original=original,
        message_queue_id=QUEUE_ID,
        sender=sender,
        arrived=ARRIVED,
        failures=failures,
        reporting_mta=HOST,
        now=NOW,
        dsn_message_id=f"<{QUEUE_ID}.dsn@{HOST}>",
    )


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    return list(message.iter_parts())  # type: ignore[arg-type]


def report_blocks(data: bytes) -> list[Message]:
    """The delivery-status part's field blocks: per-message first, then one per recipient."""
    payload = parts(parse(data))[1].get_payload()
    assert isinstance(payload, list)
    blocks = [block for block in payload if isinstance(block, Message)]
    assert len(blocks) == len(payload)
    return blocks


def unfolded(block: Message, name: str) -> str:
    # Unfolding only removes the CRLF (RFC 5322 2.2.3); str() of a parsed
    # header would also decode RFC 2047 words, which a DSN does not use.
    raw = block.get(name)
    assert raw is not None
    return re.sub(r"\r?\n(?=[ \t])", "", str(raw))


def safe(text: str) -> str:
    """What the DSN makes of a remote text: one line of printable ASCII."""
    return re.sub(r"[^\x20-\x7e]", "?", " ".join(text.split()))


def assert_crlf_only(data: bytes) -> None:
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


# --- structure ----------------------------------------------------------------


def test_is_a_multipart_report_with_three_parts() -> None:
    data = make()
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.defects == [] and all(p.defects == [] for p in parts(message))
    assert_crlf_only(data)
    assert data.isascii()


def test_top_level_headers() -> None:
    data = make()
    assert b"\r\nTo: <bounces@example.org>\r\n" in data
    message = parse(data)
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert message["From"].addresses[0].domain == HOST
    assert message["To"].addresses[0].addr_spec == "bounces@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == "Tue, 14 Nov 2023 22:15:00 +0000"
    assert message["Message-ID"] == f"<{QUEUE_ID}.dsn@{HOST}>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"


def test_human_part_explains_in_postfix_style() -> None:
    text = parts(parse(make([UNKNOWN, NO_MX])))[0].get_content().replace("\r\n", "\n")
    assert text.startswith(f"This is the mail system at host {HOST}.")
    assert "could not\nbe delivered to one or more recipients" in text
    assert "<customer@example.net>: host mx1.example.net said: 550 5.1.1" in text
    assert "<x@nowhere.example>: Host or domain name not found" in text
    assert parts(parse(make()))[0].get_content_charset() == "us-ascii"


def test_delivery_status_fields() -> None:
    per_message, unknown, no_mx = report_blocks(make([UNKNOWN, NO_MX]))
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["X-Queue-ID"] == QUEUE_ID
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert dict(unknown.items()) == {
        "Final-Recipient": "rfc822; customer@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.example.net",
        "Diagnostic-Code": f"smtp; {UNKNOWN.diagnostic}",
    }
    # Never reached a server: no Remote-MTA, and our own reason is not an SMTP reply.
    assert dict(no_mx.items()) == {
        "Final-Recipient": "rfc822; x@nowhere.example",
        "Action": "failed",
        "Status": "5.4.4",
        "Diagnostic-Code": "X-MTA; Host or domain name not found",
    }


def test_headers_part_holds_the_original_header_section_exactly_and_no_body() -> None:
    data = make()
    assert ORIGINAL_HEADERS in data  # byte for byte, folding and all
    assert b"hunter2" not in data
    third = parts(parse(data))[2]
    assert third.get_content_type() == "text/rfc822-headers"
    payload = third.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == ORIGINAL_HEADERS.replace(b"\r\n", b"\n")


def test_original_without_a_body() -> None:
    data = make(original=ORIGINAL_HEADERS.rstrip(b"\r\n"))
    assert ORIGINAL_HEADERS in data
    assert_crlf_only(data)


def test_eight_bit_original_headers_are_kept_and_labelled() -> None:
    original = "Subject: Grüße\r\nFrom: a@example.org\r\n\r\nbody\r\n".encode()
    data = make(original=original)
    assert "Subject: Grüße\r\n".encode() in data
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert parts(message)[2]["Content-Transfer-Encoding"] == "8bit"
    assert make().count(b"Content-Transfer-Encoding: 7bit") == 2


def test_bare_line_endings_in_a_damaged_original_are_repaired() -> None:
    data = make(original=b"From: a@example.org\nX-A: 1\rSubject: s\r\n\r\nbody")
    assert_crlf_only(data)
    assert b"From: a@example.org\r\nX-A: 1\r\nSubject: s\r\n" in data


# --- hostile input ------------------------------------------------------------


def test_a_diagnostic_with_crlf_cannot_add_a_field_or_a_block() -> None:
    evil = Failure(
        "victim@example.net",
        "5.0.0",
        "550 no\r\nX-Injected: yes\r\n\r\n"
        "Final-Recipient: rfc822; forged@example.com\nStatus: 2.0.0",
        "mx.example.net\r\nX-Host-Injected: yes",
    )
    data = make([evil])
    assert_crlf_only(data)
    blocks = report_blocks(data)
    assert len(blocks) == 2
    assert set(blocks[1].keys()) == {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
    }
    assert blocks[1]["Status"] == "5.0.0"
    assert unfolded(blocks[1], "Diagnostic-Code") == "smtp; " + safe(evil.diagnostic)
    assert b"\r\nX-Injected" not in data and b"\r\nX-Host-Injected" not in data


def test_non_ascii_becomes_question_marks() -> None:
    failure = Failure("jos\u00e9@example.net", "5.1.1", "550 5.1.1 unbekannt \u2013 \x1b[0m", "mx")
    data = make([failure])
    assert data.isascii()
    block = report_blocks(data)[1]
    assert block["Final-Recipient"] == "rfc822; jos?@example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannt ? ?[0m"


def test_a_word_longer_than_the_line_limit_is_split() -> None:
    data = make([Failure("a@example.net", "5.0.0", "550 " + "x" * 5000, "mx")])
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert len(report_blocks(data)) == 2


def test_the_boundary_is_chosen_again_when_the_content_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = iter(["aaaa", "AAAA", "bbbb"])
    monkeypatch.setattr(dsn, "_random_token", lambda: next(tokens))
    taken = f"{QUEUE_ID}.aaaa".encode()
    # The first candidate is in the original's headers; the second, in other case, too.
    original = b"X-Trap: " + taken + b"\r\nX-Trap2: " + taken.upper() + b"\r\n" + ORIGINAL
    data = make(original=original)
    assert parse(data).get_boundary() == f"{QUEUE_ID}.bbbb"
    assert len(parts(parse(data))) == 3


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="null sender"):
        make(sender="")
    with pytest.raises(ValueError, match="at least one recipient"):
        make(failures=[])
    with pytest.raises(ValueError, match="status must look like 5.1.1"):
        Failure("a@b", "5.1.1\r\nX: y", "d", None)
    with pytest.raises(ValueError, match="action must be one of"):
        Failure("a@b", "5.1.1", "d", None, action="gone")


TRICKY = st.text(
    st.sampled_from([*map(chr, range(0x20, 0x7F)), "\r", "\n", "\t", "\x00", "\u00e9"]),
    max_size=200,
)
PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)


@settings(deadline=None)
@given(
    failures=st.lists(
        st.builds(
            Failure,
            recipient=PRINTABLE,
            status=st.sampled_from(["5.1.1", "5.0.0", "4.4.7", "5.7.26"]),
            diagnostic=TRICKY,
            remote_mta=st.one_of(st.none(), PRINTABLE),
        ),
        min_size=1,
        max_size=4,
    ),
    header_value=TRICKY.map(lambda s: re.sub(r"[\r\n]", "", s)),
)
def test_invariants_hold_for_any_recipients_and_diagnostics(
    failures: list[Failure], header_value: str
) -> None:
    original = b"X-Anything: " + header_value.encode() + b"\r\n" + ORIGINAL
    data = make(failures, original=original)
    assert_crlf_only(data)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = parse(data)
    boundary = message.get_boundary()
    assert boundary is not None
    # The boundary occurs only in Content-Type and the four delimiter lines.
    assert data.count(boundary.encode()) == 5
    assert boundary.encode().lower() not in original.lower()
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = report_blocks(data)
    assert len(blocks) == 1 + len(failures)
    for block, failure in zip(blocks[1:], failures, strict=True):
        assert unfolded(block, "Final-Recipient") == f"rfc822; {failure.recipient}"
        assert block["Status"] == failure.status
        assert block["Action"] == "failed"
        diagnostic = unfolded(block, "Diagnostic-Code")
        assert diagnostic.partition("; ")[2] == safe(failure.diagnostic)
        expected = {"Final-Recipient", "Action", "Status", "Diagnostic-Code"}
        if failure.remote_mta:
            expected.add("Remote-MTA")
            assert unfolded(block, "Remote-MTA") == f"dns; {failure.remote_mta}"
        assert set(block.keys()) == expected
    assert b"hunter2" not in data


# --- DKIM ---------------------------------------------------------------------


def test_the_dsn_can_be_signed_and_verified(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(generate_key("rsa", 1024))
    key = load_key(HOST, "s1", pem)
    signed = Signer([key], clock=lambda: NOW).sign(make([UNKNOWN, NO_MX]))
    assert signed.domain == HOST

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return key.txt_record().encode() if name == f"s1._domainkey.{HOST}.".encode() else None

    assert dkim.verify(signed.message, dnsfunc=dnsfunc)
    assert_crlf_only(signed.message)
