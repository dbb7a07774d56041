"""Priorities and delivery slots: transactional jobs first, waiting jobs hold no slot.

The ready queue's order within a line, the scheduler's slot accounting while
jobs wait for a path, its choice of a domain's due jobs, and the spool's
index of transactional jobs. Real LMDB spools in tmp_path, a fixed clock, a
ready queue whose paths the test frees; nothing sleeps: the tests step the
event loop and count what happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from mta import config
from mta.outbound.egress import Egress, Lease
from mta.outbound.ready_queue import Busy, ReadyQueue
from mta.policy.limits import site_for
from mta.spool import scheduled_queue
from mta.spool.ids import IdGenerator
from mta.spool.records import JobState, Message, domain_due_key, job_key, split_job_key
from mta.spool.scheduled_queue import Scheduler
from mta.spool.store import Spool
from tests.harness.poll import loop_turns

NOW = 1_800_000_000.0
HOUR = 3600.0
LINE = ("pool", "site", "")
TX, BULK = "transactional", "bulk"


async def settle() -> None:
    await loop_turns(50)


# --- the ready queue's order ---


class Paths:
    """A site's free paths: a look takes one if there is one. Records each look and
    how many looks of the line were under way at once."""

    def __init__(self) -> None:
        self.free = 0
        self.looks: list[str] = []
        self.leased: list[str] = []
        self.looking = 0
        self.most_looking = 0
        self.answers: dict[str, asyncio.Future[None]] = {}  # looks held until answered

    def attempt(self, name: str, held: bool = False) -> Callable[[float], Awaitable[str | Busy]]:
        async def look(now: float) -> str | Busy:
            self.looks.append(name)
            self.looking += 1
            self.most_looking = max(self.most_looking, self.looking)
            try:
                if held:  # a round trip the test answers
                    answer = self.answers[name] = asyncio.get_running_loop().create_future()
                    await answer
                if not self.free:
                    return Busy(HOUR)
                self.free -= 1
                self.leased.append(name)
                return name
            finally:
                self.looking -= 1

        return look


def join(queue: ReadyQueue, paths: Paths, name: str, held: bool = False) -> asyncio.Task[str]:
    priority = TX if name.startswith("t") else BULK
    return asyncio.ensure_future(queue.wait(LINE, paths.attempt(name, held), priority))


def test_transactional_jobs_take_paths_before_bulk_ones_that_came_first() -> None:
    paths = Paths()

    async def main() -> None:
        queue = ReadyQueue(lambda: NOW, recheck=HOUR)
        jobs = []
        for name in ("b1", "b2", "t1", "b3", "t2"):
            jobs.append(join(queue, paths, name))
            await settle()
        # b1 looked first and waits; t1 then came first in the line and looked at
        # once (b1 was between looks); the others wait for their turn.
        assert paths.looks == ["b1", "t1"]
        for _ in jobs:
            paths.free = 1
            queue.wake()
            await settle()
        assert paths.leased == ["t1", "t2", "b1", "b2", "b3"]  # priority, then arrival
        assert queue.waiting() == 0

    asyncio.run(main())


def test_a_bulk_job_finishes_its_look_then_waits_behind_a_transactional_one() -> None:
    paths = Paths()

    async def main() -> None:
        queue = ReadyQueue(lambda: NOW, recheck=HOUR)
        bulk = join(queue, paths, "b1", held=True)
        await settle()
        transactional = join(queue, paths, "t1")
        await settle()
        assert paths.looks == ["b1"]  # one look at a time: t1 waits for b1's to end
        paths.answers.pop("b1").set_result(None)  # busy
        await settle()
        assert paths.looks == ["b1", "t1"]  # then t1 looks, and b1 waits behind it
        paths.free = 1
        queue.wake()
        await settle()
        assert transactional.done() and not bulk.done()
        assert paths.looks == ["b1", "t1", "t1"]
        bulk.cancel()

    asyncio.run(main())
    assert paths.most_looking == 1


def test_with_several_lookers_a_transactional_job_still_waits_for_a_look_to_end() -> None:
    """lookers=3 (Redis): a look is a round trip; three at most, whatever the order."""
    paths = Paths()

    async def main() -> None:
        queue = ReadyQueue(lambda: NOW, recheck=HOUR, lookers=3)
        bulk = [join(queue, paths, name, held=True) for name in ("b1", "b2", "b3", "b4")]
        await settle()
        transactional = join(queue, paths, "t1")
        await settle()
        assert paths.looks == ["b1", "b2", "b3"]
        paths.free = 1
        paths.answers.pop("b2").set_result(None)  # b2 leases the free path and leaves
        await settle()
        assert paths.leased == ["b2"]
        assert paths.looks == ["b1", "b2", "b3", "t1"]  # t1 before b4
        assert transactional.done() is False  # no path left: it waits as a looker
        for task in [*bulk, transactional]:
            task.cancel()

    asyncio.run(main())
    assert paths.most_looking == 3


def test_a_wake_during_a_busy_look_does_not_make_it_look_again_at_once() -> None:
    """Egress wakes the line when a busy look gives back the idle connection it took:
    that wake must not start another look, or a rate-limited line spins."""
    looks = []

    async def main() -> None:
        queue = ReadyQueue(lambda: NOW, recheck=HOUR)

        async def look(now: float) -> str | Busy:
            looks.append(now)
            queue.wake()  # its own give-back
            return Busy(HOUR) if len(looks) < 3 else "leased"  # a spin ends here

        waiting = asyncio.ensure_future(queue.wait(LINE, look, TX))
        await settle()
        assert len(looks) == 1
        waiting.cancel()

    asyncio.run(main())


# --- the scheduler's delivery slots ---


@dataclass
class Site:
    """One throttled site the scheduler's attempts deliver to through a real ready queue:
    an attempt routes, waits for a path, then delivers until the test ends it. A
    job in ``routing`` routes (holding its slot) until the test lets it end."""

    spool: Spool
    queue: ReadyQueue = field(default_factory=lambda: ReadyQueue(lambda: NOW, recheck=HOUR))
    paths: Paths = field(default_factory=Paths)
    scheduler: Scheduler | None = None
    routing: dict[bytes, asyncio.Event] = field(default_factory=dict)  # set: the job ends
    held_at_look: list[int] = field(default_factory=list)  # slots held during each look
    delivering: dict[bytes, asyncio.Event] = field(default_factory=dict)

    async def __call__(self, key: bytes) -> None:
        with self.spool.read() as txn:
            job = self.spool.job(txn, key)
        assert job is not None
        if key in self.routing:
            await self.routing[key].wait()
        else:
            look = self.paths.attempt(key.decode())
            await self.queue.wait(LINE, lambda now: self._counted(look, now), job.priority)
            done = self.delivering[key] = asyncio.Event()
            await done.wait()
        with self.spool.write() as txn:
            self.spool.delete_job(txn, job)

    async def _counted(self, look: Callable[[float], Awaitable[str | Busy]], now: float) -> object:
        assert self.scheduler is not None
        self.held_at_look.append(self.scheduler.held)
        return await look(now)

    def lease_one(self) -> None:
        self.paths.free += 1
        self.queue.wake()

    def route(self, *keys: bytes) -> None:
        self.routing.update((key, asyncio.Event()) for key in keys)

    def finish(self) -> None:
        for done in self.delivering.values():
            done.set()


def make(tmp_path: Path, total: int, per_domain: int) -> tuple[Spool, Scheduler, Site]:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    site = Site(spool)
    site.scheduler = Scheduler(spool, site, total, per_domain, clock=lambda: NOW)
    return spool, site.scheduler, site


def queue_mail(spool: Spool, new_id: IdGenerator, domain: str, priority: str) -> bytes:
    message = Message(new_id(), "app@example.test", (f"u@{domain}",), NOW, 1, priority=priority)
    with spool.write() as txn:
        spool.add(txn, message, b"x")
    return job_key(message.id, domain)


def priorities(scheduler: Scheduler, spool: Spool) -> list[str]:
    with spool.read() as txn:
        return sorted(
            job.priority for key in scheduler.in_flight if (job := spool.job(txn, key)) is not None
        )


def test_jobs_waiting_for_a_path_hold_no_slot_and_a_transactional_one_starts(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool, scheduler, site = make(tmp_path, total=10, per_domain=2)
        new_id = IdGenerator(node="test", clock=lambda: NOW)
        for _ in range(20):
            queue_mail(spool, new_id, "slow.test", BULK)
        scheduler.start_due()
        await settle()
        # Each job that waits gives its slot back, and another starts, up to the
        # bound on waiting jobs: twice the domain's slots, none of them held.
        assert len(scheduler.in_flight) == 4 and scheduler.held == 0
        assert site.queue.waiting() == 4
        urgent = queue_mail(spool, new_id, "slow.test", TX)
        scheduler.offer([urgent])
        assert urgent in scheduler.in_flight  # the waiting bulk jobs hold no slot
        await settle()
        site.lease_one()
        await settle()
        assert site.paths.leased == [urgent.decode()]  # the path's next lease is its
        assert scheduler.held == 1  # the delivering job holds a slot again
        site.finish()
        while scheduler.in_flight:
            site.lease_one()
            await settle()
            site.finish()
            await settle()
        assert max(site.held_at_look) <= 2  # a look holds a slot, within the limit

    asyncio.run(main())


def test_a_look_waits_for_a_free_slot_and_gets_it_before_new_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        spool, scheduler, site = make(tmp_path, total=10, per_domain=1)
        new_id = IdGenerator(node="test", clock=lambda: NOW)
        waiting = queue_mail(spool, new_id, "slow.test", BULK)
        scheduler.start_due()
        await settle()  # it looked (no path) and waits, without its slot
        routing = queue_mail(spool, new_id, "slow.test", BULK)
        site.route(routing)
        later = queue_mail(spool, new_id, "slow.test", BULK)
        scheduler.start_due()
        await settle()
        assert scheduler.held == 1 and routing in scheduler.in_flight
        assert later not in scheduler.in_flight  # the domain's one slot is taken
        site.lease_one()  # a path frees: the waiting job would look, but has no slot
        await settle()
        assert site.paths.looks == [waiting.decode()]
        site.routing[routing].set()  # the routing job ends: its slot frees
        await settle()
        # The slot went to the job waiting to look, not to the next job.
        assert site.paths.leased == [waiting.decode()]
        assert later not in scheduler.in_flight
        assert site.held_at_look == [1, 1]  # both looks held the domain's one slot
        await scheduler.stop(0)

    asyncio.run(main())


def test_waiting_jobs_are_bounded_per_domain_and_per_worker_and_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduled_queue, "WAITING_PER_SLOT", 2)

    async def main() -> None:
        spool, scheduler, site = make(tmp_path, total=2, per_domain=2)
        new_id = IdGenerator(node="test", clock=lambda: NOW)
        for domain in ("a.test", "b.test", "c.test"):
            for _ in range(10):
                queue_mail(spool, new_id, domain, BULK)
        for _ in range(6):  # passes, as the run loop makes when woken
            scheduler.start_due()
            await settle()
        # (1 + 2) x 2 bulk jobs in flight on the worker, and 4 at most per domain.
        assert len(scheduler.in_flight) == 6 and scheduler.held == 0
        per_domain = [split_job_key(key)[1] for key in scheduler.in_flight]
        assert max(per_domain.count(d) for d in set(per_domain)) <= 4
        # Transactional mail has bounds of its own: it starts.
        urgent = queue_mail(spool, new_id, "a.test", TX)
        scheduler.offer([urgent])
        assert urgent in scheduler.in_flight
        await scheduler.stop(0)  # the jobs left stay in the spool

    asyncio.run(main())


def test_a_pass_starts_a_domains_due_transactional_jobs_before_older_bulk_ones(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool, scheduler, site = make(tmp_path, total=10, per_domain=2)
        new_id = IdGenerator(node="test", clock=lambda: NOW)
        bulk = [queue_mail(spool, new_id, "busy.test", BULK) for _ in range(5)]
        urgent = [queue_mail(spool, new_id, "busy.test", TX) for _ in range(2)]
        site.route(*bulk, *urgent)  # each holds its slot: nothing else starts
        scheduler.start_due()
        assert sorted(scheduler.in_flight) == sorted(urgent)
        site.routing[urgent[0]].set()
        await settle()
        assert priorities(scheduler, spool) == [BULK, TX]  # the freed slot: the oldest bulk
        assert bulk[0] in scheduler.in_flight
        await scheduler.stop(0)  # the jobs left stay in the spool

    asyncio.run(main())


def test_bulk_jobs_wait_while_the_domains_due_transactional_ones_wait_for_room(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        spool, scheduler, site = make(tmp_path, total=10, per_domain=1)
        new_id = IdGenerator(node="test", clock=lambda: NOW)
        queue_mail(spool, new_id, "slow.test", BULK)
        for _ in range(3):
            queue_mail(spool, new_id, "slow.test", TX)
        scheduler.start_due()
        await settle()
        scheduler.start_due()
        await settle()
        # Two transactional jobs wait for a path (the domain's bound), the third for
        # room: the bulk job, though older and within its own bound, waits too.
        assert priorities(scheduler, spool) == [TX, TX]
        await scheduler.stop(0)  # the jobs left stay in the spool

    asyncio.run(main())


# --- through Egress: a real path with one connection ---


def test_egress_gives_a_freed_connection_to_the_transactional_job(tmp_path: Path) -> None:
    settings = config.parse(
        {"policy": {"default": {"max_connections": 1}, "shipped_shaping": False}}
    )
    spool = Spool(tmp_path / "spool", max_size=2**20)
    egress = Egress(settings, spool, clock=lambda: NOW)
    site = site_for("ops.test", ["mx.ops.test"], {})

    async def main() -> None:
        first = await egress.lease("", site, "ops.test")
        assert isinstance(first, Lease)
        waiting = []
        for priority in (BULK, BULK, TX):
            waiting.append(
                asyncio.ensure_future(egress.lease("", site, "ops.test", priority=priority))
            )
            await settle()
        egress.release(first)
        await settle()
        assert [task.done() for task in waiting] == [False, False, True]
        for task in waiting[:2]:
            task.cancel()
        leased = waiting[2].result()
        assert isinstance(leased, Lease)
        egress.release(leased)

    try:
        asyncio.run(main())
    finally:
        spool.close()


# --- the spool's index of transactional jobs ---


def test_the_spool_finds_a_domains_due_jobs_of_one_priority_by_seek(spool: Spool) -> None:
    new_id = IdGenerator(node="test", clock=lambda: NOW)
    bulk = queue_mail(spool, new_id, "one.test", BULK)
    urgent = queue_mail(spool, new_id, "one.test", TX)
    with spool.read() as txn:
        assert spool.due_in(txn, "one.test", NOW, 10) == [bulk, urgent]
        assert spool.due_in(txn, "one.test", NOW, 10, TX) == [urgent]
        assert spool.due_in(txn, "one.test", NOW, 10, BULK) == [bulk]
        job = spool.job(txn, urgent)
    assert job is not None
    with spool.write() as txn:
        spool.put_job(txn, job.with_state(JobState.HELD), old=job)
    with spool.read() as txn:
        assert spool.due_in(txn, "one.test", NOW, 10, TX) == []  # held: not due
    with spool.write() as txn:
        spool.put_job(txn, replace(job, next_attempt=NOW + 60), old=job.with_state(JobState.HELD))
    with spool.read() as txn:
        assert spool.due_in(txn, "one.test", NOW, 10, TX) == []
        assert spool.due_in(txn, "one.test", NOW + 60, 10, TX) == [urgent]


def test_an_entry_an_older_version_left_in_the_index_is_passed_over(spool: Spool) -> None:
    new_id = IdGenerator(node="test", clock=lambda: NOW)
    urgent = queue_mail(spool, new_id, "one.test", TX)
    with spool.write() as txn:
        job = spool.job(txn, urgent)
        assert job is not None
        txn.delete(urgent, db=spool._jobs)  # as an older version deletes a job: the
        txn.delete(domain_due_key(job), db=spool._ready)  # index of all only
    with spool.read() as txn:
        assert spool.due_in(txn, "one.test", NOW, 10, TX) == []


def test_a_spool_from_before_the_index_gets_its_transactional_jobs_indexed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    new_id = IdGenerator(node="test", clock=lambda: NOW)
    urgent = queue_mail(spool, new_id, "one.test", TX)
    queue_mail(spool, new_id, "one.test", BULK)
    with spool.write() as txn:
        txn.drop(spool._ready_first, delete=True)  # as an older version left it
    spool.close()
    reopened = Spool(tmp_path / "spool", max_size=2**20)
    try:
        with reopened.read() as txn:
            assert reopened.due_in(txn, "one.test", NOW, 10, TX) == [urgent]
    finally:
        reopened.close()
