"""The ready queue: due jobs waiting in memory for a free egress path.

A due job has its route and its site; ``Egress.lease`` looks for a path
(source, site) of its pool with a free connection slot and rate budget. When
every usable path is busy, the job waits here, holding its delivery slot,
until a delivery ends somewhere or the earliest rate budget frees, and then
looks again. What counts as usable or busy, and how long the rate asks to
wait, is the caller's decision (mta.policy and Egress); this module is only
the waiting and the wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Busy:
    """Every usable path is busy: look again in ``retry_in`` seconds, or at a release."""

    retry_in: float


class ReadyQueue:
    """Jobs waiting for a path, woken when a delivery gives one back.

    Guarantees:

    - a waiter looks again (calls its ``attempt`` with a fresh time) after
      every ``wake``, and at the latest ``retry_in`` or ``recheck`` seconds
      after it began waiting, whichever comes first;
    - ``wake`` wakes every waiter, whatever path it waits for, since a job
      may leave over any source of its pool; they look again in the order
      they began waiting.

    It is not first come, first served: a woken waiter competes with jobs
    that ask before it runs, the first to look takes the free slot, and the
    others wait again.
    """

    def __init__(self, clock: Callable[[], float], recheck: float) -> None:
        self.clock = clock
        self.recheck = recheck
        self._released = asyncio.Event()

    async def wait(self, attempt: Callable[[float], T | Busy]) -> T:
        """The first answer of ``attempt(now)`` that is not ``Busy``."""
        while True:
            outcome = attempt(self.clock())
            if not isinstance(outcome, Busy):
                return outcome
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), min(outcome.retry_in, self.recheck))

    def wake(self) -> None:
        """A path has a free slot again: every waiter looks again."""
        self._released.set()
