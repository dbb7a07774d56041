"""The ready queue: due jobs waiting in memory for a free egress path.

A due job has its route and its site; ``Egress.lease`` looks for a path
(source, site) of its pool with a free connection slot and rate budget. When
every usable path is busy, the job waits here, in the line of its (pool,
site), until a delivery ends or the rate budget frees, and then looks again.
What counts as usable or busy, and how long to wait, is the caller's decision
(mta.policy, the shared limits and Egress); this module is only the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Busy:
    """Every usable path is busy: look again in ``retry_in`` seconds, or at a release."""

    retry_in: float


class ReadyQueue:
    """Jobs waiting for a path, one line per (pool, site), first come first served.

    Guarantees:

    - only the first ``lookers`` jobs of a line look (call their ``attempt``);
      the others wait behind them, so a busy site costs at most ``lookers``
      looks per wake-up, not one per waiting job. One looker is enough when a
      look is a write to the node's file; with Redis a look is a round trip,
      and several at once keep a line moving at the pace of the deliveries
      rather than of one round trip after another;
    - when a looking job leaves the line (it got a path, or was told to come
      back later), the next one looks at once;
    - a looking job looks again after every ``wake`` and at the latest
      ``retry_in`` or ``recheck`` seconds after its last look.
    """

    def __init__(self, clock: Callable[[], float], recheck: float, lookers: int = 1) -> None:
        self.clock = clock
        self.recheck = recheck
        self.lookers = lookers
        self._lines: dict[Hashable, deque[asyncio.Future[None]]] = {}
        self._released = asyncio.Event()

    async def wait(self, line: Hashable, attempt: Callable[[float], Awaitable[T | Busy]]) -> T:
        """The first answer of ``attempt(now)`` that is not ``Busy``, in ``line``'s order."""
        waiting = self._lines.setdefault(line, deque())
        turn = asyncio.get_running_loop().create_future()
        waiting.append(turn)
        try:
            if len(waiting) > self.lookers:
                await turn
            while True:
                outcome = await attempt(self.clock())
                if not isinstance(outcome, Busy):
                    return outcome
                self._released.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._released.wait(), min(outcome.retry_in, self.recheck)
                    )
        finally:
            self._leave(line, waiting, turn)

    def wake(self) -> None:
        """A path has a free slot again: the first job of every line looks again."""
        self._released.set()

    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _leave(
        self, line: Hashable, waiting: deque[asyncio.Future[None]], turn: asyncio.Future[None]
    ) -> None:
        # The first ``lookers`` jobs of a line are the ones looking: when one of
        # them leaves, the job that moves up to their number looks next.
        was_looking = waiting.index(turn) < self.lookers
        waiting.remove(turn)
        if not waiting:
            del self._lines[line]
        elif was_looking and len(waiting) >= self.lookers:
            next_up = waiting[self.lookers - 1]
            if not next_up.done():
                next_up.set_result(None)
