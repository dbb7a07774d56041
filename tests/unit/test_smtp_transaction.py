"""The SMTP client's mail transactions (mta.outbound.smtp_transaction), sans-IO:
what is written for a message, byte for byte; which recipient gets which
reply; when the next address is tried; whether the connection may be reused.

Servers here are lists of what they say, read with mta.outbound.wire's
ReplyParser; what only a real peer can show (sockets, TLS, timeouts, the
pool) is in tests/integration/test_client.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mta.mail.reply import Reply
from mta.outbound.smtp_client import format_relay
from mta.outbound.smtp_transaction import (
    ClientSession,
    Stale,
    Unavailable,
    address_problem,
    mail_parameters,
    refused,
    temporary,
)
from mta.outbound.wire import Garbled, Lost, ReplyParser

RELAY = "mx.example.test[192.0.2.1]:25"
PIPELINING = {"pipelining": "", "8bitmime": ""}
LOCKSTEP = {"8bitmime": ""}
BOTH = pytest.mark.parametrize("offered", [LOCKSTEP, PIPELINING], ids=["lockstep", "pipelining"])
MESSAGE = b"From: App <app@example.test>\r\nSubject: hello\r\n\r\n.dot\r\nlast line\r\n"
SENT = MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"  # as written after 354

OK, QUEUED, GO = b"250 2.1.0 Ok\r\n", b"250 2.0.0 Ok: queued\r\n", b"354 go ahead\r\n"
NO_SUCH_USER = b"550 5.1.1 no such user\r\n"

ServerSays = bytes | Lost | Garbled | TimeoutError  # a reply, or why none came


def mail(sender: str = "app@example.test", parameters: bytes = b"") -> bytes:
    return b"MAIL FROM:<%s>%s\r\n" % (sender.encode(), parameters)


def rcpt(*rcpts: str) -> bytes:
    return b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)


def converse(
    session: ClientSession,
    rcpts: Sequence[str],
    server: Sequence[ServerSays],
    sender: str = "app@example.test",
    data: bytes = MESSAGE,
) -> list[bytes]:
    """One transaction against a server that says ``server`` in turn: every write."""
    writes = [session.begin(RELAY, sender, list(rcpts), data)]
    for said in server:
        assert not session.done, f"the client did not wait for {said!r}"
        if isinstance(said, bytes):
            (reply,) = ReplyParser().feed(said)
            writes.append(session.receive(reply))
        else:
            session.broken(said)
    assert session.done, "the client still waits for a reply"
    return [write for write in writes if write]


def texts(session: ClientSession) -> dict[str, str]:
    return {rcpt: str(reply) for rcpt, reply in session.replies.items()}


# --- delivering ---


def test_pipelining_sends_the_envelope_and_data_in_one_write() -> None:
    session = ClientSession({"pipelining": "", "size": "1000000"})
    writes = converse(session, ["a@example.net", "b@example.net"], [OK, OK, OK, GO, QUEUED])
    assert writes == [
        mail(parameters=b" SIZE=%d" % len(MESSAGE))
        + rcpt("a@example.net", "b@example.net")
        + b"DATA\r\n",
        SENT,
    ]
    assert texts(session) == dict.fromkeys(
        ["a@example.net", "b@example.net"], "250 2.0.0 Ok: queued"
    )
    assert not session.needs_rset and not session.must_close
    assert session.transactions == 1


def test_lockstep_waits_for_each_reply() -> None:
    session = ClientSession(LOCKSTEP)
    writes = converse(session, ["a@example.net", "b@example.net"], [OK, OK, OK, GO, QUEUED])
    assert writes == [mail(), rcpt("a@example.net"), rcpt("b@example.net"), b"DATA\r\n", SENT]
    assert set(texts(session).values()) == {"250 2.0.0 Ok: queued"}


def test_null_sender_and_the_longer_wait_for_data() -> None:
    session = ClientSession(LOCKSTEP)
    assert session.begin(RELAY, "", ["a@example.net"], MESSAGE) == b"MAIL FROM:<>\r\n"
    waits = []
    for said in [OK, OK, GO, QUEUED]:
        waits.append(session.awaiting_data)
        (reply,) = ReplyParser().feed(said)
        session.receive(reply)
    assert waits == [False, False, True, True]  # command_timeout, then data_timeout


@BOTH
def test_some_recipients_refused(offered: dict[str, str]) -> None:
    session = ClientSession(offered)
    rcpts = ["good1@example.net", "bad2@example.net", "good3@example.net"]
    writes = converse(session, rcpts, [OK, OK, NO_SUCH_USER, OK, GO, QUEUED])
    assert texts(session) == {
        "good1@example.net": "250 2.0.0 Ok: queued",
        "bad2@example.net": "550 5.1.1 no such user",
        "good3@example.net": "250 2.0.0 Ok: queued",
    }
    assert writes[-1] == SENT and not session.needs_rset


@BOTH
def test_no_recipient_accepted_resets(offered: dict[str, str]) -> None:
    session = ClientSession(offered)
    rcpts = ["bad1@example.net", "bad2@example.net"]
    if offered is PIPELINING:
        server = [OK, NO_SUCH_USER, NO_SUCH_USER, b"554 5.5.1 no valid recipients\r\n", OK]
        expected = [mail() + rcpt(*rcpts) + b"DATA\r\n", b"RSET\r\n"]
    else:
        server = [OK, NO_SUCH_USER, NO_SUCH_USER, OK]
        expected = [mail(), rcpt(rcpts[0]), rcpt(rcpts[1]), b"RSET\r\n"]
    assert converse(session, rcpts, server) == expected
    assert texts(session) == dict.fromkeys(rcpts, "550 5.1.1 no such user")
    assert not session.needs_rset and not session.must_close


def test_pipelined_data_accepted_without_recipients_is_ended_and_reset() -> None:
    """RFC 2920 3.1: a server may answer 354 to a pipelined DATA although it
    refused every recipient; the client ends the (empty) data and resets."""
    session = ClientSession(PIPELINING)
    writes = converse(session, ["a@example.net"], [OK, NO_SUCH_USER, GO, QUEUED, OK])
    assert writes == [mail() + rcpt("a@example.net") + b"DATA\r\n", b".\r\n", b"RSET\r\n"]
    assert texts(session) == {"a@example.net": "550 5.1.1 no such user"}


@BOTH
def test_mail_refused_is_every_recipients_answer(offered: dict[str, str]) -> None:
    session = ClientSession(offered)
    refusal = b"500 5.3.0 Error: command failed\r\n"
    rcpts = ["a@x.test", "b@x.test"]
    if offered is PIPELINING:
        bad_sequence = b"503 5.5.1 need MAIL\r\n"
        writes = converse(session, rcpts, [refusal, bad_sequence, bad_sequence, bad_sequence])
        assert writes == [mail() + rcpt(*rcpts) + b"DATA\r\n"]
    else:
        assert converse(session, rcpts, [refusal]) == [mail()]
    assert texts(session) == dict.fromkeys(rcpts, "500 5.3.0 Error: command failed")
    # Not reset now: the next transaction starts with RSET.
    assert session.needs_rset and not session.must_close


@BOTH
@pytest.mark.parametrize(
    ("to_data", "to_message"),
    [
        (b"450 4.3.0 not now\r\n", None),
        (GO, b"450 4.3.0 not now\r\n"),
        (GO, b"500 5.3.0 Error: command failed\r\n"),
    ],
)
def test_data_refused(offered: dict[str, str], to_data: bytes, to_message: bytes | None) -> None:
    session = ClientSession(offered)
    rcpts = ["a@x.test", "b@x.test"]
    server = [OK, OK, OK, to_data] + ([to_message] if to_message else [])
    converse(session, rcpts, server)
    refusal = (to_message or to_data).decode().strip()
    assert texts(session) == dict.fromkeys(rcpts, refusal)
    assert session.needs_rset and not session.must_close


def test_a_refused_transaction_is_reset_before_the_next() -> None:
    session = ClientSession(PIPELINING)
    converse(session, ["bad@x.test", "good1@x.test"], [OK, NO_SUCH_USER, OK, GO, QUEUED])
    assert not session.needs_rset  # delivered: no RSET after
    refusal = b"550 5.7.1 <bad@x.test>: Sender address rejected: not today\r\n"
    bad = b"503 5.5.1 need MAIL\r\n"
    converse(session, ["good2@x.test"], [refusal, bad, bad], sender="bad@x.test")
    assert str(session.replies["good2@x.test"]).startswith("550 5.7.1 <bad@x.test>")
    writes = converse(session, ["good3@x.test"], [OK, OK, OK, GO, QUEUED])
    assert writes[:2] == [b"RSET\r\n", mail() + rcpt("good3@x.test") + b"DATA\r\n"]
    assert session.replies["good3@x.test"].code == 250
    assert session.transactions == 3


# --- what the server offers ---


def test_size_and_8bitmime_when_offered() -> None:
    eight_bit = MESSAGE.replace(b"hello", "Grüße".encode())
    offered = {"size": "", "8bitmime": ""}
    first = converse(ClientSession(offered), ["a@x.test"], [OK, OK, GO, QUEUED], data=eight_bit)
    assert first[0] == mail(parameters=b" SIZE=%d BODY=8BITMIME" % len(eight_bit))
    second = converse(ClientSession(offered), ["a@x.test"], [OK, OK, GO, QUEUED])
    assert second[0] == mail(parameters=b" SIZE=%d" % len(MESSAGE))  # 7-bit data: no BODY


def test_smtputf8_when_an_address_needs_it() -> None:
    session = ClientSession({"smtputf8": ""})
    writes = converse(session, ["jürgen@example.net"], [OK, OK, GO, QUEUED])
    assert writes[0] == b"MAIL FROM:<app@example.test> SMTPUTF8\r\n"
    assert writes[1] == "RCPT TO:<jürgen@example.net>\r\n".encode()


def test_addresses_a_server_cannot_take_are_answered_here() -> None:
    session = ClientSession(PIPELINING)
    rcpts = ["jürgen@example.net", "a@b\r\nRCPT TO:<c@d>", "ok@example.net"]
    writes = converse(session, rcpts, [OK, OK, GO, QUEUED])
    assert writes[0] == mail() + rcpt("ok@example.net") + b"DATA\r\n"
    assert session.replies["jürgen@example.net"].status == "5.6.7"
    assert session.replies["a@b\r\nRCPT TO:<c@d>"].code == 553
    assert list(session.replies) == [rcpts[0], rcpts[1], "ok@example.net"]


def test_an_unsendable_sender_sends_nothing() -> None:
    session = ClientSession(PIPELINING)
    assert converse(session, ["a@x.test", "b@x.test"], [], sender="jürgen@x.test") == []
    assert {reply.status for reply in session.replies.values()} == {"5.6.7"}
    assert session.transactions == 0 and not session.needs_rset


# --- 421, and no reply at all ---


@BOTH
@pytest.mark.parametrize(("at", "name"), [(0, "MAIL FROM"), (1, "RCPT TO"), (2, "DATA")])
def test_421_tries_the_next_address(offered: dict[str, str], at: int, name: str) -> None:
    session = ClientSession(offered)
    server = [OK, OK, GO][:at] + [b"421 4.3.2 shutting down\r\n"]
    with pytest.raises(Unavailable) as raised:
        converse(session, ["a@x.test"], server)
    reply = raised.value.reply
    assert raised.value.relay == RELAY
    assert reply.code == 451 and reply.status == "4.3.2"
    assert reply.text == f"4.3.2 host {RELAY} said: 421 4.3.2 shutting down (in reply to {name})"


@pytest.mark.parametrize(
    ("failure", "words"),
    [
        (Lost("connection closed by the server"), "lost connection with"),
        (TimeoutError(), "timed out while sending RCPT TO"),
        (Garbled("2x0 what"), "malformed reply (in reply to RCPT TO): 2x0 what"),
    ],
)
def test_no_answer_before_data_tries_the_next_address(failure: ServerSays, words: str) -> None:
    session = ClientSession(LOCKSTEP)
    with pytest.raises(Unavailable) as raised:
        converse(session, ["a@x.test"], [OK, failure])
    assert raised.value.reply.code == 451 and words in raised.value.reply.text


@BOTH
@pytest.mark.parametrize(
    ("server", "status", "words"),
    [
        ([GO, TimeoutError()], "4.4.2", "timed out while sending the message"),
        ([GO, Lost("closed")], "4.4.2", "lost connection with"),
        ([GO, Garbled("what?")], "4.5.0", "malformed reply (in reply to DATA): what?"),
        ([b"250 2.0.0 ok\r\n"], "4.5.0", "malformed reply (in reply to DATA): 250 2.0.0 ok"),
        ([GO, GO], "4.5.0", "malformed reply (in reply to DATA): 354 go ahead"),
    ],
)
def test_no_answer_from_data_on_is_temporary_and_closes(
    offered: dict[str, str], server: list[ServerSays], status: str, words: str
) -> None:
    """The message may have arrived: no next address (a second copy), and the
    connection's state is unknown."""
    session = ClientSession(offered)
    converse(session, ["a@x.test", "b@x.test"], [OK, OK, OK, *server])
    assert {reply.status for reply in session.replies.values()} == {status}
    assert all(words in reply.text and reply.code == 451 for reply in session.replies.values())
    assert session.must_close


