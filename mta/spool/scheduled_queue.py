"""The scheduler: which jobs to try now, and the delivery slots they hold.

The spool indexes every ready job by domain, then next attempt time. A pass
walks the domains, not the jobs: one seek per domain finds its soonest job,
and a domain with none due, one another worker owns, or one at its
concurrency limit is passed over as a whole, so a backlog of a million jobs
for one domain costs a pass one seek, not a million reads. A due domain's
jobs are found by a seek in its part of the index. A job is started when it
is due, not already in flight, and its domain and the whole node are under
their concurrency limits. A pass visits at most ``DOMAINS_PER_PASS`` domains
before it lets the event loop run again; the next pass goes on from there,
and so does the one after the node-wide limit stopped a pass, so that every
domain gets its turn.

Priorities. A domain's due transactional jobs start before its due bulk
ones: the spool indexes them apart too (``Spool.due_in``), and a pass or a
refill seeks a domain's due bulk jobs only once none of its due transactional
ones is left waiting for room (so that seek passes over few of them).

Delivery slots. ``max_concurrent`` (per worker) and ``max_per_domain`` bound
the jobs that hold a delivery slot: a job holds one while it routes, while it
looks for a path and while it talks SMTP, but not while it waits in a ready
queue for a path (mta.outbound.ready_queue gives the slot back before it
waits and takes one again before its next look: ``current_slot``), nor
while its result is committed (mta.outbound.dispatcher gives it back when
the SMTP transaction ends). So a
throttled site's backlog waits without slots: a transactional job to one of
its domains, or mail to other sites, still starts. A freed slot goes first to
a waiting job that wants to look again (transactional first), then to new
jobs. What waits is bounded apart, per priority, so that memory stays bounded
whatever the backlog and waiting bulk mail never keeps a transactional job
from starting: of one priority, a domain has at most ``max_per_domain`` jobs
in flight besides as many holding slots (twice ``max_per_domain`` in all), and
a worker at most ``WAITING_PER_SLOT`` times ``max_concurrent`` besides.

In-flight jobs are leased in memory only: their index entries stay put, so a
crash or restart simply finds them due again (at least once:
docs/architecture.md, invariant 3), and a job is started only when it is not
in flight, so one job has one attempt at a time. A committed message's jobs
are offered directly (``offer``: no polling delay in the normal path); a
freed slot or a finished attempt looks up its domain's next due jobs with a
seek in the per-domain index; a pass runs at least every ``poll`` seconds
(retries coming due, and ``mta queue flush|release`` from another process)
and when a worker-wide limit had turned jobs away.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import lmdb

from mta.config import PRIORITIES, Config
from mta.spool.records import JobState, split_job_key
from mta.spool.store import FIRST, Spool

log = logging.getLogger("mta.scheduler")

Attempt = Callable[[bytes], Coroutine[Any, Any, None]]
CRASH_PAUSE = 60.0
DOMAINS_PER_PASS = 500  # domains one pass looks at before the event loop runs again
# Jobs of one priority a worker may have in flight besides those holding slots,
# per slot of max_concurrent: waiting costs memory (the job, its message), not slots.
WAITING_PER_SLOT = 4
SLOTS = "slots"  # what turned jobs away: a full worker (else the name of a priority)


def precedence(priority: str) -> int:
    """Where ``priority`` goes: lower first (one that is no priority goes last)."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else len(PRIORITIES)


class DeliverySlot:
    """A job's delivery slot, as the ready queue sees it. This base is the slot of a
    job no scheduler started (a test, a tool): it has no limits to keep."""

    def give_back(self) -> None:
        """The job waits for a path: others may use the slot meanwhile."""

    async def take(self) -> None:
        """Before the job looks for a path again: hold a slot, waiting for one."""


# The slot of the job the current task delivers: the scheduler sets it in each
# attempt task it starts (a task runs in a copy of its creator's context). The
# ready queue finds it here rather than through every call between the two
# (the attempt, Egress.lease), which have nothing to do with it.
_CURRENT_SLOT: contextvars.ContextVar[DeliverySlot | None] = contextvars.ContextVar(
    "delivery_slot", default=None
)
_NO_LIMITS = DeliverySlot()


def current_slot() -> DeliverySlot:
    """The delivery slot of the job the current task delivers."""
    return _CURRENT_SLOT.get() or _NO_LIMITS


