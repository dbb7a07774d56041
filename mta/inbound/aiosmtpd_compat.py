"""Every use of aiosmtpd's and asyncio's private names, behind a small public interface.

``mta.inbound.server`` builds its session on aiosmtpd's ``SMTP`` protocol and reads
DATA straight from the buffer of asyncio's ``StreamReader``; both need names those
libraries do not promise to keep. They are all here, so that an upgrade is reviewed
in one file, and the import fails loudly instead of the listener misbehaving:

- ``SMTPProtocol`` is aiosmtpd's ``SMTP`` with public names for what the session
  uses: ``reader`` and ``writer`` (aiosmtpd's ``_reader`` and ``_writer``),
  ``reader_class`` (the stream reader class the connection's reader becomes),
  ``idle_timeout`` and ``idle_timeout_expired()`` (``_timeout_duration`` and
  ``_timeout_cb``), ``receive_data()``, the one step of ``smtp_DATA`` that
  the session implements, ``authenticator`` (``_authenticator``) and
  ``authenticate()``, the step of AUTH PLAIN and LOGIN that checks the
  credentials (below);
- ``ChunkedStreamReader`` is asyncio's ``StreamReader`` with ``read_data()``
  (DATA fed to a parser a whole buffer at a time), ``has_line()`` and
  ``discard_input()``;
- ``parse_address`` stands in for aiosmtpd's ``SMTP._getaddr``.

How DATA stays aiosmtpd's. Upstream's ``smtp_DATA`` reads the data with one
``readuntil()`` and a few Python statements per line; its reading loop cannot be
reused without that per-line work, so it is replaced, and the rest of the method
is kept statement for statement (``SMTPProtocol.smtp_DATA``):

- the checks before the data (HELO/EHLO seen, AUTH if required, a RCPT given, no
  argument) and the 354 are upstream's, calling upstream's own
  ``check_helo_needed`` and ``check_auth_needed``, so fixes inside those reach us;
- the reading loop (lines end at CRLF only, the end is exactly ".<CRLF>", the line
  and size limits and their order, dot-unstuffing: the SMTP smuggling defence of
  CVE-2024-27305) is ``mta.inbound.server.DataParser``, which a property test
  (tests/unit/test_data_reader.py) runs against the installed upstream
  ``smtp_DATA`` on arbitrary data cut into arbitrary chunks;
- after the data (the refusal reply, decoding, the envelope, the ``handle_DATA``
  hook, the state reset, the reply) is upstream's, less the deprecated
  ``process_message`` fallback (mta's handler has ``handle_DATA``).

Running upstream's own method up to its 354 and taking over there was the
alternative: it needs a trap inside ``push`` on every reply, for six statements
that are easier to compare by eye. Everything else stays upstream's and gets its
fixes: the command loop, STARTTLS (where the injection fix of CVE-2024-34083 is,
in ``connection_made``, which the session extends but does not replace), AUTH's
command and challenges.

How AUTH checks passwords off the event loop. Upstream's ``auth_PLAIN`` and
``auth_LOGIN`` end in ``return self._authenticate(...)``, a synchronous call of
the authenticator: scrypt on the event loop, every other session waiting for it.
Both are copied statement for statement (``SMTPProtocol.auth_PLAIN`` and
``auth_LOGIN``) but for that last statement, which awaits ``authenticate()``
instead; its default is upstream's ``_authenticate``, and the session's runs the
check in a thread pool. ``smtp_AUTH``, which turns the result into the reply (an
``AuthResult.message`` is sent as is), stays upstream's.

Every upstream function copied or replaced (``push`` is rewritten in
``mta.inbound.server.Session`` to coalesce replies), or whose inner workings the
session relies on (``_handle_client`` and ``challenge_auth`` read command lines
and AUTH answers with ``readuntil``, where the bare LF check sits; ``smtp_AUTH``
sends an ``AuthResult.message`` as the reply), is pinned by
the SHA-256 of its source in ``UPSTREAM_SOURCES``;
tests/unit/test_aiosmtpd_compat.py fails when any of them changes, naming which.
At import, the aiosmtpd version must be one this file was checked against, and
every private name used must exist.

To upgrade aiosmtpd: diff each function in ``UPSTREAM_SOURCES`` against the
version checked, carry any fix into the copies here (and into ``DataParser`` if
the reading loop changed), then update ``CHECKED_VERSIONS`` and the hashes.
"""

from __future__ import annotations

import asyncio
import re
from base64 import b64decode
from collections.abc import Awaitable, Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, Protocol, cast

import aiosmtpd
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax

# aiosmtpd releases whose code this module was compared with.
CHECKED_VERSIONS = ("1.4.6",)