@pytest.mark.parametrize("to_rset", [TimeoutError(), b"421 4.3.2 shutting down\r\n"])
def test_a_failed_reset_leaves_the_replies(to_rset: ServerSays) -> None:
    session = ClientSession(LOCKSTEP)
    converse(session, ["a@x.test"], [OK, NO_SUCH_USER, to_rset])
    assert texts(session) == {"a@x.test": "550 5.1.1 no such user"}
    assert session.needs_rset  # reset before the next transaction, if the connection lives


@pytest.mark.parametrize("first", [b"421 4.4.2 idle too long\r\n", Lost("closed")])
def test_a_reused_connection_dead_on_its_first_command_is_stale(first: ServerSays) -> None:
    session = ClientSession(PIPELINING)
    session.untested = True
    with pytest.raises(Stale):
        converse(session, ["a@x.test"], [first])


def test_a_reused_connection_heard_from_is_not_stale() -> None:
    session = ClientSession(PIPELINING)
    session.untested = True
    with pytest.raises(Unavailable):
        converse(session, ["a@x.test"], [OK, b"421 4.3.2 shutting down\r\n"])
    assert not session.untested


def test_reset_first_counts_as_the_first_command() -> None:
    session = ClientSession(LOCKSTEP)
    session.needs_rset = session.untested = True
    with pytest.raises(Stale):
        converse(session, ["a@x.test"], [Lost("closed")])


