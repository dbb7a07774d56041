"""The session's hard error limit, NUL in DATA, and a second STARTTLS (issue 20,
items 5, 9 and 7), on a Session over an in-memory transport: counts and replies.

The real daemon is driven through the same cases in
tests/reliability/test_hostile_protocol.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiosmtpd.smtp import Envelope
from prometheus_client import REGISTRY

from mta.config import ServerConfig
from mta.inbound import reply_texts
from mta.inbound.server import HARD_ERROR_LIMIT, Session, Sessions
from tests.harness.memory_transport import MemoryTransport
from tests.harness.poll import loop_turns

MESSAGE = b"From: app@example.test\r\nSubject: hello\r\n\r\nHello.\r\n"
TOO_MANY_ERRORS = "421 4.7.0 mta.test Error: too many errors"


class Handler:
    """Refuses recipients named bad*, takes two others at most, queues every message."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None:
            self.config = dataclasses.replace(ServerConfig(), hard_error_limit=limit)
        self.rcpts = 0
        self.messages = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.rcpts += 1
        if address.startswith("bad"):
            return reply_texts.relay_denied(address)
        if len(envelope.rcpt_tos) >= 2:
            return reply_texts.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        return reply_texts.RECIPIENT_OK

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.messages += 1
        return reply_texts.queued(f"ID{self.messages}")


class Client:
    def __init__(self, session: Session, transport: MemoryTransport) -> None:
        self.session = session
        self.transport = transport

    async def send(self, data: bytes) -> list[str]:
        """Feed ``data``; the replies written for it."""
        self.session.data_received(data)
        await loop_turns(100)
        replies = bytes(self.transport.written).decode().split("\r\n")[:-1]
        self.transport.written.clear()
        return replies

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()


async def connect(handler: Any) -> Client:
    session = Session(handler, Sessions(10, 10), hostname="mta.test")
    transport = MemoryTransport(asyncio.get_running_loop())
    transport.protocol = session
    session.connection_made(transport)
    client = Client(session, transport)
    assert (await client.send(b""))[0].startswith("220 mta.test")
    assert (await client.send(b"EHLO client.test\r\n"))[-1] == "250 HELP"
    return client


def rcpts(*names: str) -> bytes:
    return b"".join(f"RCPT TO:<{name}@example.net>\r\n".encode() for name in names)


def rejected(reason: str) -> float:
    value = REGISTRY.get_sample_value("mta_messages_rejected_total", {"reason": reason})
    return value or 0.0


# --- the hard error limit ---


def test_the_limit_th_error_is_followed_by_421_and_nothing_pipelined_after_it_runs() -> None:
    handler = Handler(limit=3)
    before = rejected("too_many_errors")

    async def main() -> tuple[list[str], bool]:
        client = await connect(handler)
        assert await client.send(b"MAIL FROM:<app@example.test>\r\n") == ["250 2.0.0 OK"]
        bad = [f"bad{number}" for number in range(10)]
        replies = await client.send(rcpts(*bad) + b"MAIL FROM:<x@example.test>\r\nNOOP\r\n")
        return replies, client.closed

    replies, closed = asyncio.run(main())
    assert [reply[:9] for reply in replies[:3]] == ["554 5.7.1"] * 3
    assert replies[3:] == [TOO_MANY_ERRORS]
    assert closed
    assert handler.rcpts == 3, (
        handler.rcpts
    )  # the seven RCPTs pipelined after the third were never run
    assert rejected("too_many_errors") == before + 1


def test_every_kind_of_error_reply_counts() -> None:
    handler = Handler(limit=4)

    async def main() -> list[str]:
        client = await connect(handler)
        replies = await client.send(b"RCPT TO:<a@example.net>\r\n")  # 503: no MAIL
        replies += await client.send(b"MAIL\r\n")  # 501: no address
        replies += await client.send(b"MAIL FROM:<app@example.test>\r\n" + rcpts("bad"))
        replies += await client.send(b"DATA\r\n")  # 503: no recipient
        return replies

    replies = asyncio.run(main())
    assert [reply[:3] for reply in replies] == ["503", "501", "250", "554", "503", "421"]
    assert replies[-1] == TOO_MANY_ERRORS


