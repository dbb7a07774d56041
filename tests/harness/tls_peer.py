"""A receiving SMTP server for outbound TLS tests.

It offers STARTTLS with the server context it is given, or, given none, no
STARTTLS at all (what a receiver looks like through a man in the middle who
strips it), and records each message it accepts with whether it came over
TLS, and how many connections it had. It speaks just enough SMTP for our
client, in its own thread and event loop (tests/harness/threaded_server.py).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from tests.harness.poll import eventually
from tests.harness.threaded_server import ThreadedServer


@dataclass(frozen=True)
class Arrived:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool


class TlsPeer(ThreadedServer):
    def __init__(self, host: str, tls: ssl.SSLContext | None, port: int = 0) -> None:
        super().__init__(host, port)
        self.tls = tls
        self.connections = 0
        self.arrived: list[Arrived] = []

    def wait_for(self, subject: str, timeout: float = 15.0) -> Arrived:
        """The message with ``subject``, once it has arrived."""

        def arrived() -> Arrived | None:
            return next((m for m in list(self.arrived) if _has_subject(m, subject)), None)

        return eventually(arrived, timeout, f"{subject!r} at {self.host}:{self.port}")

    def copies(self, subject: str) -> list[Arrived]:
        return [m for m in list(self.arrived) if _has_subject(m, subject)]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._converse(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # ssl.SSLError is an OSError: a client that gave up on the handshake
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        encrypted = False
        sender, recipients = "", list[str]()
        writer.write(b"220 peer.test ESMTP\r\n")
        while line := await reader.readline():
            words = line.split()
            verb = words[0].upper() if words else b""
            if verb == b"EHLO":
                offer = b"250-STARTTLS\r\n" if self.tls and not encrypted else b""
                reply = b"250-peer.test\r\n" + offer + b"250 8BITMIME\r\n"
            elif verb == b"STARTTLS" and self.tls and not encrypted:
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                await writer.start_tls(self.tls)
                encrypted, sender, recipients = True, "", []
                continue
            elif verb == b"MAIL":
                sender, recipients = _address(line), []
                reply = b"250 2.1.0 Ok\r\n"
            elif verb == b"RCPT":
                recipients.append(_address(line))
                reply = b"250 2.1.5 Ok\r\n"
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = await _data(reader)
                self.arrived.append(Arrived(sender, tuple(recipients), data, encrypted))
                reply = b"250 2.0.0 Ok: queued\r\n"
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                reply = b"250 2.0.0 Ok\r\n" if verb in (b"RSET", b"NOOP") else b"502 5.5.2 No\r\n"
            writer.write(reply)
            await writer.drain()


async def _data(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while (line := await reader.readline()) != b".\r\n":
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(lines)


def _address(line: bytes) -> str:
    return line.partition(b":")[2].strip().partition(b" ")[0].strip(b"<>").decode()


def _has_subject(message: Arrived, subject: str) -> bool:
    return f"Subject: {subject}".encode() in message.data