# --- the texts of replies we make up ---


def test_relay_is_postfix_style() -> None:
    assert format_relay("mx1.example.test", "192.0.2.1", 25) == "mx1.example.test[192.0.2.1]:25"


def test_temporary_reply() -> None:
    reply = temporary("4.4.1", "connect to mx[192.0.2.1]:25: Connection refused")
    assert str(reply) == "451 4.4.1 connect to mx[192.0.2.1]:25: Connection refused"
    assert reply.status == "4.4.1"


def test_refusal_to_talk_is_made_temporary_keeping_the_detail() -> None:
    reply = refused("mx[192.0.2.1]:25", Reply(554, "5.7.1 go away"), "the greeting")
    assert reply.code == 451
    assert reply.status == "4.7.1"
    assert (
        reply.text
        == "4.7.1 host mx[192.0.2.1]:25 said: 554 5.7.1 go away (in reply to the greeting)"
    )


def test_refusal_without_enhanced_code() -> None:
    reply = refused("mx[192.0.2.1]:25", Reply(421, "closing"), "MAIL FROM")
    assert reply.status == "4.0.0"
    assert "said: 421 closing (in reply to MAIL FROM)" in reply.text


def test_mail_parameters() -> None:
    seven, eight = b"a\r\n", "é\r\n".encode()
    assert mail_parameters({}, eight, smtputf8=False) == []
    assert mail_parameters({"size": "1000"}, seven, smtputf8=False) == [b"SIZE=3"]
    assert mail_parameters({"8bitmime": ""}, seven, smtputf8=False) == []
    assert mail_parameters({"size": "", "8bitmime": ""}, eight, smtputf8=True) == [
        b"SIZE=4",
        b"BODY=8BITMIME",
        b"SMTPUTF8",
    ]


def test_address_problems() -> None:
    relay = "mx[192.0.2.1]:25"
    assert address_problem("user@example.net", smtputf8_offered=False, relay=relay) is None
    assert address_problem("", smtputf8_offered=False, relay=relay) is None  # null sender
    assert address_problem("jürgen@example.net", smtputf8_offered=True, relay=relay) is None
    utf8 = address_problem("jürgen@example.net", smtputf8_offered=False, relay=relay)
    assert utf8 is not None and utf8.status == "5.6.7"
    injected = address_problem("a@b\r\nRCPT TO:<c@d>", smtputf8_offered=True, relay=relay)
    assert injected is not None and injected.code == 553 and "\r" not in injected.text
