"""The SMTP protocol object (aiosmtpd's, adjusted) and the set of open sessions.

aiosmtpd does the SMTP state machine; this subclass adds what a production
listener needs around it:

- connection limits, total and per client IP, answered 421 before the banner,
  counted for the whole node (``mta.inbound.node_sessions``), not per worker;
- enhanced status codes on aiosmtpd's stock replies (mta.inbound.reply_texts),
  and one place that counts and logs every refusal;
- a 421 before closing an idle session, instead of a silent close; and a
  session is idle unless it does real work: NOOP, RSET, VRFY, EXPN, HELP,
  EHLO and HELO are answered only within ``idle_timeout`` of its last MAIL,
  RCPT, DATA, AUTH or STARTTLS (or of its start), then get that 421, so a
  NOOP now and then does not hold a connection slot for ever;
- command lines hold no control characters (500 5.5.2) and end in CRLF:
  aiosmtpd splits commands at a bare LF, so ``MAIL FROM:<a@b>\nRCPT
  TO:<c@d>\r\n`` would run as two commands; a bare LF gets 521 and the
  session is closed instead (Postfix's ``smtpd_forbid_bare_newline =
  strict``), so nothing after it runs;
- text lines of at most 1000 octets with their CRLF (RFC 5321 4.5.3.1.6;
  aiosmtpd's own limit is 1001);
- DATA read in chunks, not line by line: ``DataParser`` finds the end of the
  data, the line and size limits and the dot-stuffing with a few C-level
  scans per chunk, and gives the same content and the same refusals as
  aiosmtpd's own line-by-line ``smtp_DATA`` (a property test compares them);
- limits on failed AUTH: ``SESSION_MAX_FAILURES`` per session, then 421 and
  close; per client address through ``mta.inbound.auth_limits``, whose
  blocked addresses get 421 to AUTH for a while, on every worker of the node
  (its table is in ``mta.inbound.node_sessions``); a password is checked only
  after one of the address's tries is reserved, so no more than its limit
  are ever checked, however many connections it uses. The refusal log line names
  the client and the reply, never the user name or the password;
- passwords checked off the event loop (``mta.inbound.auth``: a small thread
  pool, 454 4.7.0 when too many checks wait), so a guesser never delays the
  other sessions' replies;
- a hard error limit (Postfix's ``smtpd_hard_error_limit``): after ``[server]
  hard_error_limit`` error replies without a message accepted, 421 and close;
- NUL in message data refused (550 5.6.0), as bare CR or LF is by the handler;
  a second STARTTLS inside TLS gets 503 5.5.1, not a second handshake;
- after a closing reply (421, 521), pipelined commands already received are
  dropped, never run;
- graceful shutdown: ``Sessions.drain`` closes idle sessions at once and lets
  sessions inside a transaction finish (their 250 means the message is on
  disk), up to a deadline;
- reply coalescing: while the next command line is already buffered (a
  pipelining client), and within a multi-line reply, replies wait and then go
  out together in one write (``push``): one send instead of one per line.

Everything that reaches into aiosmtpd's or asyncio's private names, and the
parts of aiosmtpd's ``smtp_DATA`` kept around our chunked reading, are in
``mta.inbound.aiosmtpd_compat``; this module uses their public interface only.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.smtp import AuthResult, LoginPassword, syntax

from mta.config import Config, ServerConfig
from mta.inbound import reply_texts
from mta.inbound.aiosmtpd_compat import ChunkedStreamReader, SMTPProtocol
from mta.inbound.auth import AuthBusy, Authenticator
from mta.inbound.auth_limits import SESSION_MAX_FAILURES, AuthFailures, AuthTable
from mta.inbound.node_sessions import ConnectionCounts, ProcessCounts
from mta.observe import metrics
from mta.observe.escape import field

log = logging.getLogger("mta.smtpd")


class Sessions:
    """Open SMTP sessions, for connection limits and for draining at shutdown.

    The limits are counted in ``counts`` and failed AUTH in ``auth_failures``:
    in a daemon, the node's file shared by every worker
    (``mta.inbound.node_sessions.NodeSessions``); by default, this process alone.
    """

    def __init__(
        self,
        max_total: int,
        max_per_ip: int,
        auth_failures: AuthTable | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.auth_failures = auth_failures if auth_failures is not None else AuthFailures()
        self.counts = counts if counts is not None else ProcessCounts()
        self.open: set[Session] = set()

    def reload(self, config: Config) -> None:
        """Take new connection limits; they apply to the next connection."""
        self.max_total = config.server.max_connections
        self.max_per_ip = config.server.max_connections_per_ip

    def admit(self, session: Session, ip: str) -> str | None:
        """Register a new session, or return the 421 reply that refuses it."""
        refusal = self.counts.admit(ip, self.max_total, self.max_per_ip)
        if refusal == "total":
            return reply_texts.SERVER_BUSY
        if refusal == "per_ip":
            return reply_texts.TOO_MANY_CONNECTIONS.replace("{ip}", ip)
        self.open.add(session)
        metrics.SESSIONS_ACTIVE.inc()
        return None

    def leave(self, session: Session, ip: str) -> None:
        self.open.discard(session)
        self.counts.leave(ip)
        metrics.SESSIONS_ACTIVE.dec()

    async def drain(self, timeout: float, poll: float = 0.05) -> None:
        """Close every session, letting open transactions finish first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.open and loop.time() < deadline:
            for session in list(self.open):
                if not session.in_transaction:
                    session.close_with(reply_texts.SHUTTING_DOWN)
            await asyncio.sleep(poll)
        for session in list(self.open):
            log.warning("closing session from [%s] at shutdown mid-transaction", session.ip)
            session.close_with(reply_texts.SHUTTING_DOWN)


