"""Reply coalescing: replies to pipelined commands come back in one write, in order.

Against a real `mta serve`: loopback delivers one write as one segment, so
the replies must all be in the first recv that returns anything. That cannot
fail reliably without coalescing (a fast server's separate writes may also
pile up in the client's socket before it reads), so the number of writes is
also counted exactly, on a Session over an in-memory transport.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult

from mta.inbound import reply_texts
from mta.inbound.server import HELD_OCTETS, HELD_REPLIES, Session, Sessions
from tests.harness.client import RawSmtp
from tests.harness.memory_transport import MemoryTransport
from tests.harness.mta import Mta

pytestmark = pytest.mark.integration

MESSAGE = (
    b"From: App <app@example.test>\r\n"
    b"To: user@example.net\r\n"
    b"Subject: pipelined\r\n"
    b"\r\n"
    b"Sent after pipelined MAIL, RCPT and DATA.\r\n"
)
ENVELOPE = b"MAIL FROM:<app@example.test>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mta]:
    """One `mta serve` for the module: these tests only talk to it."""
    instance = Mta(Path(tmp_path_factory.mktemp("coalescing")))
    instance.start()
    yield instance
    if instance.process is not None:
        assert instance.stop() == 0, instance.log()


def first_reads(sock: socket.socket, until: bytes, timeout: float = 10.0) -> list[bytes]:
    """Every recv's bytes until ``until`` has arrived (bounded by ``timeout``)."""
    sock.settimeout(timeout)
    reads: list[bytes] = []
    deadline = time.monotonic() + timeout
    while until not in b"".join(reads):
        assert time.monotonic() < deadline, reads
        chunk = sock.recv(65536)
        assert chunk, f"closed after {reads!r}"
        reads.append(chunk)
    return reads


def codes(data: bytes) -> list[str]:
    """The code of every reply (last lines only) in ``data``."""
    lines = data.decode().split("\r\n")[:-1]
    return [line[:3] for line in lines if line[3:4] == " "]


def greeted(server: Mta) -> RawSmtp:
    client = RawSmtp(server.port)
    assert client.reply().startswith("220 ")
    return client


def test_pipelined_envelope_replies_come_in_one_write(server: Mta) -> None:
    client = greeted(server)
    assert client.command("EHLO client.test").startswith("250-")
    client.send(ENVELOPE)
    reads = first_reads(client.sock, b"\r\n354 ")
    assert codes(b"".join(reads)) == ["250", "250", "354"]
    assert len(reads) == 1, reads  # one write: 250, 250 and 354 together
    client.send(MESSAGE + b".\r\n")
    queued = client.reply()
    assert queued.startswith("250 2.0.0 Ok: queued as "), queued
    queue_id = queued.rsplit(" ", 1)[1]
    assert client.command("QUIT").startswith("221")
    client.close()
    rows = [row for row in server.queue_list() if row["id"] == queue_id]
    assert [row["recipients"] for row in rows] == [["user@example.net"]]
    assert b"Sent after pipelined MAIL, RCPT and DATA." in server.raw_message(queue_id)


def test_ehlo_reply_comes_in_one_write(server: Mta) -> None:
    client = greeted(server)
    client.send(b"EHLO client.test\r\n")
    reads = first_reads(client.sock, b"\r\n250 ")
    assert len(reads) == 1, reads
    lines = reads[0].decode().split("\r\n")
    assert lines[0] == "250-mta.test" and lines[-2].startswith("250 ") and lines[-1] == ""
    assert "250-PIPELINING" in lines
    client.close()


def test_ehlo_with_pipelined_commands_after_it(server: Mta) -> None:
    client = greeted(server)
    client.send(b"EHLO client.test\r\nRSET\r\nMAIL FROM:<app@example.test>\r\n")
    reads = first_reads(client.sock, b"\r\n250 2.1.0")
    data = b"".join(reads)
    assert data.startswith(b"250-mta.test\r\n")
    assert codes(data) == ["250", "250", "250"]
    assert data.endswith(b"250 2.0.0 OK\r\n250 2.1.0 Ok\r\n")
    assert len(reads) == 1, reads
    client.close()


