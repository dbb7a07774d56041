"""Accepting mail: a real `mta serve`, real clients, an independent DKIM verifier."""

from __future__ import annotations

import json
import re
import smtplib
import ssl
import subprocess
import urllib.request

import pytest

from tests.harness.client import MESSAGE, RawSmtp, send, verify
from tests.harness.mta import Mta

pytestmark = pytest.mark.integration


def test_accepted_message_is_signed_spooled_and_listed(running_mta: Mta) -> None:
    queue_id = send(running_mta, recipients=["a@example.net", "b@example.net", "c@other.test"])

    rows = [row for row in running_mta.queue_list() if row["id"] == queue_id]
    assert {row["domain"] for row in rows} == {"example.net", "other.test"}
    by_domain = {row["domain"]: row for row in rows}
    assert by_domain["example.net"]["recipients"] == ["a@example.net", "b@example.net"]
    assert by_domain["other.test"]["state"] == "ready"
    assert by_domain["other.test"]["sender"] == "app@example.test"

    stored = running_mta.raw_message(queue_id)
    assert verify(running_mta, stored), stored[:600]
    header, _, body = stored.partition(b"\r\n\r\n")
    assert body == MESSAGE.partition(b"\r\n\r\n")[2].replace(b"\r\n.leading", b"\r\n.leading")
    assert b"Message-ID: <receipt-42@app.example.test>" in header
    assert re.search(rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby mta\.test", header)
    assert f"id {queue_id}".encode() in header
    assert b"\r\nDate: " in header  # added: the message had none


def test_swaks_message_is_queued(running_mta: Mta, swaks: str) -> None:
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{running_mta.port}",
            "--from",
            "app@example.test",
            "--to",
            "user@example.net",
            "--body",
            "sent by swaks",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout
    queue_id = re.search(r"250 2\.0\.0 Ok: queued as (\w+)", result.stdout).group(1)  # type: ignore[union-attr]
    assert verify(running_mta, running_mta.raw_message(queue_id))
    show = running_mta.cli("queue", "show", queue_id, "--json")
    assert json.loads(show.stdout)["sender"] == "app@example.test"


def test_ehlo_advertises_extensions(running_mta: Mta) -> None:
    with smtplib.SMTP("127.0.0.1", running_mta.port, timeout=10) as client:
        client.ehlo("client.test")
        for keyword in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "starttls"):
            assert client.has_extn(keyword), keyword
        assert not client.has_extn("auth")  # AUTH only over TLS
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("client.test")
        assert client.has_extn("auth")


def test_relay_denied_to_a_client_outside_relay_networks(running_mta: Mta) -> None:
    client = RawSmtp(running_mta.port, source="127.0.0.2")
    assert client.reply().startswith("220 ")
    client.command("EHLO outsider.test")
    assert client.command("MAIL FROM:<x@outsider.test>").startswith("250 2.1.0")
    assert client.command("RCPT TO:<victim@example.net>") == (
        "554 5.7.1 <victim@example.net>: Relay access denied"
    )
    assert client.command("DATA").startswith("503 5.5.1")
    client.close()
    assert running_mta.queue_list() == []


def test_authenticated_client_may_relay_from_anywhere(running_mta: Mta) -> None:
    added = running_mta.cli("user", "add", "app1", stdin="s3cret-password\n")
    assert added.returncode == 0, added.stderr
    running_mta.stop()
    running_mta.start()  # the users file is read at start
    context = ssl._create_unverified_context()
    with smtplib.SMTP(
        "127.0.0.1", running_mta.port, timeout=10, source_address=("127.0.0.2", 0)
    ) as client:
        client.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("app1", "wrong")
        assert refused.value.smtp_code == 535
        client.login("app1", "s3cret-password")
        client.sendmail("app@example.test", ["user@example.net"], MESSAGE)
    [row] = running_mta.queue_list()
    assert b"with ESMTPSA id" in running_mta.raw_message(row["id"])
    assert "s3cret-password" not in running_mta.log()