def test_a_queued_message_forgives_the_errors_before_it() -> None:
    handler = Handler(limit=3)

    async def main() -> tuple[list[str], bool, list[str]]:
        client = await connect(handler)
        first = await client.send(
            b"MAIL FROM:<app@example.test>\r\n"
            + rcpts("bad1", "bad2", "good")
            + b"DATA\r\n"
            + MESSAGE
            + b".\r\n"
            + b"MAIL FROM:<app@example.test>\r\n"
            + rcpts("bad3", "bad4")
        )
        still_open = not client.closed
        return first, still_open, await client.send(rcpts("bad5", "bad6"))

    first, still_open, last = asyncio.run(main())
    assert [reply[:3] for reply in first] == ["250", "554", "554", "250", "354", "250"] + [
        "250",
        "554",
        "554",
    ]
    assert still_open  # two errors, a message, two errors: never three in a row
    assert [reply[:3] for reply in last] == ["554", "421"]


def test_recipients_past_max_recipients_do_not_count() -> None:
    handler = Handler(limit=3)

    async def main() -> tuple[list[str], bool]:
        client = await connect(handler)
        names = ["one", "two"] + [f"more{number}" for number in range(20)] + ["bad"]
        replies = await client.send(b"MAIL FROM:<app@example.test>\r\n" + rcpts(*names))
        return replies, client.closed

    replies, closed = asyncio.run(main())
    assert replies[3:-1] == [reply_texts.TOO_MANY_RECIPIENTS] * 20
    assert replies[-1].startswith("554 5.7.1") and not closed


def test_a_session_without_a_server_configuration_has_postfixs_default() -> None:
    assert HARD_ERROR_LIMIT == 20 == ServerConfig().hard_error_limit

    async def main() -> tuple[list[str], bool]:
        client = await connect(object())
        replies = await client.send(b"RCPT TO:<a@example.net>\r\n" * 25)
        return replies, client.closed

    replies, closed = asyncio.run(main())
    assert [reply[:3] for reply in replies] == ["503"] * 20 + ["421"]
    assert closed


# --- NUL in DATA ---


def test_nul_in_message_data_is_refused_and_counted() -> None:
    handler = Handler()
    before = rejected("nul_character")
    cases = [
        MESSAGE + b"one\r\n\x00.\r\nMAIL FROM:<smuggled@example.test>\r\n",
        b"From: app@example.test\r\nSubject: a\x00b\r\n\r\nHello.\r\n",
        MESSAGE + b"\x00",
    ]

    async def main() -> list[list[str]]:
        client = await connect(handler)
        answers = []
        for data in cases:
            answers.append(
                await client.send(
                    b"MAIL FROM:<app@example.test>\r\n"
                    + rcpts("good")
                    + b"DATA\r\n"
                    + data
                    + b"\r\n.\r\n"
                )
            )
        answers.append(await client.send(b"NOOP\r\n"))
        return answers

    answers = asyncio.run(main())
    for answer in answers[:-1]:
        assert answer[-1] == reply_texts.NUL_IN_DATA
        assert answer[-1] == "550 5.6.0 Error: NUL character in message data (RFC 5322 3.5)"
    assert answers[-1] == ["250 2.0.0 OK"]  # the session goes on
    assert handler.messages == 0
    assert rejected("nul_character") == before + len(cases)


# --- STARTTLS inside TLS ---


def test_a_second_starttls_gets_503() -> None:
    async def main() -> list[str]:
        client = await connect(Handler())
        assert client.session.session is not None
        client.session.session.ssl = {"cipher": "as after a STARTTLS"}
        return await client.send(b"STARTTLS\r\nNOOP\r\n")

    assert asyncio.run(main()) == ["503 5.5.1 Error: TLS already active", "250 2.0.0 OK"]