@pytest.mark.parametrize("count", [5, 1000])
def test_many_pipelined_commands_get_every_reply_in_order(server: Mta, count: int) -> None:
    """1000 replies: more than are ever held at once, so several writes, none lost."""
    client = greeted(server)
    assert client.command("EHLO client.test").startswith("250-")
    # Alternate replies, so a lost or repeated one would show: 250 and 252 (not
    # errors, which [server] hard_error_limit would end the session at).
    commands = [b"RSET\r\n" if i % 2 else b"VRFY <u%d@example.net>\r\n" % i for i in range(count)]
    client.send(b"".join(commands))
    replies = [client.reply()[:3] for _ in range(count)]
    assert replies == ["250" if i % 2 else "252" for i in range(count)]
    assert client.command("QUIT").startswith("221")
    assert client.reply() == ""  # closed, nothing after the 221
    client.close()


def test_client_waiting_for_each_reply_gets_each(server: Mta) -> None:
    client = greeted(server)
    for line, reply in [
        ("EHLO client.test", "250-mta.test"),
        ("NOOP", "250 2.0.0 OK"),
        ("MAIL FROM:<app@example.test>", "250 2.1.0 Ok"),
        ("RCPT TO:<user@example.net>", "250 2.1.5 Ok"),
        ("DATA", "354 "),
    ]:
        # Each reply must come without the client sending anything more.
        assert client.command(line).startswith(reply), line
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    assert client.command("QUIT").startswith("221")
    client.close()


