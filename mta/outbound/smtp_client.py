"""The SMTP client: deliver one message to one destination, reusing connections.

``Deliverer.deliver(route, sender, recipients, data)`` tries the route's MX
hosts in order (each host's addresses in order) and returns a ``Delivery``:
one final ``Reply`` per recipient, and the relay that gave them. It never
raises for anything a network or a server does.

This module does the I/O: connecting, the greeting, EHLO, STARTTLS, timeouts
and the pool. What to send for a message and what each reply means (MAIL,
RCPT and DATA, pipelined or in lock step, RSET, the 421 rules) is decided by
mta.outbound.smtp_transaction, which does none, and this module drives it.

Which failures move on to the next address, and which are the destination's
answer (RFC 5321 5.1: try the next MX only when a server cannot be reached):

- next address: connect refused / timed out, a greeting other than 220, EHLO
  (and the HELO fallback) refused, STARTTLS failing when TLS is required, a
  421 at any point, and a lost connection, timeout or garbled reply before
  DATA (the server gave no answer about this message);
- final for this attempt: a server's reply to MAIL, RCPT or DATA (other than
  421), and a lost connection, timeout or garbled reply from DATA on (the
  message may have arrived; trying another MX at once would risk a second
  copy).

When every address fails, each recipient gets one temporary reply that
describes the last failure, with an RFC 3463 code: 4.4.1 "no answer from
host" (could not connect), 4.4.2 "bad connection" (lost or timed out
mid-session), 4.7.4 "security features not supported" (TLS required but not
offered), 4.7.5 "cryptographic failure" (TLS required, handshake failed),
4.5.0 "other protocol status" (a reply without a valid code); a server that
refused to talk keeps its own code, made temporary. All are "451 <status>
<what happened>", Postfix-worded ("connect to mx[192.0.2.1]:25: Connection
refused", "host mx[...]:25 said: 421 ... (in reply to MAIL FROM)").

TLS is opportunistic, like Postfix's "may" level: STARTTLS whenever offered,
without certificate checks (encryption without authentication). If the
handshake fails and TLS is not required, the same address is tried again
once in plaintext, as Postfix does, so a broken TLS stack cannot hold mail.

Connections are pooled and reused for the next message: after a failed
transaction the next one starts with RSET, a connection carries at most
``max_messages_per_connection`` transactions and closes (QUIT) after
``idle_timeout`` unused. A pooled connection the server closed meanwhile is
replaced silently. A connection is checked out of the pool while in use, so
concurrent deliveries never share one.

A delivery may carry a ``Slot``: a connection slot on its egress path,
granted by the shared limits (mta.cluster). The connection opened for it holds
the slot from open to close, idle in the pool included, because a receiver
counts open connections, not messages. The pool then keeps connections per
path, egress hands an idle one to the next delivery on the path
(``take_idle``), and ``on_slot_free`` hears when a slot is free again.

PIPELINING (RFC 2920) when the server offers it: two round trips per message
instead of three plus one per recipient. The wire (mta.outbound.wire) is our
own: aiosmtplib's protocol keeps a single pending reply and drops reply bytes
it does not expect, so it cannot pipeline.

Timeouts (RFC 5321 4.5.3.2 suggests 5 minutes for the greeting and most
commands, 10 for the reply after the data): ``connect_timeout`` for the TCP
connection, ``command_timeout`` for the greeting and every reply before
DATA's, and ``data_timeout`` (by default twice ``command_timeout``) for the
reply to DATA and the reply to the message.

``data`` must have CRLF line endings, as stored messages do (``dot_stuffed``
repairs nothing). MAIL carries SIZE when the server offers it, BODY=8BITMIME
when offered and the data has 8-bit bytes (8-bit data goes as it is to a
server without 8BITMIME), and SMTPUTF8 when an address needs it. Message
bodies are never logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mta.mail.reply import Reply
from mta.outbound.routes import MxHost, Route
from mta.outbound.smtp_transaction import (
    SERVICE_UNAVAILABLE,
    ClientSession,
    Stale,
    Unavailable,
    lost,
    malformed,
    refused,
    temporary,
)
from mta.outbound.wire import Garbled, Lost, Wire, extensions

log = logging.getLogger("mta.outbound.client")

NO_RELAY = "none"
# QUIT is a courtesy: never let a slow server hold up closing or shutdown.
QUIT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Delivery:
    """What ``Deliverer.deliver`` got for one message."""

    relay: str  # "mx1.example.test[127.0.0.10]:2526", or "none" if no server was reached
    replies: dict[str, Reply]  # one final Reply per recipient


@dataclass(frozen=True)
class ClientSettings:
    helo: str  # our host name, for EHLO
    connect_timeout: float = 30.0  # TCP connect
    command_timeout: float = 300.0  # greeting and each command (RFC 5321 4.5.3.2: 5 min)
    # DATA, the message and the final reply. None: twice command_timeout, as
    # RFC 5321 4.5.3.2 has 5 minutes for commands and 10 for the end of data,
    # so that an operator's shorter command_timeout bounds a silent server here too.
    data_timeout: float | None = None
    max_messages_per_connection: int = 100
    idle_timeout: float = 5.0  # a pooled connection unused this long is closed (QUIT)
    max_idle_per_address: int = 10  # pooled idle connections kept per (address, port)
    source_address: str | None = None  # local IP to bind

    @property
    def end_of_data_timeout(self) -> float:
        """The timeout for DATA, the message and the final reply."""
        if self.data_timeout is not None:
            return self.data_timeout
        return 2 * self.command_timeout


@dataclass(frozen=True)
class _Target:
    host: MxHost
    address: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.host.port)

    @property
    def relay(self) -> str:
        return format_relay(self.host.name, self.address, self.host.port)


@dataclass(eq=False)
class Connection:
    wire: Wire
    session: ClientSession  # its mail transactions
    key: tuple[str, int]
    relay: str  # as named when opened, for logs
    tls: bool


@dataclass(eq=False)
class Slot:
    """A connection slot on an egress path, and the connection that holds it.

    ``holding`` is the shared limits' record of it (None for a delivery
    without one). A slot is either with a delivery (``Deliverer.take_idle``
    or a new one) or idle in the pool with its connection, until that closes.
    """

    path: str
    holding: object = field(default=None, repr=False)
    connection: Connection | None = None
    idle_timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class _TlsBroken(Exception):
    """The TLS handshake failed; the connection is gone."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def format_relay(name: str, address: str, port: int) -> str:
    """Postfix's relay= form: name[address]:port."""
    return f"{name}[{address}]:{port}"


