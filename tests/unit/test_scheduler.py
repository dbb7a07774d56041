"""The scheduler's choices: due jobs only, limits respected, leases in memory.

A real LMDB spool in tmp_path, a fake attempt that waits on an event, and an
injected clock: nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mta.spool import scheduled_queue
from mta.spool.ids import IdGenerator
from mta.spool.records import JobState, Message, job_key, jobs_for, split_job_key
from mta.spool.scheduled_queue import Scheduler
from mta.spool.store import Spool

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def queue(spool: Spool, new_id: IdGenerator, *recipients: str, arrived: float = NOW) -> str:
    queue_id = new_id()
    message = Message(queue_id, "app@example.test", recipients, arrived, size=1)
    with spool.write() as txn:
        spool.add(txn, message, b"x")
    return queue_id


class Attempts:
    """A fake attempt: when released, its job leaves the spool, as if delivered."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.spool: Spool | None = None

    async def __call__(self, key: bytes) -> None:
        await self.release.wait()
        assert self.spool is not None
        with self.spool.write() as txn:
            job = self.spool.job(txn, key)
            if job is not None:
                self.spool.delete_job(txn, job)


def make(
    tmp_path: Path, attempts: Attempts, clock: Clock, **limits: int
) -> tuple[Spool, Scheduler]:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    attempts.spool = spool
    scheduler = Scheduler(
        spool,
        attempts,
        limits.get("total", 10),
        limits.get("per_domain", 10),
        clock=clock,
    )
    return spool, scheduler


def test_due_jobs_start_and_future_ones_wait(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock)
        new_id = IdGenerator(node="test", clock=clock)
        now_id = queue(spool, new_id, "a@one.test")
        later_id = queue(spool, new_id, "b@two.test", arrived=NOW + 30)
        assert scheduler.start_due() == NOW + 30  # when to look again
        assert list(scheduler.in_flight) == [job_key(now_id, "one.test")]
        assert scheduler.start_due() == NOW + 30  # in flight: not started twice
        assert len(scheduler.in_flight) == 1
        clock.now = NOW + 30
        scheduler.start_due()
        assert list(scheduler.in_flight)[1] == job_key(later_id, "two.test")
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())
        assert scheduler.in_flight == {}

    asyncio.run(main())


def test_limits_total_and_per_domain(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock, total=3, per_domain=2)
        new_id = IdGenerator(node="test", clock=clock)
        for _ in range(3):
            queue(spool, new_id, "a@busy.test")
        queue(spool, new_id, "b@other.test")
        queue(spool, new_id, "c@third.test")
        scheduler.start_due()
        domains = sorted(key.split(b"\0")[1].decode() for key in scheduler.in_flight)
        assert domains == ["busy.test", "busy.test", "other.test"]
        # As the first three finish, the freed slots take the rest (busy.test's by
        # a seek in its own index; third.test's by a scan, the node-wide limit
        # having turned it away).
        attempts.release.set()
        while scheduler.in_flight:
            await asyncio.gather(*scheduler.in_flight.values())
            scheduler.start_due()  # what the woken run loop does
        with spool.read() as txn:
            assert spool.message_count(txn) == 0  # all five were tried

    asyncio.run(main())


def test_held_jobs_are_never_started(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock)
        queue_id = queue(spool, IdGenerator(node="test", clock=clock), "a@one.test")
        with spool.write() as txn:
            [job] = spool.jobs_of(txn, queue_id)
            spool.put_job(txn, job.with_state(JobState.HELD), old=job)
        assert scheduler.start_due() is None
        assert scheduler.in_flight == {}

    asyncio.run(main())


def test_a_crashing_attempt_pauses_its_job_instead_of_spinning(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        calls: list[bytes] = []

        async def crash(key: bytes) -> None:
            calls.append(key)
            raise RuntimeError("bug")

        spool = Spool(tmp_path / "spool", max_size=2**20)
        scheduler = Scheduler(spool, crash, 10, 10, clock=clock)
        queue(spool, IdGenerator(node="test", clock=clock), "a@one.test")
        scheduler.start_due()
        await asyncio.gather(*scheduler.in_flight.values(), return_exceptions=True)
        scheduler.start_due()
        assert not scheduler.in_flight and len(calls) == 1  # paused, still in the spool
        clock.now += 61
        scheduler.start_due()
        await asyncio.gather(*scheduler.in_flight.values(), return_exceptions=True)
        assert len(calls) == 2

    asyncio.run(main())


def test_a_queued_message_starts_at_once_and_a_free_slot_refills_its_domain(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock, total=10, per_domain=1)
        new_id = IdGenerator(node="test", clock=clock)
        first = Message(new_id(), "a@example.test", ("u@busy.test",), NOW, size=1)
        second = Message(new_id(), "a@example.test", ("v@busy.test",), NOW, size=1)
        for message in (first, second):
            with spool.write() as txn:
                spool.add(txn, message, b"x")
            # What the daemon does after the SMTP handler's commit:
            scheduler.offer([job.key for job in jobs_for(message)])
        assert list(scheduler.in_flight) == [job_key(first.id, "busy.test")]  # limit 1
        # The first finishes (and, as a real attempt would, leaves the spool):
        with spool.write() as txn:
            [job] = spool.jobs_of(txn, first.id)
            spool.delete_job(txn, job)
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())
        # ...and its slot went to the second without a scan of the whole queue.
        assert list(scheduler.in_flight) == [job_key(second.id, "busy.test")]
        await asyncio.gather(*scheduler.in_flight.values())

    asyncio.run(main())