# The first 16 hex digits of the SHA-256 of inspect.getsource() of each upstream
# function copied, replaced or relied on in detail, in aiosmtpd 1.4.6.
UPSTREAM_SOURCES = {
    "SMTP.smtp_DATA": "3a33f30d3fd6d02f",
    "SMTP.push": "15f4f1de5e30c337",
    "SMTP._getaddr": "0aeb21c56ac1260e",
    "SMTP._handle_client": "0e4d096403af6c74",
    "SMTP.challenge_auth": "7ca4c59374e53538",
    "SMTP._cb_client_connected": "a73e95bb7f362ab9",
    "SMTP._timeout_cb": "10a7351f9bec2818",
    "SMTP.auth_PLAIN": "71fe14c537cc5039",
    "SMTP.auth_LOGIN": "f121f6cb809cc2ad",
    "SMTP._authenticate": "4252dad9a1780535",
    "SMTP.smtp_AUTH": "79078b308377ac48",
}

# The private names used, by where they are defined: methods, and the attributes
# an __init__ (or aiosmtpd's connection callback) assigns.
_SMTP_METHODS = (
    "_authenticate",
    "_call_handler_hook",
    "_cb_client_connected",
    "_getaddr",
    "_set_post_data_state",
    "_timeout_cb",
)
_SMTP_ATTRIBUTES = ("_authenticator", "_decode_data", "_handle_hooks", "_timeout_duration")
_SMTP_CONNECTION_ATTRIBUTES = ("_reader", "_writer")
_READER_METHODS = ("_maybe_resume_transport", "_wait_for_data")
_READER_ATTRIBUTES = ("_buffer", "_eof", "_exception", "_limit")


def _missing_names() -> list[str]:
    """The private names this module uses that the installed libraries lack."""
    reader = asyncio.StreamReader
    missing = [f"SMTP.{name}" for name in _SMTP_METHODS if not hasattr(SMTP, name)]
    assigned = SMTP.__init__.__code__.co_names
    missing += [f"SMTP().{name}" for name in _SMTP_ATTRIBUTES if name not in assigned]
    connected = getattr(SMTP, "_cb_client_connected", None)
    assigned = connected.__code__.co_names if connected is not None else ()
    missing += [f"SMTP().{name}" for name in _SMTP_CONNECTION_ATTRIBUTES if name not in assigned]
    missing += [f"StreamReader.{name}" for name in _READER_METHODS if not hasattr(reader, name)]
    assigned = reader.__init__.__code__.co_names
    missing += [f"StreamReader().{name}" for name in _READER_ATTRIBUTES if name not in assigned]
    if hasattr(reader, "__slots__"):  # the reader's class could no longer be swapped
        missing.append("a StreamReader without __slots__")
    return missing


def _check_installed() -> None:
    version = aiosmtpd.__version__
    advice = (
        f"mta was checked against aiosmtpd {', '.join(CHECKED_VERSIONS)}; pin "
        f"aiosmtpd=={CHECKED_VERSIONS[-1]} or review mta/inbound/aiosmtpd_compat.py"
    )
    if version not in CHECKED_VERSIONS:
        raise ImportError(f"aiosmtpd {version} is installed; {advice}")
    missing = _missing_names()
    if missing:
        raise ImportError(f"aiosmtpd {version} or asyncio lacks {', '.join(missing)}; {advice}")


_check_installed()


class DataSink(Protocol):
    """What ``ChunkedStreamReader.read_data`` feeds (``mta.inbound.server.DataParser``)."""

    done: bool

    def feed(self, data: bytearray) -> int: ...