class _Slot(DeliverySlot):
    """The slot of a job this scheduler started."""

    def __init__(self, scheduler: Scheduler, domain: str, priority: str) -> None:
        self.scheduler, self.domain, self.priority = scheduler, domain, priority
        self.held = False
        self.granted: asyncio.Future[None] | None = None  # while it waits for a slot

    def give_back(self) -> None:
        if self.held:
            self.scheduler._unhold(self)
            self.scheduler._freed(self.domain)

    async def take(self) -> None:
        if self.held:
            return
        if self.scheduler._fits(self.domain):
            self.scheduler._hold(self)
            return
        self.granted = asyncio.get_running_loop().create_future()
        self.scheduler._takers.append(self)
        try:
            await self.granted
        finally:
            self.granted = None
            if not self.held:  # cancelled while it waited
                self.scheduler._takers.remove(self)


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        attempt: Attempt,
        max_concurrent: int,
        max_per_domain: int,
        clock: Callable[[], float] = time.time,
        poll: float = 1.0,
        owns: Callable[[str], bool] = lambda domain: True,
    ) -> None:
        self.spool = spool
        self.attempt = attempt
        self.max_concurrent = max_concurrent
        self.max_per_domain = max_per_domain
        self.clock = clock
        self.poll = poll
        self.owns = owns
        self.in_flight: dict[bytes, asyncio.Task[None]] = {}  # started, not finished
        self.held = 0  # jobs holding a delivery slot
        self._held_in: Counter[str] = Counter()  # the same, per domain
        self._started: Counter[tuple[str, str]] = Counter()  # in flight per (domain, priority)
        self._started_total: Counter[str] = Counter()  # in flight per priority
        self._takers: list[_Slot] = []  # jobs waiting for a slot to look for a path
        self._crashed: dict[bytes, float] = {}  # job key -> when to try it again
        self._full: set[str] = set()  # what turned due jobs away (SLOTS, priorities)
        self._resume_at = ""  # the domain the next pass starts from ("": the first)
        self._soonest: float | None = None  # the soonest future job seen in this round
        self._wakeup = asyncio.Event()
        self._stopping = False

    def reload(self, config: Config) -> None:
        """Take new concurrency limits; deliveries under way finish as they are."""
        self.max_concurrent = config.delivery.max_concurrent
        self.max_per_domain = config.delivery.max_concurrent_per_domain
        self._serve_takers()  # the limits may have grown

    def wake(self) -> None:
        """Scan the whole due index now (an operator flushed or released jobs)."""
        self._wakeup.set()

    def offer(self, keys: Iterable[bytes]) -> None:
        """Committed jobs (by key): try those of domains this worker owns at once,
        limits permitting. One that must wait starts when its domain has a free
        slot (``_refill``)."""
        if self._stopping:
            return
        now = self.clock()
        with self.spool.read() as txn:
            for key in keys:
                domain = split_job_key(key)[1]
                if not self.owns(domain):
                    continue
                job = self.spool.job(txn, key)  # its priority
                if job is not None and job.state is JobState.READY:
                    self._try_start(key, domain, job.priority, now)

    async def run(self) -> None:
        while not self._stopping:
            next_due = self.start_due()
            wait = self.poll if next_due is None else max(0.0, next_due - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(wait, self.poll))
            self._wakeup.clear()

    def start_due(self) -> float | None:
        """Start the due jobs the limits allow, domain by domain from where the last
        pass stopped; when to pass again: now if this pass stopped early, else the
        soonest future job seen in a round of every domain (None: none seen)."""
        now = self.clock()
        self._full.clear()
        with self.spool.read() as txn:
            domains = self.spool.domains_with_ready_jobs(txn, self._resume_at)
            for visited, (domain, soonest) in enumerate(domains):
                if visited == DOMAINS_PER_PASS:
                    self._resume_at = domain
                    return now  # the event loop runs, then this goes on
                if soonest > now:
                    if self.owns(domain):
                        self._soonest = min(soonest, self._soonest or soonest)
                    continue
                if self._worker_full():
                    self._resume_at = domain  # its turn comes first when room frees
                    return None
                if self.owns(domain):
                    self._start_domain(txn, domain, now)
        self._resume_at = ""
        round_soonest, self._soonest = self._soonest, None
        return round_soonest

    # --- limits ---

    def _fits(self, domain: str) -> bool:
        """A delivery slot is free for a job of ``domain``."""
        return self.held < self.max_concurrent and self._held_in[domain] < self.max_per_domain

    def _room(self, domain: str, priority: str) -> int:
        """How many more jobs of ``domain`` and ``priority`` may start now."""
        return max(
            0,
            min(
                self.max_concurrent - self.held,
                self.max_per_domain - self._held_in[domain],
                2 * self.max_per_domain - self._started[domain, priority],
                self._most_in_flight() - self._started_total[priority],
            ),
        )

    def _most_in_flight(self) -> int:
        """Jobs of one priority a worker may have in flight: those holding slots and
        those waiting for a path."""
        return (1 + WAITING_PER_SLOT) * self.max_concurrent

    def _worker_full(self) -> bool:
        """No job of this worker may start, of any priority: a pass stops here."""
        if self.held >= self.max_concurrent:
            self._full.add(SLOTS)
            return True
        most = self._most_in_flight()
        if all(self._started_total[p] >= most for p in PRIORITIES):
            self._full.update(PRIORITIES)
            return True
        return False

    def _may_start(self, domain: str, priority: str) -> bool:
        if self._room(domain, priority):
            return True
        # Worker-wide limits turn other domains away too: when room frees, a pass
        # gives it to them first, not to the domain that had it.
        if self.held >= self.max_concurrent:
            self._full.add(SLOTS)
        if self._started_total[priority] >= self._most_in_flight():
            self._full.add(priority)
        return False

    def _hold(self, slot: _Slot) -> None:
        slot.held = True
        self.held += 1
        self._held_in[slot.domain] += 1

    def _unhold(self, slot: _Slot) -> None:
        slot.held = False
        self.held -= 1
        self._held_in[slot.domain] -= 1
        if not self._held_in[slot.domain]:
            del self._held_in[slot.domain]

    def _serve_takers(self) -> None:
        """Free slots go to jobs waiting for one to look for a path before anything
        starts: transactional ones first, then in turn."""
        for slot in sorted(self._takers, key=lambda taker: precedence(taker.priority)):
            if self._fits(slot.domain):
                assert slot.granted is not None
                self._takers.remove(slot)
                self._hold(slot)
                slot.granted.set_result(None)

    def _freed(self, domain: str, priority: str | None = None) -> None:
        """A slot of ``domain`` came free (and a job of ``priority`` finished): first
        to a job waiting for one, then to the domains a worker-wide limit turned away
        (a pass goes on from the first of them), else to ``domain``'s next jobs."""
        self._serve_takers()
        if self._stopping:
            return
        if SLOTS in self._full or priority in self._full:
            self.wake()
        else:
            self._refill(domain)

    # --- starting ---

    def _try_start(self, key: bytes, domain: str, priority: str, now: float) -> bool:
        """Start the job unless it runs, paused after a crash, or a limit says no."""
        if key in self.in_flight or self._crashed.get(key, 0.0) > now:
            return False
        if not self._may_start(domain, priority):
            return False
        self._start(key, domain, priority)
        return True

    def _refill(self, domain: str) -> None:
        """A slot of ``domain`` came free: start its next due jobs."""
        if self._stopping or not self._fits(domain):
            return
        with self.spool.read() as txn:
            self._start_domain(txn, domain, self.clock())

    def _start_domain(self, txn: lmdb.Transaction, domain: str, now: float) -> None:
        """Start ``domain``'s due jobs up to its limits, transactional ones first."""
        if not self._fits(domain):
            return  # at its limit: passed over without a read
        for priority in PRIORITIES:
            if not self._start_of(txn, domain, priority, now):
                return  # the next priority waits until this one's due jobs have room

    def _start_of(self, txn: lmdb.Transaction, domain: str, priority: str, now: float) -> bool:
        """Start ``domain``'s due jobs of ``priority`` while the limits let them, found by
        a seek in the per-domain index (a scan of the whole backlog would cost as
        much as it); False if one was left waiting for room."""
        room = self._room(domain, priority)
        if not room and priority != FIRST:
            return False  # nothing to start, and nothing after it waits on this
        # Jobs in flight are still in the index: look past them, and one job
        # further for FIRST, to see whether one is left.
        limit = self._started[domain, priority] + room + (priority == FIRST)
        for key in self.spool.due_in(txn, domain, now, limit, priority):
            if not self._try_start(key, domain, priority, now) and self._waits_for_room(key, now):
                return False
        return True

    def _waits_for_room(self, key: bytes, now: float) -> bool:
        """A due job that was not started: for want of room (not in flight, not paused)."""
        return key not in self.in_flight and self._crashed.get(key, 0.0) <= now

    def _start(self, key: bytes, domain: str, priority: str) -> None:
        slot = _Slot(self, domain, priority)
        self._hold(slot)
        self._started[domain, priority] += 1
        self._started_total[priority] += 1
        context = contextvars.copy_context()
        context.run(_CURRENT_SLOT.set, slot)  # the attempt's task runs with its slot
        task = asyncio.get_running_loop().create_task(self.attempt(key), context=context)
        self.in_flight[key] = task
        task.add_done_callback(lambda done: self._finished(key, slot, done))

    def _finished(self, key: bytes, slot: _Slot, task: asyncio.Task[None]) -> None:
        del self.in_flight[key]
        if slot.held:
            self._unhold(slot)
        started = (slot.domain, slot.priority)
        self._started[started] -= 1
        if not self._started[started]:
            del self._started[started]
        self._started_total[slot.priority] -= 1
        if not task.cancelled() and task.exception() is not None:
            # The job stays due, so it is not lost; a pause keeps a job that
            # trips a bug from being retried in a tight loop.
            log.error("delivery attempt crashed", exc_info=task.exception())
            self._crashed[key] = self.clock() + CRASH_PAUSE
        else:
            self._crashed.pop(key, None)
        self._freed(slot.domain, slot.priority)

    async def stop(self, timeout: float) -> None:
        """Start nothing new; give attempts in flight ``timeout`` seconds, then
        cancel them (their jobs stay in the spool and are tried after restart)."""
        self._stopping = True
        self.wake()
        if self.in_flight:
            _, pending = await asyncio.wait(list(self.in_flight.values()), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
