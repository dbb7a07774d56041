"""Delivery to a real Postfix: what a user of the receiving server would see.

Each test starts a throwaway Postfix (tests/harness/postfix.py) that
stores mail for user@stored.test and app@example.test in Maildirs, and an
MTA whose static routes send both domains to it. The message is then read
back from the Maildir, as the recipient's mail client would read it, and
both servers' logs are checked for the same delivery.
"""

from __future__ import annotations

import email
import email.policy
import re
import uuid
from collections.abc import Iterator
from email.message import EmailMessage, Message

import pytest

from tests.harness.client import send, verify
from tests.harness.mta import Mta
from tests.harness.postfix import PostfixReceiver

pytestmark = pytest.mark.integration

USER = "user@stored.test"
SENDER = "app@example.test"  # send()'s envelope sender; the DKIM key's domain


@pytest.fixture
def postfix() -> Iterator[PostfixReceiver]:
    receiver = PostfixReceiver([USER, SENDER])
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def routed(postfix: PostfixReceiver, mta: Mta) -> Iterator[Mta]:
    """An MTA that delivers stored.test and example.test (bounces) to the Postfix."""
    # Bounces come from MAILER-DAEMON@<hostname>: under example.test, so signed.
    mta.server["hostname"] = "mta.example.test"
    mta.park_mail = False
    mta.routes = {"stored.test": postfix.address, "example.test": postfix.address}
    mta.start()
    yield mta
    if mta.process is not None:
        assert mta.stop() == 0, mta.log()


def message(subject: str) -> bytes:
    """A complete message: with Date and Message-ID, so our MTA adds nothing below the top."""
    return (
        "From: App <app@example.test>\r\n"
        "To: User <user@stored.test>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Wed, 25 Nov 2026 08:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Hello.\r\n"
        ".\r\n"
        "..two dots\r\n"
        "From the start of a line (no '>' quoting in a Maildir)\r\n"
        "  indented, and a trailing space \r\n"
        "\r\n"
        "8-bit: Grüße\r\n"
        "end\r\n"
    ).encode()


def unique() -> str:
    return f"test {uuid.uuid4().hex}"


def field_names(header: bytes) -> list[str]:
    """The names of the header fields in ``header`` (CRLF lines), in order."""
    return [
        line.split(b":", 1)[0].decode().lower()
        for line in header.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]


def test_postfix_stores_the_message_as_sent_with_a_verifying_signature(
    routed: Mta, postfix: PostfixReceiver
) -> None:
    subject = unique()
    original = message(subject)
    queue_id = send(routed, original, [USER])

    stored = postfix.wait_for(USER, f"Subject: {subject}".encode())
    assert stored.path.parent.name in ("new", "cur")
    assert stored.added.startswith(f"Return-Path: <{SENDER}>\r\n".encode())
    assert f"Delivered-To: {USER}\r\n".encode() in stored.added
    # What Postfix received is what we sent, under our two fields: the
    # signature on top, then our Received (docs/architecture.md, "Header order").
    received = stored.received
    assert received.endswith(original)
    assert field_names(received[: -len(original)]) == ["dkim-signature", "received"]
    assert verify(routed, stored.data)  # Postfix's own fields on top are not signed

    routed.wait_for_empty_spool()
    match = re.search(
        rf"id={queue_id} to=<{re.escape(USER)}> "
        rf"relay={re.escape(postfix.host)}\[{re.escape(postfix.host)}\]:{postfix.port} "
        r"[^\n]* attempts=1 dsn=2\.0\.0 [^\n]*status=sent "
        r"\(250 2\.0\.0 Ok: queued as (\w+)\)",
        routed.log(),
    )
    assert match, routed.log()
    postfix_id = match.group(1)
    log = postfix.wait_for_log(lambda text: f"{postfix_id}: removed" in text)
    assert re.search(
        rf"postfix/virtual\[\d+\]: {postfix_id}: to=<{re.escape(USER)}>, relay=virtual, "
        r".*dsn=2\.0\.0, status=sent \(delivered to maildir\)",
        log,
    ), log
    assert re.search(rf"postfix/qmgr\[\d+\]: {postfix_id}: from=<{re.escape(SENDER)}>,", log), log
    # Opportunistic TLS: Postfix offers STARTTLS, so our client uses it.
    assert "Anonymous TLS connection established from" in log, log
    assert "warning:" not in log, log
    assert routed.stop() == 0, routed.log()


def delivery_status(dsn: EmailMessage) -> list[Message]:
    """The blocks of the message/delivery-status part: per-message, then per-recipient."""
    [part] = [part for part in dsn.walk() if part.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


def test_unknown_recipient_refused_at_rcpt_bounces_to_the_sender(
    routed: Mta, postfix: PostfixReceiver
) -> None:
    subject = unique()
    queue_id = send(routed, message(subject), ["nobody@stored.test"])

    # Postfix refuses the recipient; our MTA's DSN goes to the sender's mailbox.
    stored = postfix.wait_for(SENDER, f"Subject: {subject}".encode())
    assert stored.added.startswith(b"Return-Path: <>\r\n")  # a bounce has the null sender
    assert verify(routed, stored.data)  # our DSNs are DKIM-signed too
    dsn = email.message_from_bytes(stored.received, policy=email.policy.default)
    assert isinstance(dsn, EmailMessage)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mta.example.test"
    assert dsn["To"].addresses[0].addr_spec == SENDER

    refused = re.compile(
        r"NOQUEUE: reject: RCPT from \S+: (550 5\.1\.1 <nobody@stored\.test>: [^;]+); "
        rf"from=<{re.escape(SENDER)}> to=<nobody@stored\.test>"
    )
    log = postfix.wait_for_log(lambda text: bool(refused.search(text)))
    refusal = refused.search(log)
    assert refusal, log
    reply = refusal.group(1)  # "550 5.1.1 <nobody@stored.test>: ... virtual mailbox table"
    assert "User unknown in virtual mailbox table" in reply
    [recipient] = [block for block in delivery_status(dsn) if block["Final-Recipient"]]
    assert recipient["Final-Recipient"] == "rfc822; nobody@stored.test"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Diagnostic-Code"] == f"smtp; {reply}"

    routed.wait_for_empty_spool()
    assert re.search(
        rf"id={queue_id} to=<nobody@stored\.test> "
        rf"relay={re.escape(postfix.host)}\[{re.escape(postfix.host)}\]:{postfix.port} "
        rf"[^\n]* attempts=1 dsn=5\.1\.1 [^\n]*status=bounced \({re.escape(reply)}\)",
        routed.log(),
    ), routed.log()
    log = postfix.wait_for_log(
        lambda text: bool(
            re.search(
                rf"to=<{re.escape(SENDER)}>, relay=virtual, .*status=sent \(delivered to maildir\)",
                text,
            )
        )
    )
    assert "warning:" not in log, log
    assert routed.stop() == 0, routed.log()
