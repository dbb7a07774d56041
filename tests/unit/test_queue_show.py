"""`mta queue show` and `list` print what clients wrote with its non-printable
characters escaped; --json gives it exactly, JSON-escaped."""

from __future__ import annotations

import io
import json
from dataclasses import replace

from mta.cli.queue import Selection, list_jobs, show
from mta.spool.records import Message
from mta.spool.store import Spool

QID = "06H13HS0N80M1W00AAAAAA"
SUBJECT = "Subject: invoice \x1b]0;owned\x07 \x1b[2J\u009b31m done"
BODY = (
    "Received: from unknown (HELO x) ([10.0.0.5])\r\n"
    "\tby mta.test (mta) with ESMTP id " + QID + ";\r\n"
    "\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    "From: app@example.test\r\n" + SUBJECT + "\r\n"
    "Message-ID: <a\x1b[8m@b>\r\n"
    "\r\n"
    "body\r\n"
).encode()


def add(spool: Spool) -> None:
    message = Message(
        id=QID,
        sender="app@example.test",
        recipients=("user@example.net",),
        arrived=1_700_000_000.0,
        size=len(BODY),
        client="evil\u0085\x1b]0;x\x07 ([10.0.0.5])",
        message_id="<a\x1b[8m@b>",
    )
    with spool.write() as txn:
        spool.add(txn, message, BODY)


def printed(text: str) -> bool:
    """True if ``text`` is lines of printable characters."""
    return all(line.isprintable() for line in text.split("\n"))


def test_show_escapes_terminal_escapes_in_headers_and_envelope(spool: Spool) -> None:
    add(spool)
    out = io.StringIO()
    assert show(spool, QID, False, False, out) == 0
    text = out.getvalue()
    assert printed(text), text
    assert "Subject: invoice \\x1b]0;owned\\x07 \\x1b[2J\\x9b31m done\n" in text
    assert "message-id: <a\\x1b[8m@b>\n" in text
    assert "client:     evil\\x85\\x1b]0;x\\x07 ([10.0.0.5])\n" in text
    # A folded field's continuation lines stay indented, as spaces.
    assert "\n        by mta.test (mta) with ESMTP id" in text


def test_show_json_is_exact_and_ascii(spool: Spool) -> None:
    add(spool)
    out = io.StringIO()
    assert show(spool, QID, False, True, out) == 0
    text = out.getvalue()
    assert text.isascii() and printed(text)
    document = json.loads(text)
    assert SUBJECT in document["headers"]
    assert document["message_id"] == "<a\x1b[8m@b>"


def test_list_escapes_what_remote_servers_replied(spool: Spool) -> None:
    add(spool)
    with spool.write() as txn:
        (job,) = spool.jobs_of(txn, QID)
        spool.put_job(txn, replace(job, last_reply="451 \x1b]0;owned\x07"), old=job)
    out = io.StringIO()
    list_jobs(spool, Selection(), False, out)
    assert printed(out.getvalue())
    assert "(451 \\x1b]0;owned\\x07)" in out.getvalue()
