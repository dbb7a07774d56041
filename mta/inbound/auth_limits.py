"""Rate limits on failed SMTP AUTH attempts, per client address: the rules, pure.

A password guesser gets few tries. Inside one session the listener counts
failures itself (``SESSION_MAX_FAILURES``, then 421 and close); across
sessions this table counts failures per client IP in a sliding window, and
once an address reaches ``max_failures`` within ``window`` seconds its AUTH
commands are refused for ``block`` seconds. A success does not clear the
count, so one valid account cannot be used to reset the guessing budget of
another.

No more than ``max_failures`` passwords from one address are ever checked in
a window: a check *begins* by reserving one of the address's tries
(``AuthRules.begin``), and a failure takes the reserved try (``fail``) while
a success gives it back (``release``). Tries reserved by checks still under
way count, so an address cannot get past its limit by sending its guesses on
many connections at once. A reservation lapses after ``pending_ttl`` seconds,
in case its holder died.

``AuthRules`` is the logic, on one address's ``ClientState`` and the time
given as arguments: no clock, no I/O. ``AuthFailures`` keeps the states in
the memory of one process (one worker, or a test); the node's workers share
one table in a file (``mta.inbound.node_sessions.NodeSessions``), so a block
holds on every worker at once (docs/architecture.md, invariant 6).

The table holds at most ``max_clients`` addresses: when it is full, expired
entries go first, then the least recently failing ones, so a flood of source
addresses cannot grow it without bound. The clock is injected, so the tests
need no sleeps.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Failed AUTH commands one session may make; the last one is answered 421.
SESSION_MAX_FAILURES = 3


@dataclass
class ClientState:
    """One address's record: its failures in the window (oldest first), the end
    of its block, and its checks under way (token -> when the try lapses)."""

    failures: list[float] = field(default_factory=list)
    blocked_until: float = 0.0
    pending: dict[str, float] = field(default_factory=dict)
    last: float = 0.0  # when it last failed or began a check: eviction order


@dataclass(frozen=True)
class AuthRules:
    """The per-address rules, as pure functions of a ``ClientState`` and ``now``."""

    max_failures: int = 10
    window: float = 300.0
    block: float = 600.0
    pending_ttl: float = 60.0  # a check reserved by a process that died lapses

    def blocked(self, client: ClientState, now: float) -> bool:
        return now < client.blocked_until

    def begin(self, client: ClientState, now: float, token: str) -> bool:
        """Reserve a try for the check ``token``; False: refused (blocked, or the
        address's tries are all failed or reserved)."""
        self._prune(client, now)
        if self.blocked(client, now) or len(client.failures) + len(client.pending) >= (
            self.max_failures
        ):
            return False
        client.pending[token] = now + self.pending_ttl
        client.last = now
        return True

    def fail(self, client: ClientState, now: float, token: str | None = None) -> bool:
        """A failed attempt (with the try ``token`` reserved, or none); True when
        that blocks the address."""
        client.pending.pop(token or "", None)
        client.failures.append(now)
        client.last = now
        self._prune(client, now)
        del client.failures[: -self.max_failures]
        if len(client.failures) >= self.max_failures:
            client.blocked_until = now + self.block
        return self.blocked(client, now)

    def release(self, client: ClientState, token: str) -> None:
        """The check ``token`` succeeded or never ran: its try comes back."""
        client.pending.pop(token, None)

    def expired(self, client: ClientState, now: float) -> bool:
        """Whether the record says nothing any more (it may be dropped)."""
        self._prune(client, now)
        return not client.failures and not client.pending and not self.blocked(client, now)

    def evictions(self, clients: Mapping[str, ClientState], now: float, keep: int) -> list[str]:
        """The addresses to drop so that ``keep`` remain: the expired ones, then
        the least recently failing."""
        if len(clients) <= keep:
            return []
        expired = [ip for ip, client in clients.items() if self.expired(client, now)]
        gone = set(expired)
        rest = sorted((c.last, ip) for ip, c in clients.items() if ip not in gone)
        excess = len(clients) - len(expired) - keep
        return expired + [ip for _, ip in rest[: max(excess, 0)]]

    def _prune(self, client: ClientState, now: float) -> None:
        while client.failures and client.failures[0] <= now - self.window:
            client.failures.pop(0)
        for token, lapses in list(client.pending.items()):
            if lapses <= now:
                del client.pending[token]


class AuthTable(Protocol):
    """Failed AUTH attempts per address: this module's ``AuthFailures`` (one
    process) or the node's file (``mta.inbound.node_sessions``)."""

    def blocked(self, ip: str) -> bool: ...

    def begin(self, ip: str) -> str | None: ...

    def failed(self, ip: str, token: str | None = None) -> bool: ...

    def release(self, ip: str, token: str) -> None: ...


_tokens = itertools.count()


def new_token() -> str:
    """A name for one check, unique on the node (the process's PID and a count)."""
    return f"{os.getpid()}.{next(_tokens)}"


class AuthFailures:
    """Failed AUTH attempts per client address, and which addresses are blocked,
    in the memory of one process."""

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 300.0,
        block: float = 600.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or max_clients < 1:
            raise ValueError("max_failures and max_clients must be at least 1")
        self.rules = AuthRules(max_failures, window, block)
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, ClientState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def blocked(self, ip: str) -> bool:
        """True while ``ip`` may not try to authenticate."""
        client = self._clients.get(ip)
        return client is not None and self.rules.blocked(client, self.clock())

    def begin(self, ip: str) -> str | None:
        """Reserve a try for a password check from ``ip``: its token, or None
        when the address may not try now."""
        now, token = self.clock(), new_token()
        client = self._clients.get(ip) or ClientState()
        if not self.rules.begin(client, now, token):
            return None
        self._clients[ip] = client
        self._bound(now)
        return token

    def failed(self, ip: str, token: str | None = None) -> bool:
        """Record one failed attempt from ``ip``; True when that blocks it."""
        now = self.clock()
        client = self._clients.pop(ip, None) or ClientState()
        self._clients[ip] = client  # most recently failing last
        blocks = self.rules.fail(client, now, token)
        self._bound(now)
        return blocks

    def release(self, ip: str, token: str) -> None:
        client = self._clients.get(ip)
        if client is not None:
            self.rules.release(client, token)
            if self.rules.expired(client, self.clock()):
                del self._clients[ip]

    def _bound(self, now: float) -> None:
        for ip in self.rules.evictions(self._clients, now, self.max_clients):
            del self._clients[ip]
