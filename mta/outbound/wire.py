"""One outgoing SMTP connection on the wire: replies parsed, commands written.

``ReplyParser`` turns the bytes a server sends into complete replies
(mta.mail.reply's ``Reply``, which keeps the raw lines for reading EHLO's
keywords) and does no I/O (h11's model), so it is tested on its own with any
split of the input. ``Wire`` is the asyncio protocol of one connection: every
reply is queued as it arrives, so commands can be pipelined (RFC 2920): write
MAIL FROM, every RCPT TO and DATA at once, then read their replies in order.
``Wire`` knows no SMTP semantics beyond that; which command to send and what
a reply means is mta.outbound.smtp_transaction's business, and connecting is
mta.outbound.smtp_client's.

Reading a reply raises ``Lost`` (the server closed the connection or it
broke), ``TimeoutError``, or ``Garbled`` (a line that is not an SMTP reply,
or a reply too long: the stream is out of step and nothing after it is
read). Replies that arrived before any of these are still returned first,
in order, so a "421 closing" followed by the close is read as the 421.

Why not aiosmtplib, which this project used before: its protocol keeps one
pending reply and drops reply bytes that arrive while none is expected, so it
cannot pipeline, and each command paid for a lock, a regex and a wait_for.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import cast

from mta.mail.reply import Reply

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; servers send longer
# ones, so be generous, but bounded: a server streaming bytes without a line
# end, or endless continuation lines, must not fill our memory.
MAX_LINE = 8192
MAX_REPLY = 64 * 1024
# Replies queued and not yet read: a pipelined group is MAIL, the RCPTs and
# DATA; a server that sends far more than asked is out of step.
MAX_UNREAD = 10_000


class Lost(Exception):
    """The connection was closed or broke."""


class Garbled(Exception):
    """The server sent something that is not an SMTP reply."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _decode(line: bytes | bytearray) -> str:
    return bytes(line).decode("utf-8", "surrogateescape")


class ReplyParser:
    """Bytes in, complete replies out; raises ``Garbled`` and is then done."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []  # of the multi-line reply being read
        self._size = 0  # its octets so far

    def feed(self, data: bytes | bytearray) -> list[Reply]:
        """Every reply ``data`` completes, in order."""
        buffer = self._buffer
        buffer += data
        replies = []
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            reply = self._line(buffer, start, end)
            if reply is not None:
                replies.append(reply)
            start = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            raise Garbled(f"reply line too long: {_decode(buffer[:200])}")
        return replies

    def _line(self, buffer: bytearray, start: int, end: int) -> Reply | None:
        """One line, buffer[start:end+1]: the reply it completes, if it is a last line."""
        if end - start > MAX_LINE:
            raise Garbled(f"reply line too long: {_decode(buffer[start : start + 200])}")
        self._size += end + 1 - start
        if self._size > MAX_REPLY:
            raise Garbled(f"reply too long: {' '.join(self._lines)[:200]}")
        line = buffer[start:end].rstrip(b"\r")
        code, separator = line[:3], line[3:4]
        # ASCII digits only, first 1-9: "2x0", " 25" and "000" are not replies.
        if not (code.isdigit() and code[:1] != b"0" and separator in (b"", b" ", b"-")):
            raise Garbled(_decode(line[:200]))
        self._lines.append(_decode(line[4:]).strip(" \t"))
        if separator == b"-":
            return None
        lines = tuple(self._lines)
        reply = Reply(int(code), "\n".join(lines), lines)
        self._lines = []
        self._size = 0
        return reply


def extensions(ehlo: Reply) -> dict[str, str]:
    """The ESMTP extensions an EHLO reply offers: lowercase keyword -> parameters.

    The first line is the server's name, not an extension (RFC 5321 4.1.1.1).
    """
    offered = {}
    for line in ehlo.lines[1:]:
        keyword, _, parameters = line.partition(" ")
        if keyword:
            offered[keyword.lower()] = parameters.strip()
    return offered


class Wire(asyncio.Protocol):
    """The replies of one connection, queued as they come, and its writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._failure: Exception | None = None  # why no more replies will come
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    async def over(cls, sock: socket.socket) -> Wire:
        """A Wire on a connected socket."""
        _, wire = await asyncio.get_running_loop().create_connection(cls, sock=sock)
        return wire

    @property
    def has_unread(self) -> bool:
        """A reply arrived that no command asked for (yet)."""
        return bool(self._replies)

    @property
    def is_connected(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and self._failure is None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return  # out of step: nothing more is read
        try:
            replies = self._parser.feed(data)
        except Garbled as garbled:
            self._fail(garbled)
            return
        if replies:
            self._replies.extend(replies)
            if len(self._replies) > MAX_UNREAD:
                self._replies.clear()
                self._fail(Garbled(f"more than {MAX_UNREAD} replies nobody asked for"))
                return
            self._wake()

    def eof_received(self) -> bool:
        self._fail(Lost("connection closed by the server"))
        return False  # close our side too

    def connection_lost(self, error: Exception | None) -> None:
        self._fail(Lost(str(error) if error else "connection closed"))
        self.transport = None

    # --- for the client ---

    def write(self, data: bytes) -> None:
        """Send ``data``; on a closed connection the next read raises ``Lost``."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self._fail(Lost("connection closed"))
            return
        transport.write(data)

    async def read_reply(self, timeout: float) -> Reply:
        """The next reply, waiting at most ``timeout`` seconds for it."""
        if not self._replies and self._failure is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._failure is not None
        raise self._failure

    async def start_tls(
        self, context: ssl.SSLContext, timeout: float, server_hostname: str | None = None
    ) -> ssl.SSLObject:
        """The TLS handshake (after the server's 220 to STARTTLS); the connection's
        SSLObject, for what the server presented.

        ``server_hostname`` is sent (SNI) and, if the context checks host
        names, checked. Anything the server sent after its 220 is discarded
        (RFC 3207 4.2: nothing from before TLS may be trusted after it; a man
        in the middle could have injected replies). Raises OSError
        (ssl.SSLError included) or TimeoutError if the handshake fails.
        """
        if self.transport is None:
            raise Lost("connection closed")
        self._parser = ReplyParser()
        self._replies.clear()
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if transport is None:
            raise Lost("connection closed during the TLS handshake")
        self.transport = cast(asyncio.Transport, transport)
        return cast(ssl.SSLObject, transport.get_extra_info("ssl_object"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