def test_due_in_finds_a_domains_due_jobs_by_seek(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    new_id = IdGenerator(node="test", clock=Clock())
    early = queue(spool, new_id, "a@one.test", "b@two.test", arrived=NOW)
    queue(spool, new_id, "c@one.test", arrived=NOW + 60)
    with spool.read() as txn:
        assert spool.due_in(txn, "one.test", NOW, 10) == [job_key(early, "one.test")]
        assert len(spool.due_in(txn, "one.test", NOW + 60, 10)) == 2
        assert spool.due_in(txn, "one.test", NOW + 60, 1) == [job_key(early, "one.test")]
        assert spool.due_in(txn, "on", NOW + 60, 10) == []  # a prefix is not a domain


def test_a_worker_starts_only_the_domains_it_owns(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool = Spool(tmp_path / "spool", max_size=2**20)
        attempts.spool = spool
        scheduler = Scheduler(
            spool, attempts, 10, 10, clock=clock, owns=lambda domain: domain == "mine.test"
        )
        new_id = IdGenerator(node="test", clock=clock)
        mine = queue(spool, new_id, "a@mine.test", "b@theirs.test")
        scheduler.start_due()  # the periodic scan
        assert list(scheduler.in_flight) == [job_key(mine, "mine.test")]
        # Keys another worker hands over: only owned ones start, none twice.
        later = queue(spool, new_id, "c@mine.test", "d@theirs.test")
        scheduler.offer([job_key(later, "mine.test"), job_key(later, "theirs.test")])
        scheduler.offer([job_key(later, "mine.test")])
        assert sorted(scheduler.in_flight) == sorted(
            [job_key(mine, "mine.test"), job_key(later, "mine.test")]
        )
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())
        with spool.read() as txn:
            left = sorted(
                job.domain for job in spool.jobs_of(txn, mine) + spool.jobs_of(txn, later)
            )
        assert left == ["theirs.test", "theirs.test"]  # for the worker that owns them

    asyncio.run(main())


def test_a_domain_at_its_limit_is_passed_over_whatever_its_backlog(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock, total=10, per_domain=1)
        new_id = IdGenerator(node="test", clock=clock)
        message = Message(new_id(), "a@example.test", ("u@busy.test",), NOW, size=1)
        backlog = [replace(message, id=new_id()) for _ in range(5000)]
        with spool.write() as txn:
            for queued in backlog:
                spool.add(txn, queued, b"x")
        queue(spool, new_id, "v@quiet.test")
        scheduler.start_due()
        assert sorted(split_job_key(k)[1] for k in scheduler.in_flight) == [
            "busy.test",
            "quiet.test",
        ]
        read = count_index_reads(spool)
        scheduler.start_due()
        # busy.test at its limit, quiet.test's job in flight: a look at each domain.
        assert len(read) <= 2, len(read)
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())

    asyncio.run(main())


def test_a_pass_stops_after_so_many_domains_and_the_next_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduled_queue, "DOMAINS_PER_PASS", 3)

    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock)
        new_id = IdGenerator(node="test", clock=clock)
        for name in "abcde":
            queue(spool, new_id, f"u@{name}.test")
        queue(spool, new_id, "u@f.test", arrived=NOW + 30)
        assert scheduler.start_due() == NOW  # stopped early: go on at once
        assert started(scheduler) == ["a.test", "b.test", "c.test"]
        assert scheduler.start_due() == NOW + 30  # the round is over
        assert started(scheduler) == ["a.test", "b.test", "c.test", "d.test", "e.test"]
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())

    asyncio.run(main())


def test_after_the_node_wide_limit_the_next_domain_gets_its_turn(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock, total=2, per_domain=5)
        new_id = IdGenerator(node="test", clock=clock)
        for name in "aaaabb":  # a backlog for a.test, older than b.test's mail
            queue(spool, new_id, f"u@{name}.test")
        scheduler.start_due()
        assert started(scheduler) == ["a.test", "a.test"]
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())
        scheduler.start_due()
        assert started(scheduler) == ["b.test", "b.test"]  # b's turn, though a's are older

    asyncio.run(main())


def count_index_reads(spool: Spool) -> list[object]:
    """Every entry a pass reads from the spool's indexes of ready jobs, from now on."""
    read: list[object] = []
    for name in ("due", "due_in", "domains_with_ready_jobs"):
        original = getattr(spool, name)

        def counted(*args: object, _original: Any = original) -> Iterator[object]:
            for entry in _original(*args):
                read.append(entry)
                yield entry

        setattr(spool, name, counted)
    return read


def started(scheduler: Scheduler) -> list[str]:
    return sorted(split_job_key(key)[1] for key in scheduler.in_flight)