class ChunkedStreamReader(asyncio.StreamReader):
    """asyncio's StreamReader, plus reading DATA a whole buffer at a time.

    A connection's reader becomes one by having its class swapped (same object and
    state), since aiosmtpd creates the reader itself.
    """

    # asyncio.StreamReader's private state (typeshed omits it).
    _buffer: bytearray
    _eof: bool
    _exception: BaseException | None
    _limit: int
    _wait_for_data: Callable[[str], Awaitable[None]]
    _maybe_resume_transport: Callable[[], None]

    async def read_data(self, sink: DataSink, buffer_size: int) -> None:
        """Feed ``sink`` until it is done; what follows the data stays buffered.

        The whole buffer goes to the sink each time, so a message that came in one
        segment is one call, not one per line. The transport is paused only past
        ``buffer_size`` octets unread, rather than past twice the line limit.
        """
        limit, self._limit = self._limit, max(self._limit, buffer_size // 2)
        try:
            buffer = self._buffer
            while True:
                if self._exception is not None:
                    raise self._exception
                if buffer:
                    taken = sink.feed(buffer)
                    if taken:
                        del buffer[:taken]
                    if sink.done:
                        return
                if self._eof:
                    raise asyncio.IncompleteReadError(bytes(buffer), None)
                await self._wait_for_data("read_data")  # resumes a paused transport
        finally:
            self._limit = limit
            self._maybe_resume_transport()

    def has_line(self) -> bool:
        """Whether a whole line (up to an LF) is buffered, ready to be read at once."""
        return b"\n" in self._buffer

    def discard_input(self) -> None:
        """Drop what is buffered unread: after a closing reply, pipelined commands
        already received must not run (a closed transport reads no more)."""
        self._buffer.clear()


# RFC 5322 atext; the usual MAIL/RCPT argument: <dot-atom@dot-atom>, then the
# parameters after one space or none.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_ADDRESS = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})> ?((?![ \t(]).*)", re.DOTALL)


def parse_address(arg: str) -> tuple[str | None, str | None]:
    """The address and the rest of a MAIL or RCPT argument, as aiosmtpd's
    ``_getaddr`` gives them: ("", "") for none, (None, None) if malformed.

    The usual form is matched with one regular expression; anything else goes to
    the email package's parser, as in aiosmtpd (which also defined a
    typing.Protocol class on every call), at about 100 times the cost. A property
    test checks that both give the same for any argument. ``local_part_limit`` is
    not applied: mta leaves it at aiosmtpd's 0, no limit.
    """
    plain = _PLAIN_ADDRESS.fullmatch(arg)
    if plain is not None:
        return plain[1], plain[2]
    return _parse_address(arg)


def _parse_address(arg: str) -> tuple[str | None, str | None]:
    if not arg:
        return "", ""
    try:
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        address, rest = parse(arg)
        return address.addr_spec, rest
    except (HeaderParseError, IndexError, AttributeError):
        # The parser fails on cut-off input ("<", "<a@", "<a@[") with these
        # too; aiosmtpd let them through, to a 451 and a logged traceback.
        return None, None


class SMTPProtocol(SMTP):
    """aiosmtpd's SMTP protocol, with public names for the private parts mta uses."""

    # The connection's stream reader becomes one of these when the client connects.
    reader_class: type[ChunkedStreamReader] = ChunkedStreamReader
    # The connection's streams, set when the client connects.
    reader: ChunkedStreamReader
    writer: asyncio.StreamWriter

    _getaddr = staticmethod(parse_address)

    @property
    def idle_timeout(self) -> float:
        """Seconds without a command before ``idle_timeout_expired`` is called."""
        return self._timeout_duration

    def idle_timeout_expired(self) -> None:
        """The session was idle for ``idle_timeout``; aiosmtpd closes it silently."""
        super()._timeout_cb()

    def _timeout_cb(self) -> None:
        self.idle_timeout_expired()

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        reader.__class__ = self.reader_class
        super()._cb_client_connected(reader, writer)
        self.reader = cast(ChunkedStreamReader, reader)
        self.writer = writer

    async def receive_data(self) -> tuple[str | None, bytes]:
        """Read the data after the 354: the refusal to send, or None and the data
        with its dot-stuffing removed."""
        raise NotImplementedError

    @property
    def authenticator(self) -> Any:
        """The ``authenticator`` the protocol was made with, or None."""
        return self._authenticator

    async def authenticate(self, mechanism: str, auth_data: LoginPassword) -> AuthResult:
        """Check the credentials of AUTH PLAIN or LOGIN: upstream's synchronous
        ``_authenticate`` here; a subclass may check them off the event loop."""
        return self._authenticate(mechanism, auth_data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd 1.4.6's ``auth_PLAIN``, awaiting ``authenticate()`` at the end."""
        # Upstream, verbatim (less a comment and its type names).
        login_and_password: Any
        if len(args) == 1:
            login_and_password = await self.challenge_auth("")
            if login_and_password is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login_and_password = b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            # login data is "{authz_id}\x00{login_id}\x00{password}"
            _, login, password = login_and_password.split(b"\x00")
        except ValueError:  # not enough args
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        assert login is not None
        assert password is not None
        # Upstream: return self._authenticate("PLAIN", LoginPassword(login, password))
        return await self.authenticate("PLAIN", LoginPassword(login, password))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd 1.4.6's ``auth_LOGIN``, awaiting ``authenticate()`` at the end."""
        # Upstream, verbatim (less its type names).
        login: Any
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert login is not None

        password: Any
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert password is not None

        # Upstream: return self._authenticate("LOGIN", LoginPassword(login, password))
        return await self.authenticate("LOGIN", LoginPassword(login, password))

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's ``smtp_DATA`` with its reading loop replaced by
        ``receive_data()`` (see the module's docstring)."""
        # Upstream, verbatim: the checks and the 354.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # Upstream's reading loop and dot-unstuffing, done in chunks.
        refusal, original_content = await self.receive_data()
        # Upstream, verbatim from its "day of reckoning" on.
        if refusal is not None:
            await self.push(refusal)
            self._set_post_data_state()
            return
        content: str | bytes = original_content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)