def test_quit_pipelined_after_the_message(server: Mta) -> None:
    """The 250 for the message and the 221 both arrive, in order, before the close."""
    client = greeted(server)
    assert client.command("EHLO client.test").startswith("250-")
    client.send(ENVELOPE)
    assert [client.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    client.send(MESSAGE + b".\r\nQUIT\r\nNOOP\r\n")  # the NOOP after QUIT: never answered
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    assert client.reply().startswith("221")
    assert client.reply() == ""
    client.close()


def test_refusals_in_a_pipelined_batch_keep_their_place(server: Mta) -> None:
    client = greeted(server)
    assert client.command("EHLO client.test").startswith("250-")
    client.send(
        b"RCPT TO:<user@example.net>\r\n"  # 503: no MAIL yet
        b"MAIL FROM:<app@example.test>\r\n"
        b"BOGUS\r\n"  # 500: unknown command
        b"RCPT TO:<user@example.net>\r\n"
        b"RSET\r\n"
    )
    replies = [client.reply()[:3] for _ in range(5)]
    assert replies == ["503", "250", "500", "250", "250"]
    client.close()


def test_starttls_after_pipelined_commands(server: Mta) -> None:
    """Replies held before STARTTLS go out with its 220, in clear; the TLS session works."""
    client = greeted(server)
    client.send(b"EHLO client.test\r\nNOOP\r\nSTARTTLS\r\n")
    reads = first_reads(client.sock, b"\r\n220 ")
    assert codes(b"".join(reads)) == ["250", "250", "220"]
    assert len(reads) == 1, reads
    context = ssl._create_unverified_context()
    client.sock = context.wrap_socket(client.sock, server_hostname="mta.test")
    client.buffer = b""
    assert client.command("EHLO client.test").startswith("250-")
    client.send(ENVELOPE)
    assert [client.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    client.close()


# --- the number of writes, on a Session without a socket ----------------------


class CountingTransport(MemoryTransport):
    """Every write, one item each; a write after close() fails the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Session) -> None:
        super().__init__(loop)
        self.protocol = session
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        assert not self.closed.is_set(), f"written after close: {bytes(data)!r}"
        self.writes.append(bytes(data))


class SlowNoop:
    """A handler whose NOOP waits for ``release``: replies held meanwhile stay held."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        await self.release.wait()
        return "250 OK"


async def settle() -> None:
    for _ in range(50):  # no handler hook does I/O here: a few loop turns suffice
        await asyncio.sleep(0)


async def start(handler: Any = None) -> tuple[Session, CountingTransport]:
    session = Session(
        handler or object(),
        Sessions(10, 10),
        hostname="mta.test",
        auth_require_tls=False,
        authenticator=lambda *args: AuthResult(success=False),
    )
    transport = CountingTransport(asyncio.get_running_loop(), session)
    session.connection_made(transport)
    await settle()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"220 mta.test")
    transport.writes.clear()
    return session, transport


async def feed(session: Session, data: bytes) -> None:
    session.data_received(data)
    await settle()


def test_writes_pipelined_transaction() -> None:
    async def run() -> list[bytes]:
        session, transport = await start()
        await feed(session, b"EHLO client.test\r\n")
        await feed(session, ENVELOPE)
        await feed(session, MESSAGE + b".\r\nQUIT\r\n")
        assert transport.closed.is_set()
        return transport.writes

    ehlo, envelope, end = asyncio.run(run())
    assert ehlo.startswith(b"250-mta.test\r\n") and codes(ehlo) == ["250"]
    assert envelope == b"250 2.0.0 OK\r\n" * 2 + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert end == b"250 2.0.0 OK\r\n221 2.0.0 Bye\r\n"


def test_writes_one_command_at_a_time() -> None:
    async def run() -> list[bytes]:
        session, transport = await start()
        for line in [b"EHLO c.test", b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA"]:
            await feed(session, line + b"\r\n")
        await feed(session, MESSAGE + b".\r\n")
        await feed(session, b"QUIT\r\n")
        return transport.writes

    writes = asyncio.run(run())
    assert [codes(write) for write in writes] == [
        [code] for code in ("250",) * 3 + ("354", "250", "221")
    ]


def test_held_replies_are_bounded() -> None:
    async def run() -> list[bytes]:
        session, transport = await start()
        await feed(session, b"RSET\r\n" * 1000)
        return transport.writes

    writes = asyncio.run(run())
    assert b"".join(writes) == b"250 2.0.0 OK\r\n" * 1000
    assert all(write.count(b"\r\n") <= HELD_REPLIES for write in writes)
    assert all(len(write) <= HELD_OCTETS + 512 for write in writes)
    assert len(writes) <= 1000 // HELD_REPLIES + 1


def test_close_with_writes_held_replies_first() -> None:
    """A shutdown (or idle timeout) while replies are held: they go out before its 421."""

    async def run() -> list[bytes]:
        handler = SlowNoop()
        session, transport = await start(handler)
        await feed(session, b"RSET\r\nNOOP\r\n")  # RSET's reply held: NOOP buffered
        assert transport.writes == []
        session.close_with(reply_texts.SHUTTING_DOWN)
        handler.release.set()  # the NOOP's reply: after the close, never written
        await settle()
        return transport.writes

    assert asyncio.run(run()) == [
        b"250 2.0.0 OK\r\n421 4.3.2 mta.test Service shutting down, closing transmission "
        b"channel\r\n"
    ]


def test_client_eof_writes_held_replies() -> None:
    async def run() -> list[bytes]:
        session, transport = await start(SlowNoop())
        await feed(session, b"RSET\r\nNOOP\r\n")
        session.eof_received()
        await settle()
        return transport.writes

    assert asyncio.run(run()) == [b"250 2.0.0 OK\r\n"]


def test_auth_challenge_is_never_held() -> None:
    """A client that sent its answer too early still gets the 334 before it is read."""

    async def run() -> list[bytes]:
        session, transport = await start()
        await feed(session, b"EHLO c.test\r\n")
        transport.writes.clear()
        await feed(session, b"AUTH LOGIN\r\ndXNlcg==\r\n")  # the user name, too early
        return transport.writes

    # Each challenge alone in its write: the second waits for the password.
    assert asyncio.run(run()) == [b"334 VXNlciBOYW1lAA==\r\n", b"334 UGFzc3dvcmQA\r\n"]


def test_go_ahead_is_never_held() -> None:
    """A client that sends the start of its message before the 354 still gets the 354."""

    async def run() -> list[bytes]:
        session, transport = await start()
        await feed(session, b"EHLO c.test\r\n")
        transport.writes.clear()
        await feed(session, ENVELOPE + b"Subject: early\r\n")  # and waits for the 354
        return transport.writes

    assert asyncio.run(run()) == [
        b"250 2.0.0 OK\r\n" * 2 + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    ]


class MultiLineNoop:
    """A hook that answers with a whole multi-line reply in one string."""

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250-first\r\n250 last"


def test_whole_multi_line_reply_is_not_held() -> None:
    async def run() -> list[bytes]:
        session, transport = await start(MultiLineNoop())
        await feed(session, b"NOOP\r\n")
        return transport.writes

    writes = asyncio.run(run())  # written, not held: the client waits for it
    assert len(writes) == 1 and writes[0].startswith(b"250-first\r\n250 ")
