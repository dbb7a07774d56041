"""Rate limits on failed SMTP AUTH attempts, per client address: a pure table.

A password guesser gets few tries. Inside one session the listener counts
failures itself (``SESSION_MAX_FAILURES``, then 421 and close); across
sessions this table counts failures per client IP in a sliding window, and
once an address reaches ``max_failures`` within ``window`` seconds its AUTH
commands are refused for ``block`` seconds. A success does not clear the
count, so one valid account cannot be used to reset the guessing budget of
another.

The table holds at most ``max_clients`` addresses: when it is full, expired
entries go first, then the least recently failing ones, so a flood of source
addresses cannot grow it without bound. The clock is injected, so the tests
need no sleeps.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Failed AUTH commands one session may make; the last one is answered 421.
SESSION_MAX_FAILURES = 3


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class AuthFailures:
    """Failed AUTH attempts per client address, and which addresses are blocked."""

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
        self.max_failures = max_failures
        self.window = window
        self.block = block
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def blocked(self, ip: str) -> bool:
        """True while ``ip`` may not try to authenticate."""
        client = self._clients.get(ip)
        return client is not None and self.clock() < client.blocked_until

    def failed(self, ip: str) -> bool:
        """Record one failed attempt from ``ip``; True when that blocks it."""
        now = self.clock()
        client = self._clients.pop(ip, None) or _Client()
        self._clients[ip] = client  # most recently failing last
        client.failures.append(now)
        while client.failures and client.failures[0] <= now - self.window:
            client.failures.popleft()
        while len(client.failures) > self.max_failures:
            client.failures.popleft()
        if len(client.failures) >= self.max_failures:
            client.blocked_until = now + self.block
        self._bound(now)
        return now < client.blocked_until

    def _bound(self, now: float) -> None:
        if len(self._clients) <= self.max_clients:
            return
        for ip in [ip for ip, client in self._clients.items() if self._expired(client, now)]:
            del self._clients[ip]
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def _expired(self, client: _Client, now: float) -> bool:
        recent = client.failures and client.failures[-1] > now - self.window
        return not recent and now >= client.blocked_until
