"""The ready queue: due jobs waiting in memory for a free egress path.

A due job has its route and its site; ``Egress.lease`` looks for a path
(source, site) of its pool with a free connection slot and rate budget. When
every usable path is busy, the job waits here, in the line of its (pool,
site, and domain if the domain has limits of its own), until a delivery ends
or the rate budget frees, and then looks again.
What counts as usable or busy, and how long to wait, is the caller's decision
(mta.policy, the shared limits and Egress); this module is only the waiting.

A line is in order of priority (transactional jobs before bulk ones), then
of arrival in the line. A job waiting here holds no delivery slot of the
scheduler (mta.spool.scheduled_queue): it gives its slot back before it
waits, and takes one again for each look, so a throttled site's backlog
waits without keeping other jobs from starting.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from mta.spool.scheduled_queue import current_slot, precedence

T = TypeVar("T")


@dataclass(frozen=True)
class Busy:
    """Every usable path is busy: look again in ``retry_in`` seconds, or at a release."""

    retry_in: float


@dataclass(eq=False)
class _Place:
    """A job's place in its line."""

    order: tuple[int, int]  # (its priority's precedence, its arrival in the line)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set: look (again) now
    turn_wait: bool = False  # waiting for its turn, not for a wake after a busy look


class ReadyQueue:
    """Jobs waiting for a path, one line per (pool, site[, domain]), by priority then in turn.

    Guarantees:

    - only the first ``lookers`` jobs of a line look (call their ``attempt``),
      and never more than ``lookers`` at once; the others wait behind them, so a
      busy site costs at most ``lookers`` looks per wake-up, not one per waiting
      job. One looker is enough when a look is a write to the node's file; with
      Redis a look is a round trip, and several at once keep a line moving at
      the pace of the deliveries rather than of one round trip after another;
    - a transactional job goes ahead of every bulk one in its line: a bulk job
      that is looking when it comes finishes that look, then waits behind it;
    - when a looking job leaves the line (it got a path, or was told to come
      back later), the next one looks at once;
    - a looking job looks again after every ``wake`` and at the latest
      ``retry_in`` or ``recheck`` seconds after its last look;
    - a job holds its delivery slot (``current_slot``) only for its looks and
      once it leaves with an answer; a look waits for a slot if none is free.
    """

    def __init__(self, clock: Callable[[], float], recheck: float, lookers: int = 1) -> None:
        self.clock = clock
        self.recheck = recheck
        self.lookers = lookers
        self._lines: dict[Hashable, list[_Place]] = {}  # each in order
        self._looks: Counter[Hashable] = Counter()  # looks under way per line
        self._arrivals = itertools.count()

    async def wait(
        self,
        line: Hashable,
        attempt: Callable[[float], Awaitable[T | Busy]],
        priority: str = "bulk",
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> T | None:
        """The first answer of ``attempt(now)`` that is not ``Busy``, in ``line``'s
        order; None if, after a wait, the job is no longer ``still_wanted`` (an
        operator held or deleted it meanwhile): it then takes no path at all."""
        place = _Place((precedence(priority), next(self._arrivals)))
        bisect.insort(self._lines.setdefault(line, []), place, key=lambda p: p.order)
        slot = current_slot()
        waited = False
        try:
            while True:
                pause: float | None = None  # None: until its turn comes
                if self._may_look(line, place):
                    await slot.take()  # perhaps a wait, while others of the line look
                place.turn_wait = not self._may_look(line, place)
                if not place.turn_wait:
                    if waited and not still_wanted():
                        return None
                    outcome = await self._look(line, place, attempt)
                    if not isinstance(outcome, Busy):
                        return outcome
                    pause = min(outcome.retry_in, self.recheck)
                # Wakes so far are past: a busy look's own (an idle connection it gave
                # back) must not make it look again at once.
                place.ready.clear()
                slot.give_back()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):  # no task per wait, unlike wait_for
                        await place.ready.wait()
                waited = True
        finally:
            self._leave(line, place)

    def wake(self) -> None:
        """A path has a free slot again: the first jobs of every line look again."""
        for places in self._lines.values():
            for place in places[: self.lookers]:
                place.ready.set()

    def waiting(self) -> int:
        return sum(len(places) for places in self._lines.values())

    def _may_look(self, line: Hashable, place: _Place) -> bool:
        return self._looks[line] < self.lookers and place in self._lines[line][: self.lookers]

    async def _look(
        self, line: Hashable, place: _Place, attempt: Callable[[float], Awaitable[T | Busy]]
    ) -> T | Busy:
        self._looks[line] += 1
        try:
            return await attempt(self.clock())
        finally:
            self._looks[line] -= 1
            if not self._looks[line]:
                del self._looks[line]
            self._call(line)  # a look fewer: one waiting for its turn may look

    def _call(self, line: Hashable) -> None:
        """Those of the first ``lookers`` of the line that wait for their turn look now."""
        for place in self._lines.get(line, [])[: self.lookers]:
            if place.turn_wait:
                place.ready.set()

    def _leave(self, line: Hashable, place: _Place) -> None:
        places = self._lines[line]
        places.remove(place)
        if places:
            self._call(line)  # the next one moves up among the first
        else:
            del self._lines[line]
