"""The scheduler: which jobs to try now.

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

In-flight jobs are leased in memory only: their index entries stay put, so a
crash or restart simply finds them due again (at least once:
docs/architecture.md, invariant 3). A committed message's jobs are offered
directly (``offer``: no polling delay in the normal path); a finished
attempt looks up its domain's next due job with a seek in the per-domain
index; a pass runs at least every ``poll`` seconds (retries coming due,
and ``mta queue flush|release`` from another process) and when the node-wide
limit had turned jobs away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import lmdb

from mta.config import Config
from mta.spool.records import split_job_key
from mta.spool.store import Spool

log = logging.getLogger("mta.scheduler")

Attempt = Callable[[bytes], Coroutine[Any, Any, None]]
CRASH_PAUSE = 60.0
DOMAINS_PER_PASS = 500  # domains one pass looks at before the event loop runs again


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
        self.in_flight: dict[bytes, asyncio.Task[None]] = {}
        self._per_domain: Counter[str] = Counter()
        self._crashed: dict[bytes, float] = {}  # job key -> when to try it again
        self._full = False  # the node-wide limit turned a due job away: scan when a slot frees
        self._resume_at = ""  # the domain the next pass starts from ("": the first)
        self._soonest: float | None = None  # the soonest future job seen in this round
        self._wakeup = asyncio.Event()
        self._stopping = False

    def reload(self, config: Config) -> None:
        """Take new concurrency limits; deliveries under way finish as they are."""
        self.max_concurrent = config.delivery.max_concurrent
        self.max_per_domain = config.delivery.max_concurrent_per_domain

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
        for key in keys:
            domain = split_job_key(key)[1]
            if self.owns(domain):
                self._try_start(key, domain, now)

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
        self._full = False
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
                if len(self.in_flight) >= self.max_concurrent:
                    self._full = True
                    self._resume_at = domain  # its turn comes first when a slot frees
                    return None
                if self.owns(domain):
                    self._start_domain(txn, domain, now)
        self._resume_at = ""
        round_soonest, self._soonest = self._soonest, None
        return round_soonest

    def _try_start(self, key: bytes, domain: str, now: float) -> bool:
        """Start the job unless it runs, paused after a crash, or a limit says no."""
        if key in self.in_flight or self._crashed.get(key, 0.0) > now:
            return False
        if len(self.in_flight) >= self.max_concurrent:
            self._full = True
            return False
        if self._per_domain[domain] >= self.max_per_domain:
            return False
        self._start(key, domain)
        return True

    def _refill(self, domain: str) -> None:
        """A slot of ``domain`` came free: start its next due jobs."""
        if self._stopping:
            return
        with self.spool.read() as txn:
            self._start_domain(txn, domain, self.clock())

    def _start_domain(self, txn: lmdb.Transaction, domain: str, now: float) -> None:
        """Start ``domain``'s due jobs up to its limit, found by a seek in the
        per-domain index (a scan of the whole backlog would cost as much as it)."""
        free = self.max_per_domain - self._per_domain[domain]
        if free <= 0:
            return
        # Jobs of the domain in flight are still in the index: look past them.
        for key in self.spool.due_in(txn, domain, now, free + self._per_domain[domain]):
            if self._per_domain[domain] >= self.max_per_domain:
                return
            self._try_start(key, domain, now)

    def _start(self, key: bytes, domain: str) -> None:
        self._per_domain[domain] += 1
        task = asyncio.get_running_loop().create_task(self.attempt(key))
        self.in_flight[key] = task
        task.add_done_callback(lambda done: self._finished(key, domain, done))

    def _finished(self, key: bytes, domain: str, task: asyncio.Task[None]) -> None:
        del self.in_flight[key]
        self._per_domain[domain] -= 1
        if not self._per_domain[domain]:
            del self._per_domain[domain]
        if not task.cancelled() and task.exception() is not None:
            # The job stays due, so it is not lost; a pause keeps a job that
            # trips a bug from being retried in a tight loop.
            log.error("delivery attempt crashed", exc_info=task.exception())
            self._crashed[key] = self.clock() + CRASH_PAUSE
        else:
            self._crashed.pop(key, None)
        if self._full:
            # The node-wide limit turned other domains away: the slot is theirs
            # first (the pass goes on from the first of them), not this domain's.
            self.wake()
        else:
            self._refill(domain)

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