def _targets(route: Route) -> list[_Target]:
    """Every (host, address) of the route, in order, each address once."""
    seen: set[tuple[str, int]] = set()
    targets = []
    for host in route.hosts:
        for address in host.addresses:
            target = _Target(host, address)
            if target.key not in seen:
                seen.add(target.key)
                targets.append(target)
    return targets


def _tls_context() -> ssl.SSLContext:
    # Opportunistic TLS: no certificate or name checks (a self-signed or expired
    # certificate still gives encryption against passive listeners).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Deliverer:
    """Delivers messages over SMTP, keeping a pool of open connections."""

    def __init__(
        self,
        settings: ClientSettings,
        require_tls: Callable[[str], bool] = lambda domain: False,
        on_slot_free: Callable[[Slot], None] = lambda slot: None,
    ) -> None:
        self.settings = settings
        self.require_tls = require_tls
        self.on_slot_free = on_slot_free
        self._tls = _tls_context()
        self._idle: dict[str, list[Slot]] = {}  # by path ("": deliveries without a slot)
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        max_messages: int | None = None,
        slot: Slot | None = None,
    ) -> Delivery:
        """Send ``data`` from ``sender`` to ``recipients`` over ``route``; one reply each.

        ``max_messages``: the destination's own limit of messages per
        connection, when lower than ``ClientSettings.max_messages_per_connection``.
        ``slot``: the connection slot this delivery holds (its connection is
        used, or one is opened for it); the caller gives it back with
        ``give_back``. Without one, an idle connection to the route is reused.
        """
        tls_required = self.require_tls(route.domain)
        targets = _targets(route)
        if slot is not None:
            return await self._deliver(targets, route, slot, sender, recipients, data, max_messages)
        borrowed = self._take("", tls_required, {t.key for t in targets}) or Slot("")
        try:
            return await self._deliver(
                targets, route, borrowed, sender, recipients, data, max_messages
            )
        finally:
            self.give_back(borrowed)

    def take_idle(self, path: str, domain: str) -> Slot | None:
        """An idle slot of ``path``, with its open connection, for a delivery to ``domain``."""
        return self._take(path, self.require_tls(domain), None)

    def retire(self, slot: Slot, reason: str) -> None:
        """Close the connection of a slot taken with ``take_idle``; then the slot is free."""
        self._retire(slot, reason)

    def give_back(self, slot: Slot) -> None:
        """A delivery is done with ``slot``: its connection waits in the pool, or
        the slot is free."""
        connection = slot.connection
        settings = self.settings
        if connection is None:
            self.on_slot_free(slot)
        elif not connection.wire.is_connected:
            self._log_close(connection, "closed by server")
            slot.connection = None
            self.on_slot_free(slot)
        elif self._closed:
            self._retire(slot, "deliverer closed")
        elif (
            sum(
                1
                for s in self._idle.get(slot.path, ())
                if s.connection and s.connection.key == connection.key
            )
            >= settings.max_idle_per_address
        ):
            self._retire(slot, "pool full")
        else:
            self._idle.setdefault(slot.path, []).append(slot)
            slot.idle_timer = asyncio.get_running_loop().call_later(
                settings.idle_timeout, self._expire, slot
            )

    async def _deliver(
        self,
        targets: list[_Target],
        route: Route,
        slot: Slot,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        max_messages: int | None,
    ) -> Delivery:
        rcpts = list(dict.fromkeys(recipients))
        if not rcpts:
            return Delivery(NO_RELAY, {})
        tls_required = self.require_tls(route.domain)
        pooled = slot.connection
        if pooled is not None:
            # A pooled connection saves a handshake: its host first.
            first = next((t for t in targets if t.key == pooled.key), None)
            if first is None:  # the route no longer lists that address
                self._drop(slot, "not on the route")
            else:
                targets.remove(first)
                targets.insert(0, first)
        failure = Unavailable(temporary("4.4.4", f"no MX host for {route.domain}"), NO_RELAY)
        for target in targets:
            try:
                return await self._deliver_via(
                    target, tls_required, slot, sender, rcpts, data, max_messages
                )
            except Unavailable as unavailable:
                log.debug("%s unavailable: %s", target.relay, unavailable.reply)
                failure = unavailable
        return Delivery(failure.relay, dict.fromkeys(rcpts, failure.reply))

    async def close(self) -> None:
        """QUIT and close every pooled connection; later connections are not pooled."""
        self._closed = True
        for slots in self._idle.values():
            for slot in slots:
                self._retire(slot, "closing")
        self._idle.clear()
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # --- one address ---

    async def _deliver_via(
        self,
        target: _Target,
        tls_required: bool,
        slot: Slot,
        sender: str,
        rcpts: list[str],
        data: bytes,
        max_messages: int | None,
    ) -> Delivery:
        pooled = slot.connection
        if pooled is not None and pooled.key == target.key:
            try:
                return await self._transaction(slot, target, sender, rcpts, data, max_messages)
            except Stale:
                pass  # the server closed it while it sat in the pool: not a failure
        slot.connection = await self._open(target, tls_required)
        return await self._transaction(slot, target, sender, rcpts, data, max_messages)

    async def _open(
        self, target: _Target, tls_required: bool, plaintext: bool = False
    ) -> Connection:
        """A connected, greeted, EHLO'd (and if offered, encrypted) connection."""
        relay = target.relay
        sock = await self._connect_socket(target)
        try:
            wire = await Wire.over(sock)
        except OSError as error:
            sock.close()
            raise self._lost(relay, error, "receiving the initial server greeting") from None
        try:
            greeting = await self._read(
                wire, relay, "the greeting", "receiving the initial server greeting"
            )
            if greeting.code != 220:
                raise Unavailable(refused(relay, greeting, "the greeting"), relay)
            offered = await self._hello(wire, relay)
            tls = False
            if not plaintext and "starttls" in offered:
                try:
                    encrypted = await self._starttls(wire, relay, tls_required)
                except _TlsBroken as broken:
                    wire.close()
                    if tls_required:
                        raise Unavailable(
                            temporary("4.7.5", f"TLS handshake with {relay} failed: {broken.why}"),
                            relay,
                        ) from None
                    log.debug("TLS with %s failed (%s); trying plaintext", relay, broken.why)
                    return await self._open(target, tls_required, plaintext=True)
                if encrypted is not None:
                    offered, tls = encrypted, True
            if tls_required and not tls:
                raise Unavailable(
                    temporary("4.7.4", f"TLS is required, but was not offered by host {relay}"),
                    relay,
                )
        except BaseException:
            wire.close()
            raise
        log.debug("connected to %s tls=%s", relay, "yes" if tls else "no")
        return Connection(wire, ClientSession(offered), target.key, relay, tls)

    async def _connect_socket(self, target: _Target) -> socket.socket:
        """A TCP connection to the target, from our source address if set."""
        settings = self.settings
        where = f"connect to {target.relay}"
        try:
            family = (
                socket.AF_INET6
                if ipaddress.ip_address(target.address).version == 6
                else socket.AF_INET
            )
        except ValueError:
            raise Unavailable(temporary("4.4.1", f"{where}: not an IP address"), NO_RELAY) from None
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if settings.source_address:
                sock.bind((settings.source_address, 0))
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (target.address, target.host.port)),
                settings.connect_timeout,
            )
        except TimeoutError:
            sock.close()
            raise Unavailable(
                temporary("4.4.1", f"{where}: Connection timed out"), NO_RELAY
            ) from None
        except OSError as error:
            sock.close()
            # asyncio words errno as "Connect call failed (address)"; say what it was.
            why = os.strerror(error.errno) if error.errno else str(error)
            raise Unavailable(temporary("4.4.1", f"{where}: {why}"), NO_RELAY) from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _hello(self, wire: Wire, relay: str) -> dict[str, str]:
        """EHLO, or HELO when a server refuses EHLO permanently (RFC 5321 3.2);
        the extensions the server offers."""
        wire.write(b"EHLO %s\r\n" % self.settings.helo.encode())
        reply = await self._read(wire, relay, "EHLO", "sending EHLO")
        if reply.code == 250:
            return extensions(reply)
        if not (500 <= reply.code <= 599 and wire.is_connected):
            raise Unavailable(refused(relay, reply, "EHLO"), relay)
        wire.write(b"HELO %s\r\n" % self.settings.helo.encode())
        reply = await self._read(wire, relay, "HELO", "sending HELO")
        if reply.code != 250:
            raise Unavailable(refused(relay, reply, "HELO"), relay)
        return {}

    async def _starttls(self, wire: Wire, relay: str, tls_required: bool) -> dict[str, str] | None:
        """STARTTLS and EHLO again: the extensions offered over TLS, or None
        if the server refused STARTTLS (plaintext goes on)."""
        wire.write(b"STARTTLS\r\n")
        try:
            reply = await wire.read_reply(self.settings.command_timeout)
        except Garbled as garbled:
            raise _TlsBroken(f"malformed reply to STARTTLS: {garbled.text[:200]!r}") from None
        except (Lost, TimeoutError) as error:
            raise _TlsBroken(str(error) or type(error).__name__) from None
        if reply.code != 220:
            if reply.code == SERVICE_UNAVAILABLE:
                raise Unavailable(refused(relay, reply, "STARTTLS"), relay)
            if tls_required:
                raise Unavailable(
                    temporary("4.7.5", f"host {relay} refused STARTTLS: {reply}"), relay
                )
            return None
        try:
            await wire.start_tls(self._tls, self.settings.command_timeout)
        except (OSError, Lost) as error:  # OSError covers ssl.SSLError and TimeoutError
            raise _TlsBroken(str(error) or type(error).__name__) from None
        # RFC 3207 4.2: what the server offered before TLS is forgotten.
        return await self._hello(wire, relay)

    async def _read(self, wire: Wire, relay: str, name: str, doing: str) -> Reply:
        """The next reply while opening the connection. Lost, timed out or
        garbled: try the next address."""
        try:
            return await wire.read_reply(self.settings.command_timeout)
        except Garbled as garbled:
            raise Unavailable(malformed(relay, name, garbled.text), relay) from None
        except (Lost, TimeoutError) as error:
            raise self._lost(relay, error, doing) from None

    def _lost(self, relay: str, error: Exception, doing: str) -> Unavailable:
        return Unavailable(lost(relay, error, doing), relay)

    # --- one transaction ---

    async def _transaction(
        self,
        slot: Slot,
        target: _Target,
        sender: str,
        rcpts: list[str],
        data: bytes,
        max_messages: int | None,
    ) -> Delivery:
        """Drive the slot's connection through one message; the connection stays
        with the slot if it may carry another."""
        connection = slot.connection
        assert connection is not None
        relay = target.relay
        wire, session = connection.wire, connection.session
        settings = self.settings
        try:
            outgoing = session.begin(relay, sender, rcpts, data)
            while not session.done:
                if outgoing:
                    wire.write(outgoing)
                timeout = (
                    settings.end_of_data_timeout
                    if session.awaiting_data
                    else settings.command_timeout
                )
                try:
                    reply = await wire.read_reply(timeout)
                except (Lost, Garbled, TimeoutError) as error:
                    session.broken(error)
                    outgoing = b""
                else:
                    outgoing = session.receive(reply)
        except Stale:
            self._close_now(slot, "stale: closed by the server while pooled")
            raise
        except BaseException:
            # Unavailable, or cancelled mid-command: the session's state is unknown.
            self._close_now(slot, "failed")
            raise
        if session.must_close:
            wire.close()
        self._after_transaction(slot, max_messages)
        return Delivery(relay, session.replies)

    # --- the pool ---

    def _take(
        self, path: str, tls_required: bool, keys: set[tuple[str, int]] | None
    ) -> Slot | None:
        """An idle slot of ``path`` whose connection is usable (to one of ``keys``)."""
        idle = self._idle.get(path, [])
        # Most recently used first, so that surplus connections age out.
        for slot in reversed(list(idle)):
            connection = slot.connection
            assert connection is not None
            if keys is not None and connection.key not in keys:
                continue
            if not connection.wire.is_connected:
                idle.remove(slot)
                self._unschedule(slot)
                self._log_close(connection, "closed by server")
                slot.connection = None
                self.on_slot_free(slot)
            elif connection.wire.has_unread:
                # A reply while pooled: most likely "421 idle timeout"; and a
                # reply nobody asked for would be read as the next command's.
                idle.remove(slot)
                self._retire(slot, "the server spoke while pooled")
            elif connection.tls or not tls_required:
                idle.remove(slot)
                self._unschedule(slot)
                connection.session.untested = True
                return slot
        return None

    def _after_transaction(self, slot: Slot, max_messages: int | None) -> None:
        """Keep the connection with its slot if it may carry another message."""
        connection = slot.connection
        assert connection is not None
        connection.session.untested = False
        limit = min(self.settings.max_messages_per_connection, max_messages or sys.maxsize)
        if not connection.wire.is_connected:
            self._log_close(connection, "closed by server")
            slot.connection = None
        elif connection.wire.has_unread:
            self._drop(slot, "out of step: more replies than commands")
        elif connection.session.transactions >= limit:
            self._drop(slot, "message limit")

    def _expire(self, slot: Slot) -> None:
        slot.idle_timer = None
        idle = self._idle.get(slot.path, [])
        if slot in idle:
            idle.remove(slot)
            if not idle:
                del self._idle[slot.path]
            self._retire(slot, "idle")

    def _unschedule(self, slot: Slot) -> None:
        if slot.idle_timer is not None:
            slot.idle_timer.cancel()
            slot.idle_timer = None

    def _close_now(self, slot: Slot, reason: str) -> None:
        """Close the slot's connection at once; the slot stays with its delivery."""
        connection = slot.connection
        assert connection is not None
        connection.wire.close()
        self._log_close(connection, reason)
        slot.connection = None

    def _drop(self, slot: Slot, reason: str) -> None:
        """QUIT the slot's connection in the background; the slot stays with its delivery."""
        assert slot.connection is not None
        self._quit_later(slot.connection, reason)
        slot.connection = None

    def _retire(self, slot: Slot, reason: str) -> None:
        """QUIT the connection of a slot nobody holds, then the slot is free."""
        self._unschedule(slot)
        connection = slot.connection
        slot.connection = None
        if connection is None:
            self.on_slot_free(slot)
            return
        self._quit_later(connection, reason, freeing=slot)

    def _quit_later(self, connection: Connection, reason: str, freeing: Slot | None = None) -> None:
        """QUIT and close in the background, then free ``freeing``; close() waits for it."""
        task = asyncio.get_running_loop().create_task(self._quit(connection, reason, freeing))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, connection: Connection, reason: str, freeing: Slot | None) -> None:
        wire = connection.wire
        try:
            if wire.is_connected:
                wire.write(b"QUIT\r\n")
                await wire.read_reply(min(QUIT_TIMEOUT, self.settings.command_timeout))
        except (Lost, Garbled, TimeoutError):
            pass  # closing anyway
        finally:
            wire.close()
            self._log_close(connection, reason)
            if freeing is not None:
                self.on_slot_free(freeing)

    def _log_close(self, connection: Connection, reason: str) -> None:
        log.debug(
            "closed connection to %s after %d messages (%s)",
            connection.relay,
            connection.session.transactions,
            reason,
        )
