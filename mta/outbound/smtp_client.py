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
offered), 4.7.5 "cryptographic failure" (TLS required, the handshake or the
certificate failed), 4.5.0 "other protocol status" (a reply without a valid
code); a server that refused to talk keeps its own code, made temporary. All
are "451 <status> <what happened>", Postfix-worded ("connect to
mx[192.0.2.1]:25: Connection refused", "host mx[...]:25 said: 421 ... (in
reply to MAIL FROM)").

TLS follows the delivery's policy (mta.policy.tls), connection by connection:
``none`` never STARTTLS; ``may`` (the default, Postfix's name) STARTTLS when
offered, with no certificate checks, and after a failed handshake the same
address once more in plaintext, so that a broken TLS stack cannot hold mail;
``encrypt`` TLS required, any certificate; ``verify`` TLS required, the chain
valid against ``ca_file`` (or the system's store) and issued to the MX host's
name; ``dane`` TLS required, the chain matching the host's TLSA records
(mta.policy.dane; RFC 7672 2.2: a host without records gets ``may``, one whose
records are all unusable ``encrypt``). A required level never falls back to
plaintext: the address fails, 4.7.4 when STARTTLS is not offered (or refused),
4.7.5 when the handshake or the certificate fails, saying which. Under an
MTA-STS policy in ``enforce`` mode only the MX hosts it names are tried; in
``testing`` mode mail goes as under ``may`` and what enforce would have
refused is only reported. ``on_tls`` hears of every failure, and of every new
TLS connection (TLS-RPT, metrics).

Connections are pooled and reused for the next message: after a failed
transaction the next one starts with RSET, a connection carries at most
``max_messages_per_connection`` transactions and closes (QUIT) after
``idle_timeout`` unused. A pooled connection the server closed meanwhile is
replaced silently. A connection is checked out of the pool while in use, so
concurrent deliveries never share one. A pooled connection remembers what its
TLS proved (``Assurance``) and carries only mail whose policy that satisfies:
a ``verify`` delivery never reuses a plaintext or unverified connection.

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
from mta.outbound.tls_compat import peer_chain
from mta.outbound.wire import Garbled, Lost, Wire, extensions
from mta.policy import dane
from mta.policy.tls import REQUIRED, Failure, Level, Tlsa, TlsPolicy, mx_matches

log = logging.getLogger("mta.outbound.client")

NO_RELAY = "none"
# QUIT is a courtesy: never let a slow server hold up closing or shutdown.
QUIT_TIMEOUT = 5.0

# OpenSSL's X509_V_ERR_* codes, by the RFC 8460 result they are.
VERIFY_FAILURES = {
    10: Failure.CERTIFICATE_EXPIRED,  # CERT_HAS_EXPIRED
    62: Failure.CERTIFICATE_HOST_MISMATCH,  # HOSTNAME_MISMATCH
    64: Failure.CERTIFICATE_HOST_MISMATCH,  # IP_ADDRESS_MISMATCH (a route to an IP)
    2: Failure.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    18: Failure.CERTIFICATE_NOT_TRUSTED,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: Failure.CERTIFICATE_NOT_TRUSTED,  # SELF_SIGNED_CERT_IN_CHAIN
    20: Failure.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: Failure.CERTIFICATE_NOT_TRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}
SAID = {
    Failure.CERTIFICATE_HOST_MISMATCH: "certificate host name mismatch",
    Failure.CERTIFICATE_EXPIRED: "certificate expired",
    Failure.CERTIFICATE_NOT_TRUSTED: "certificate not trusted",
    Failure.VALIDATION_FAILURE: "certificate not valid",
    Failure.TLSA_INVALID: "TLSA mismatch",
}

OnTls = Callable[[TlsPolicy, str, Failure | None], None]
OPPORTUNISTIC = TlsPolicy()  # may: a delivery that names no policy


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
    ca_file: str | None = None  # the CAs the verify level trusts; None: the system's store

    @property
    def end_of_data_timeout(self) -> float:
        """The timeout for DATA, the message and the final reply."""
        if self.data_timeout is not None:
            return self.data_timeout
        return 2 * self.command_timeout


@dataclass(frozen=True)
class Assurance:
    """What a connection's TLS proved, so that a pooled one carries only mail it is
    good enough for: nothing (NONE: plaintext), encryption (ENCRYPT: any
    certificate), or also the server's identity as ``host`` (VERIFY, or DANE by
    the records ``tlsa``)."""

    level: Level = Level.NONE
    host: str = ""
    tlsa: tuple[Tlsa, ...] = ()


@dataclass(frozen=True)
class Demand:
    """What TLS a connection to one MX host must give under a policy."""

    policy: TlsPolicy
    level: Level  # the policy's level for this host (under dane, by its records)
    host: str
    tlsa: tuple[Tlsa, ...] = ()  # DANE: the host's usable records
    second_try: bool = False  # after a failed handshake: that session is reported already

    @property
    def enforced(self) -> bool:
        """Must the connection fail without it? (MTA-STS testing only reports.)"""
        return self.level in REQUIRED and not self.policy.testing

    def proven(self) -> Assurance:
        """What a TLS connection opened for this demand proves."""
        if self.level in (Level.VERIFY, Level.DANE):
            return Assurance(self.level, self.host, self.tlsa)
        return Assurance(Level.ENCRYPT)

    def accepts(self, assurance: Assurance) -> bool:
        """May a connection that proved ``assurance`` carry mail under this demand?"""
        if not self.enforced:
            return True
        if self.level is Level.ENCRYPT:
            return assurance.level is not Level.NONE
        return assurance == self.proven()

    def fallback(self) -> Demand:
        """What an unenforced demand tries after a failed handshake: TLS without
        checks, then plaintext; the session is reported once, as the failure."""
        level = Level.NONE if self.level is Level.MAY else Level.MAY
        return Demand(TlsPolicy(level), level, self.host, second_try=True)

    @classmethod
    def of(cls, policy: TlsPolicy, host: str) -> Demand:
        """What ``policy`` demands of MX host ``host``. Under dane it depends on the
        host's TLSA records (RFC 7672 2.2, Postfix's dane level): usable ones
        authenticate the server, a set with none usable still requires TLS, and a
        host without records gets opportunistic TLS."""
        if policy.level is not Level.DANE:
            return cls(policy, policy.level, host)
        records = policy.tlsa.get(host)
        if records is None:
            return cls(policy, Level.MAY, host)
        usable = dane.usable(records)
        return cls(policy, Level.DANE if usable else Level.ENCRYPT, host, usable)


@dataclass(frozen=True)
class _Target:
    host: MxHost
    address: str
    demand: Demand

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
    assurance: Assurance


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


class _TlsFailed(Exception):
    """The connection cannot give the TLS its demand asks for."""

    def __init__(self, failure: Failure, text: str) -> None:
        super().__init__(failure, text)
        self.failure = failure
        self.text = text  # "TLS handshake with mx[192.0.2.1]:25 failed: ..."

    def reply(self, policy: TlsPolicy) -> Reply:
        """The deferral, saying what failed and whose word required TLS."""
        code = "4.7.4" if self.failure is Failure.STARTTLS_NOT_SUPPORTED else "4.7.5"
        return temporary(code, f"{self.text} ({REQUIRED_BY[policy.source]} {policy.level})")


def format_relay(name: str, address: str, port: int) -> str:
    """Postfix's relay= form: name[address]:port."""
    return f"{name}[{address}]:{port}"


def _targets(route: Route, policy: TlsPolicy) -> list[_Target]:
    """Every (host, address) of the route, in order, each address once."""
    seen: set[tuple[str, int]] = set()
    targets = []
    for host in route.hosts:
        for address in host.addresses:
            target = _Target(host, address, Demand.of(policy, host.name))
            if target.key not in seen:
                seen.add(target.key)
                targets.append(target)
    return targets


def _unverified_context() -> ssl.SSLContext:
    # No certificate or name checks: a self-signed or expired certificate still
    # gives encryption against passive listeners (and DANE checks the chain itself).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _handshake_failure(error: Exception) -> tuple[Failure, str]:
    """Why a handshake failed: RFC 8460's name for it, and what to say."""
    if isinstance(error, ssl.SSLCertVerificationError):
        failure = VERIFY_FAILURES.get(error.verify_code, Failure.VALIDATION_FAILURE)
        return failure, f"{SAID[failure]} ({error.verify_message})"
    return Failure.VALIDATION_FAILURE, str(error) or type(error).__name__


# Whose word a required level is, for the deferral's text (and so `mta queue list`).
REQUIRED_BY = {
    "default": "[delivery] tls_level:",
    "config": "[delivery] tls_policy:",
    "mta-sts": "the domain's MTA-STS policy:",
    "dane": "the MX host's DANE TLSA records:",
}


def _handshake_failed(relay: str, why: str) -> str:
    return f"TLS handshake with {relay} failed: {why}"


def _sts_refusal(route: Route, policy: TlsPolicy) -> str:
    patterns = ", ".join(policy.mx_patterns)
    return f"no MX host of {route.domain} matches its MTA-STS policy (mx: {patterns})"


def _no_host(route: Route, policy: TlsPolicy) -> str:
    if policy.mx_patterns and not policy.testing:
        return _sts_refusal(route, policy)
    return f"no MX host for {route.domain}"


class Deliverer:
    """Delivers messages over SMTP, keeping a pool of open connections."""

    def __init__(
        self,
        settings: ClientSettings,
        on_slot_free: Callable[[Slot], None] = lambda slot: None,
        on_tls: OnTls = lambda policy, host, failure: None,
    ) -> None:
        self.settings = settings
        self.on_slot_free = on_slot_free
        self.on_tls = on_tls
        self._unverified = _unverified_context()
        self._verifying = ssl.create_default_context(cafile=settings.ca_file)
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
        tls: TlsPolicy = OPPORTUNISTIC,
    ) -> Delivery:
        """Send ``data`` from ``sender`` to ``recipients`` over ``route``; one reply each.

        ``max_messages``: the destination's own limit of messages per
        connection, when lower than ``ClientSettings.max_messages_per_connection``.
        ``slot``: the connection slot this delivery holds (its connection is
        used if ``tls`` accepts it, or one is opened for it); the caller gives
        it back with ``give_back``. Without one, an idle connection to the
        route that ``tls`` accepts is reused. ``tls``: the destination's TLS policy.
        """
        targets = _targets(route, tls)
        if tls.mx_patterns:
            targets = self._sts_hosts(targets, route, tls)
        no_host = _no_host(route, tls)
        if slot is not None:
            return await self._deliver(
                targets, no_host, slot, sender, recipients, data, max_messages
            )
        demands = {target.key: target.demand for target in targets}

        def usable(connection: Connection) -> bool:
            wanted = demands.get(connection.key)
            return wanted is not None and wanted.accepts(connection.assurance)

        borrowed = self._take("", usable) or Slot("")
        try:
            return await self._deliver(
                targets, no_host, borrowed, sender, recipients, data, max_messages
            )
        finally:
            self.give_back(borrowed)

    def take_idle(self, path: str, domain: str) -> Slot | None:
        """An idle slot of ``path``, with its open connection, for a delivery to
        ``domain``; ``deliver`` replaces the connection if its TLS policy needs more."""
        return self._take(path, lambda connection: True)

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
        no_host: str,  # what to say when no address is left to try
        slot: Slot,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        max_messages: int | None,
    ) -> Delivery:
        rcpts = list(dict.fromkeys(recipients))
        if not rcpts:
            return Delivery(NO_RELAY, {})
        pooled = slot.connection
        if pooled is not None:
            # A pooled connection saves a handshake: its host first.
            first = next((t for t in targets if t.key == pooled.key), None)
            if first is None:  # the route no longer lists that address
                self._drop(slot, "not on the route")
            elif not first.demand.accepts(pooled.assurance):
                self._drop(slot, "less TLS than the policy requires")
            else:
                targets.remove(first)
                targets.insert(0, first)
        failure = Unavailable(temporary("4.4.4", no_host), NO_RELAY)
        for target in targets:
            try:
                return await self._deliver_via(target, slot, sender, rcpts, data, max_messages)
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
        slot.connection = await self._open(target, target.demand)
        return await self._transaction(slot, target, sender, rcpts, data, max_messages)

    async def _open(self, target: _Target, demand: Demand) -> Connection:
        """A connected, greeted, EHLO'd connection, encrypted as ``demand`` asks;
        unless it is enforced, a failed handshake is retried with its fallback."""
        relay = target.relay
        wire = await self._greeted(target)
        try:
            offered = await self._hello(wire, relay)
            offered, assurance = await self._secure(wire, target, demand, offered)
        except _TlsFailed as failed:
            wire.close()
            self._tls_failed(demand, relay, failed)
            if demand.enforced:
                raise Unavailable(failed.reply(demand.policy), relay) from None
            return await self._open(target, demand.fallback())
        except BaseException:
            wire.close()
            raise
        log.debug("connected to %s tls=%s", relay, assurance.level)
        return Connection(wire, ClientSession(offered), target.key, relay, assurance)

    async def _greeted(self, target: _Target) -> Wire:
        """A connection to the target that has had its 220 greeting."""
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
        except BaseException:
            wire.close()
            raise
        return wire

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

    async def _secure(
        self, wire: Wire, target: _Target, demand: Demand, offered: dict[str, str]
    ) -> tuple[dict[str, str], Assurance]:
        """STARTTLS as ``demand`` asks: the extensions offered then, and what the
        TLS proved. Raises _TlsFailed when the connection cannot go on as it is."""
        if demand.level is Level.NONE:
            return offered, Assurance()
        relay = target.relay
        if "starttls" not in offered:
            return offered, self._without_tls(demand, relay, f"was not offered by host {relay}")
        refusal = await self._starttls(wire, relay)
        if refusal is not None:
            what = f"host {relay} refused STARTTLS: {refusal}"
            return offered, self._without_tls(demand, relay, what)
        ssl_object = await self._handshake(wire, target, demand)
        self._authenticate(ssl_object, relay, demand)
        if not demand.second_try:
            self.on_tls(demand.policy, demand.host, None)
        # RFC 3207 4.2: what the server offered before TLS is forgotten.
        return await self._hello(wire, relay), demand.proven()

    async def _starttls(self, wire: Wire, relay: str) -> Reply | None:
        """STARTTLS: None when the server is ready for the handshake, else its refusal
        (plaintext may go on)."""
        wire.write(b"STARTTLS\r\n")
        try:
            reply = await wire.read_reply(self.settings.command_timeout)
        except Garbled as garbled:
            why = f"malformed reply to STARTTLS: {garbled.text[:200]!r}"
            raise _TlsFailed(Failure.VALIDATION_FAILURE, _handshake_failed(relay, why)) from None
        except (Lost, TimeoutError) as error:
            why = str(error) or type(error).__name__
            raise _TlsFailed(Failure.VALIDATION_FAILURE, _handshake_failed(relay, why)) from None
        if reply.code == 220:
            return None
        if reply.code == SERVICE_UNAVAILABLE:
            raise Unavailable(refused(relay, reply, "STARTTLS"), relay)
        return reply

    async def _handshake(self, wire: Wire, target: _Target, demand: Demand) -> ssl.SSLObject:
        """The TLS handshake; under verify, the chain and the MX host's name checked."""
        context = self._verifying if demand.level is Level.VERIFY else self._unverified
        try:
            return await wire.start_tls(context, self.settings.command_timeout, target.host.name)
        except (OSError, Lost) as error:  # OSError covers ssl.SSLError and TimeoutError
            failure, why = _handshake_failure(error)
            raise _TlsFailed(failure, _handshake_failed(target.relay, why)) from None

    def _authenticate(self, ssl_object: ssl.SSLObject, relay: str, demand: Demand) -> None:
        """Under dane: the chain the server presented must match the host's TLSA records."""
        if demand.level is not Level.DANE:
            return
        failure = dane.check(peer_chain(ssl_object), demand.tlsa, demand.host)
        if failure is not None:
            why = f"{SAID[failure]} (DANE: the TLSA records of {demand.host})"
            raise _TlsFailed(failure, _handshake_failed(relay, why))

    def _without_tls(self, demand: Demand, relay: str, what: str) -> Assurance:
        """Plaintext goes on, unless ``demand`` requires TLS (MTA-STS testing: noted)."""
        if demand.level in REQUIRED:
            failed = _TlsFailed(Failure.STARTTLS_NOT_SUPPORTED, f"TLS is required, but {what}")
            if demand.enforced:
                raise failed
            self._tls_failed(demand, relay, failed)
        return Assurance()

    def _tls_failed(self, demand: Demand, relay: str, failed: _TlsFailed) -> None:
        """One log line and one report per failure."""
        policy = demand.policy
        log.info(
            "relay=%s tls=%s source=%s%s result=%s (%s)",
            relay,
            demand.level,
            policy.source,
            " testing" if policy.testing else "",
            failed.failure,
            failed.text,
        )
        self.on_tls(policy, demand.host, failed.failure)

    def _sts_hosts(self, targets: list[_Target], route: Route, policy: TlsPolicy) -> list[_Target]:
        """MTA-STS (RFC 8461 4.1): only the MX hosts the policy names; in testing mode
        every host, noting when enforce would have found none."""
        named = [t for t in targets if any(mx_matches(t.host.name, p) for p in policy.mx_patterns)]
        if not named:
            host = route.hosts[0].name
            failed = _TlsFailed(Failure.VALIDATION_FAILURE, _sts_refusal(route, policy))
            self._tls_failed(Demand.of(policy, host), host, failed)
        return targets if policy.testing else named

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

    def _take(self, path: str, usable: Callable[[Connection], bool]) -> Slot | None:
        """An idle slot of ``path`` whose connection is open and ``usable``."""
        idle = self._idle.get(path, [])
        # Most recently used first, so that surplus connections age out.
        for slot in reversed(list(idle)):
            connection = slot.connection
            assert connection is not None
            if not usable(connection):
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
            else:
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