# Idle handling (Session._may_run): these commands, and the connection itself,
# renew a session's idle slot; the keep-alive ones run only within idle_timeout
# of the last renewal and get the idle 421 after that. Others (QUIT, unknown
# commands) do not renew, and never restart aiosmtpd's idle timer either.
RENEWING = frozenset((b"MAIL", b"RCPT", b"DATA", b"BDAT", b"AUTH", b"STARTTLS"))
KEEPALIVE = frozenset((b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP", b"EHLO", b"HELO"))

# C0 controls and DEL, except HT; a command line holds none of them.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Octets of DATA buffered unread before the transport is paused (for commands: 2 x
# the line limit, so a 4 KB message would pause and resume it every time).
DATA_BUFFER = 64 * 1024

# aiosmtpd's refusals at the end of DATA, word for word (push adds the enhanced codes).
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"
_END = b"\r\n.\r\n"

# Reply coalescing (Session.push). Replies never held back, because what comes
# next is not the reading of a buffered command line: 220 (greeting; STARTTLS,
# whose handshake then drops the buffered input), 334 and 354 (the client may
# wait for them before sending its answer or the data, even with more bytes
# sent already), and 221, 421 and 502 (aiosmtpd closes the connection after
# QUIT, a command over its call limit or too many unknown ones).
_NEVER_HELD = frozenset((b"220", b"221", b"334", b"354", b"421", b"502"))
# At most this many replies or octets wait: a client pipelining thousands of
# NOOPs gets a write every 64 replies, not one that grows without bound.
HELD_REPLIES = 64
HELD_OCTETS = 4096

# The hard error limit of a session whose handler has no [server] configuration.
HARD_ERROR_LIMIT = ServerConfig.hard_error_limit
_QUEUED = reply_texts.queued("")  # the start of the 250 that accepts a message


class DataParser:
    """The text after DATA up to its end, fed as it arrives: pure, no I/O.

    Lines end at CRLF only, as in aiosmtpd since CVE-2024-27305: a bare CR or
    LF stays inside its line (the handler refuses it as a whole), so the data
    ends only at a line that is exactly ".<CRLF>". The result is aiosmtpd
    1.4's line-by-line ``smtp_DATA`` with a stream limit of ``line_limit``,
    found with a few scans per chunk instead of a call per line:

    - a line of more than ``line_limit`` octets with its CRLF gets
      ``LINE_TOO_LONG``, one of more than ``size_limit`` octets in all
      (without the final ".<CRLF>") ``TOO_MUCH_DATA``; the first of the two to
      happen wins, in aiosmtpd's order (a line too long even for the stream
      limit is refused before its octets are counted, a shorter one after);
    - after a refusal the rest is read and dropped up to the end of the data;
    - ``content()`` is the data with one leading dot removed from every line
      that has one (RFC 5321 4.5.2).

    ``feed(buffer)`` takes what it can from the start of ``buffer`` and says
    how much; an unfinished line is left for the next call, with more data.
    """

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit or 0  # 0 or None: no limit, as aiosmtpd
        self.line_limit = line_limit
        self.refusal: str | None = None
        self.done = False
        self._parts: list[bytes | bytearray] = []
        self._size = 0  # octets of the lines kept so far
        self._at_line_start = True  # what is offered next starts a line

    def feed(self, data: bytes | bytearray) -> int:
        """Take lines from the start of ``data``; how many octets were taken.

        Once the end of the data is found (``done``), nothing after it is taken.
        """
        if self._at_line_start and data.startswith(b".\r\n"):
            end = 0
        else:
            end = data.find(_END)
            if end >= 0:
                end += 2
        if end >= 0:
            self._take(data, end)
            self.done = True
            return end + 3
        last = data.rfind(b"\r\n")
        taken = 0 if last < 0 else last + 2  # complete lines only
        if taken:
            self._take(data, taken)
            self._at_line_start = True
        unfinished = len(data) - taken
        if self.refusal is None and unfinished > self.line_limit + 1:
            # Its CRLF can add one octet at least: too long even for the
            # stream's limit, so refused before its octets count.
            self._refuse(LINE_TOO_LONG)
        if self.refusal is not None and unfinished > 2:
            # Drop it, but for its last octet (a CR that may start a CRLF).
            # Three octets or more at a line start are not the end: that
            # would have been found above.
            taken = len(data) - 1
            self._at_line_start = False
        return taken

    def content(self) -> bytes:
        """The data, dot-stuffing removed; for a message that was not refused."""
        assert self.done and self.refusal is None
        parts = self._parts
        if parts and parts[0].startswith(b"."):
            parts[0] = parts[0][1:]
        data = b"".join(parts)
        self._parts = []
        return data.replace(b"\r\n.", b"\r\n")

    def _take(self, data: bytes | bytearray, end: int) -> None:
        """Keep ``data[:end]``, whole lines, or refuse the message."""
        if self.refusal is not None or not end:
            return
        block = data[:end]
        size = self._size + end
        limit = self.size_limit
        if (limit and size > limit) or (
            end > self.line_limit and max(map(len, block.split(b"\r\n"))) > self.line_limit - 2
        ):
            self._refuse(self._first_refusal(block))
            return
        self._parts.append(block)
        self._size = size

    def _first_refusal(self, block: bytes | bytearray) -> str:
        """Which limit ``block``, a refused run of lines, broke first."""
        size = self._size
        for line in block.split(b"\r\n")[:-1]:
            length = len(line) + 2
            if length > self.line_limit + 2:
                return LINE_TOO_LONG  # aiosmtpd's stream limit: before counting
            size += length
            if self.size_limit and size > self.size_limit:
                return TOO_MUCH_DATA
            if length > self.line_limit:
                return LINE_TOO_LONG
        raise AssertionError("no limit broken")  # pragma: no cover

    def _refuse(self, reply: str) -> None:
        self.refusal = reply
        self._parts = []  # free the memory at once


class _LineReader(ChunkedStreamReader):
    """aiosmtpd's stream reader, checking the line endings and bytes of commands.

    aiosmtpd reads commands (and AUTH answers) with ``readuntil()``, whose
    separator is LF (its own DATA reader used ``readuntil(b"\\r\\n")``). A command
    line that ends in a bare LF, or holds a control character (a CR or NUL
    inside an address or parameter), comes back empty, so aiosmtpd refuses
    it, and ``problem`` tells the session which refusal to send instead:
    aiosmtpd would otherwise split at the LF, and parse ``<a@exa\\rmple.net>``
    as ``a@example.net``. (A line too long for the buffer is skipped with
    ``read()``, which can stop between its CR and LF; that LF is not bare.)
    """

    problem: str | None = None
    # Set by the session: whether a well-formed command line may run (its idle
    # handling); when not, ``problem`` is "idle".
    allows: Callable[[bytes], bool] | None = None
    _after_cr = False

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self._after_cr = data.endswith(b"\r")
        return data

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        line = await super().readuntil(separator)
        after_cr, self._after_cr = self._after_cr, False
        if separator != b"\n" or (line == b"\n" and after_cr):
            return line
        if not line.endswith(b"\r\n"):
            self.problem = "bare_line_feed"
        elif _CONTROL.search(line, 0, len(line) - 2):
            self.problem = "control_character"
        elif self.allows is not None and not self.allows(line):
            self.problem = "idle"
        else:
            return line
        return b"\r\n"


class Session(SMTPProtocol):
    """One SMTP connection."""

    # RFC 5321 4.5.3.1.6: 1000 octets with the CRLF (aiosmtpd allows 1001).
    line_length_limit = 1000
    reader_class = _LineReader  # so the reader checks command lines

    def __init__(self, handler: Any, sessions: Sessions, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sessions = sessions
        self.ip = ""
        # Read from the handler's [server] section per session, so a reload
        # applies to the next sessions, as the other limits do.
        config = getattr(handler, "config", None)
        self.hard_error_limit = (
            config.hard_error_limit if isinstance(config, ServerConfig) else HARD_ERROR_LIMIT
        )
        self._errors = 0  # error replies since the session began or last queued a message
        self._admitted = False
        self._in_ehlo = False
        self._in_auth = False
        self._auth_failures = 0
        self._auth_blocking: bool | None = None  # the last check's failure blocked the address
        self._auth_refused = False  # no try left for the address: the AUTH got 421
        self._renewed_at = 0.0  # loop time of the last command that renews the idle slot
        self._held: list[bytes] = []  # replies not written yet, with their CRLF
        self._held_octets = 0

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection, not the switch to TLS
            peer = transport.get_extra_info("peername")
            self.ip = peer[0] if peer else ""
            refusal = self.sessions.admit(self, self.ip)
            if refusal is not None:
                self._refuse(transport, refusal)
                return
            self._admitted = True
            super().connection_made(transport)
            self._renewed_at = self.loop.time()
            if isinstance(self.reader, _LineReader):
                self.reader.allows = self._may_run
            return
        super().connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport, template: str) -> None:
        reply = reply_texts.enhance(template.replace("{host}", self.hostname))
        self._count_refusal(reply)
        # uvloop's transports are not asyncio.Transport subclasses, but write alike.
        cast(asyncio.Transport, transport).write(reply.encode() + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        self._held.clear()  # nowhere to send them now
        if not self._admitted:
            return  # refused before aiosmtpd set anything up
        self._admitted = False
        self.sessions.leave(self, self.ip)
        super().connection_lost(error)

    def eof_received(self) -> bool:
        self._flush()  # replies held while a handler ran; the client may still read
        super().eof_received()
        # aiosmtpd keeps the transport half-open after EOF; if the client left
        # before the session task first ran, nothing would ever close it and
        # the session would hold its connection slot until the idle timeout.
        return False

    def close_with(self, template: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            reply = template.replace("{host}", self.hostname)
            self._held.append(reply.encode() + b"\r\n")  # after any held replies
            self._flush()
            self.transport.close()
            self.reader.discard_input()  # nothing sent before the 421 runs after it

    def idle_timeout_expired(self) -> None:
        log.info("timeout after %.0fs idle from [%s]", self.idle_timeout, self.ip)
        self.close_with(reply_texts.TIMEOUT)

    def _may_run(self, line: bytes) -> bool:
        """Whether the command ``line`` may run, as the idle handling sees it.

        A command in ``RENEWING`` (and any line inside AUTH: its answers)
        renews the session's idle slot; one in ``KEEPALIVE`` runs only within
        ``idle_timeout`` of the last renewal. aiosmtpd restarts its idle timer
        on every known command, so without this a NOOP now and then would
        hold the slot for ever; with it a session that does no real work is
        closed at its first keep-alive command ``idle_timeout`` after its last
        real one (or by the timer, when it sends nothing).
        """
        now = self.loop.time()
        verb = line.split(b" ", 1)[0].rstrip(b"\r\n").upper()
        if verb in RENEWING or self._in_auth:
            self._renewed_at = now
            return True
        return verb not in KEEPALIVE or now - self._renewed_at < self.idle_timeout

    @syntax("EHLO hostname")  # as aiosmtpd's, so HELP still lists it
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    @syntax("STARTTLS", when="tls_context")  # as aiosmtpd's, so HELP still lists it
    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd would answer 220 and start a second handshake inside TLS,
        # which fails with a logged traceback. After the handshake STARTTLS is
        # no longer offered (RFC 3207 4.2): a bad sequence of commands, 503.
        if self.session is not None and self.session.ssl is not None:
            await self.push(reply_texts.TLS_ALREADY_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    async def receive_data(self) -> tuple[str | None, bytes]:
        """The data after DATA's 354, read in chunks (``DataParser``); aiosmtpd's
        ``smtp_DATA`` does the rest (``SMTPProtocol.smtp_DATA``)."""
        parser = DataParser(self.data_size_limit, self.line_length_limit)
        try:
            await self.reader.read_data(parser, DATA_BUFFER)
        except asyncio.CancelledError:
            log.debug("connection lost during DATA from [%s]", self.ip)
            self.writer.close()
            raise
        self._renewed_at = self.loop.time()  # however long the data took
        if parser.refusal is not None:
            return parser.refusal, b""
        content = parser.content()
        if b"\0" in content:
            # Refused as a whole, like a bare CR or LF (the handler's check):
            # a next hop that drops or stops at NUL would see another message.
            return reply_texts.NUL_IN_DATA, b""
        return None, content

    async def authenticate(self, mechanism: str, auth_data: LoginPassword) -> AuthResult:
        """AUTH PLAIN and LOGIN credentials, checked once one of the client
        address's tries is reserved (``mta.inbound.auth_limits``): a failure
        takes it, and is counted for the node before the reply; a success, or
        a check that did not run, gives it back. No try left: 421, closed."""
        failures = self.sessions.auth_failures
        token = failures.begin(self.ip)
        if token is None:
            self._auth_refused = True
            return AuthResult(success=False, handled=False, message=self._auth_blocked())
        try:
            result = await self._check(mechanism, auth_data)
        except BaseException:
            failures.release(self.ip, token)
            raise
        if result.success or result.handled or result.message is not None:
            failures.release(self.ip, token)  # accepted, or not checked (454)
        else:
            self._auth_blocking = failures.failed(self.ip, token)
        return result

    async def _check(self, mechanism: str, auth_data: LoginPassword) -> AuthResult:
        """The credentials checked in mta's authenticator's thread pool rather
        than on the event loop (``mta.inbound.auth``)."""
        authenticator = self.authenticator
        if not isinstance(authenticator, Authenticator):
            return await super().authenticate(mechanism, auth_data)
        try:
            return await authenticator.authenticate(auth_data)
        except AuthBusy:
            return AuthResult(success=False, handled=False, message=reply_texts.AUTH_BUSY)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.sessions.auth_failures.blocked(self.ip):
            await self.push(self._auth_blocked())
            self._close()
            return
        self._in_auth = True
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._in_auth = False
        if self._auth_refused:  # answered 421 in authenticate()
            self._close()

    async def push(self, status: Any) -> None:
        close = False
        reader = getattr(self, "reader", None)  # none before the client connects
        if isinstance(reader, _LineReader) and reader.problem == "idle":
            reader.problem = None
            log.info("timeout: no real command for %.0fs from [%s]", self.idle_timeout, self.ip)
            self.close_with(reply_texts.TIMEOUT)  # instead of the keep-alive command's reply
            return
        if isinstance(reader, _LineReader) and reader.problem is not None:
            # The reply to the bad line. After a bare LF nothing more is read;
            # nor after a bad AUTH answer, where aiosmtpd would ask for more.
            challenge = not isinstance(status, str) or status.startswith("334")
            if reader.problem == "bare_line_feed":
                status = reply_texts.BARE_LINE_FEED.replace("{host}", self.hostname)
            else:
                status = reply_texts.CONTROL_CHARACTER
            close = reader.problem == "bare_line_feed" or challenge
            reader.problem = None
        elif self._in_auth and isinstance(status, str) and status.startswith("535"):
            status, close = self._auth_failed(status)
        too_many_errors = None
        if isinstance(status, str) and self._is_command_reply(status):
            status = reply_texts.enhance(status)
            if status[0] in "45":
                self._count_refusal(status)
                if self._errors >= self.hard_error_limit and not close and status[:3] != "421":
                    too_many_errors = reply_texts.TOO_MANY_ERRORS.replace("{host}", self.hostname)
                    self._count_refusal(too_many_errors)
                    close = True
            elif status.startswith(_QUEUED):
                self._errors = 0  # as Postfix: errors are forgiven once mail is accepted
        # aiosmtpd's push (less its debug line; mail.log is at WARNING), coalesced.
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        self._held.append(status + b"\r\n")
        self._held_octets += len(status) + 2
        if too_many_errors is not None:  # the error reply, then the 421
            self._held.append(too_many_errors.encode() + b"\r\n")
            self._held_octets += len(too_many_errors) + 2
        if not close and self._may_hold(status):
            return
        self._flush()
        await self.writer.drain()
        if close:
            self._close()

    def _may_hold(self, reply: bytes) -> bool:
        """Whether ``reply`` (just held) may wait for the next one to be written with it.

        As Postfix's smtpd: while a complete command line is already buffered,
        the session goes on to it at once, so its reply can share the write;
        once the input is used up the replies go out, so a client waiting for
        them never waits on us. A line of a multi-line reply (``250-``, EHLO's)
        always has its next line pushed right after it.
        """
        if len(self._held) >= HELD_REPLIES or self._held_octets >= HELD_OCTETS:
            return False
        if reply[3:4] == b"-" and b"\n" not in reply:  # one line, not a whole reply
            return True
        if reply[:3] in _NEVER_HELD:
            return False
        return self.reader.has_line()

    def _flush(self) -> None:
        """Write the held replies in one write, or drop them if the connection is closing."""
        held = self._held
        if not held:
            return
        data = b"".join(held)
        held.clear()
        self._held_octets = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)  # type: ignore[attr-defined]

    def _auth_failed(self, status: str) -> tuple[str, bool]:
        """Count a failed AUTH; the reply to send, and whether to close after it."""
        self._auth_failures += 1
        blocking, self._auth_blocking = self._auth_blocking, None
        if blocking is None:  # no password checked (AUTH given up with "*"): still a failure
            blocking = self.sessions.auth_failures.failed(self.ip)
        if blocking:
            log.warning("AUTH blocked for a while: client=[%s] too many failures", self.ip)
            return self._auth_blocked(), True
        if self._auth_failures >= SESSION_MAX_FAILURES:
            return reply_texts.AUTH_TOO_MANY_FAILURES.replace("{host}", self.hostname), True
        return status, False

    def _auth_blocked(self) -> str:
        return reply_texts.AUTH_BLOCKED.replace("{host}", self.hostname).replace("{ip}", self.ip)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()
            self.reader.discard_input()  # pipelined commands after the closing reply never run

    def _is_command_reply(self, status: str) -> bool:
        if self._in_ehlo or status[:3] in ("334", "354"):
            return False
        return not status.startswith(f"220 {self.hostname}")  # the greeting

    def _count_refusal(self, reply: str) -> None:
        """Count and log a refusal; every one counts towards the hard error limit,
        but for 452 4.5.3 past ``max_recipients``, which asks an RFC 5321 client
        to send those recipients in another transaction (Postfix counts them
        only past its smtpd_recipient_overshoot_limit)."""
        if not reply.startswith(reply_texts.TOO_MANY_RECIPIENTS):
            self._errors += 1
        reason = reply_texts.rejection_reason(reply)
        if reason is not None:
            metrics.MESSAGES_REJECTED.labels(reason).inc()
        envelope = self.envelope
        sender = envelope.mail_from if envelope is not None else None
        helo = (self.session.host_name or "") if self.session else ""
        log.info(
            "reject: client=[%s] helo=%s from=%s reply=%s",
            self.ip,
            field(f"<{helo}>"),
            field(f"<{'' if sender in (None, '<>') else sender}>"),
            field(reply),
        )