def test_size_limit_announced_and_streamed(mta: Mta) -> None:
    mta.server["max_message_size"] = 10_000
    mta.start()
    client = RawSmtp(mta.port)
    client.hello()
    assert client.command("MAIL FROM:<app@example.test> SIZE=20000").startswith("552 5.3.4")
    # Not announced: the limit holds while the data streams in.
    assert client.command("MAIL FROM:<app@example.test>").startswith("250")
    assert client.command("RCPT TO:<user@example.net>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(MESSAGE + (b"x" * 70 + b"\r\n") * 200 + b".\r\n")
    assert client.reply().startswith("552 5.3.4")
    client.close()
    assert mta.queue_list() == []
    mta.stop()


def test_recipient_limit(mta: Mta) -> None:
    mta.server["max_recipients"] = 3
    mta.start()
    client = RawSmtp(mta.port)
    client.hello()
    client.command("MAIL FROM:<app@example.test>")
    for number in range(3):
        assert client.command(f"RCPT TO:<u{number}@example.net>").startswith("250 2.1.5")
    assert client.command("RCPT TO:<u9@example.net>") == "452 4.5.3 Error: too many recipients"
    assert client.command("DATA").startswith("354")
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0")
    client.close()
    assert mta.queue_list()[0]["recipients"] == [
        "u0@example.net",
        "u1@example.net",
        "u2@example.net",
    ]
    mta.stop()


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n"]


@pytest.mark.parametrize("terminator", SMUGGLING, ids=repr)
def test_smuggled_message_is_never_queued(running_mta: Mta, terminator: bytes) -> None:
    smuggled = (
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
    )
    client = RawSmtp(running_mta.port)
    client.hello()
    # Everything pipelined in one write, as an attacker would.
    client.send(
        b"MAIL FROM:<app@example.test>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n"
        + MESSAGE
        + terminator
        + smuggled
        + b"\r\n.\r\n"
    )
    replies = [client.reply() for _ in range(4)]
    assert replies[0].startswith("250") and replies[1].startswith("250")
    assert replies[2].startswith("354")
    assert replies[3].startswith("550 5.5.2"), replies
    assert client.command("NOOP").startswith("250")  # and nothing else was pending
    client.close()
    assert running_mta.queue_list() == []


def test_header_and_line_problems_get_clear_replies(running_mta: Mta) -> None:
    client = RawSmtp(running_mta.port)
    client.hello()

    def transaction(data: bytes) -> str:
        client.command("MAIL FROM:<app@example.test>")
        client.command("RCPT TO:<user@example.net>")
        client.command("DATA")
        client.send(data + b".\r\n")
        return client.reply()

    assert transaction(b"Subject: no from\r\n\r\nbody\r\n").startswith("550 5.6.0")
    assert transaction(b"From: a@example.test\r\nFrom: b@example.test\r\n\r\nx\r\n").startswith(
        "550 5.6.0"
    )
    assert transaction(MESSAGE + b"y" * 1200 + b"\r\n").startswith("500 5.5.2")
    assert client.command("MAIL FROM:<app%other.test@example.test>").startswith("501 5.1.3")
    assert client.command("X" * 600).startswith("500 5.5.2")
    client.close()
    assert running_mta.queue_list() == []


def test_metrics_count_what_happened(running_mta: Mta) -> None:
    send(running_mta)
    client = RawSmtp(running_mta.port, source="127.0.0.3")
    client.hello("x.test")
    client.command("MAIL FROM:<a@x.test>")
    client.command("RCPT TO:<b@example.net>")
    client.close()
    text = running_mta.metrics()
    assert "mta_messages_received_total 1.0" in text
    assert 'mta_messages_rejected_total{reason="relay_denied"} 1.0' in text
    assert "mta_spool_messages 1.0" in text
    assert 'mta_dkim_messages_total{result="signed"} 1.0' in text
    assert re.search(r"mta_spool_commit_seconds_count [1-9]", text)
    assert re.search(r"mta_dkim_sign_seconds_count 1\.0", text)
    ready = f"http://127.0.0.1:{running_mta.metrics_port}/readyz"
    with urllib.request.urlopen(ready, timeout=5) as response:
        assert response.status == 200 and response.read() == b"ready\n"
