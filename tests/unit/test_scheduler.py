"""The scheduler's choices: due jobs only, limits respected, leases in memory.

A real LMDB spool in tmp_path, a fake attempt that waits on an event, and an
injected clock: nothing sleeps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from mta.outbound.scheduler import Scheduler
from mta.queue.ids import IdGenerator
from mta.queue.records import JobState, Message, job_key
from mta.queue.store import Spool

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
    """A fake attempt: each finishes when released, changing nothing."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, key: bytes) -> None:
        await self.release.wait()


def make(
    tmp_path: Path, attempts: Attempts, clock: Clock, **limits: int
) -> tuple[Spool, Scheduler]:
    spool = Spool(tmp_path / "spool", max_size=2**20)
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
        new_id = IdGenerator(clock=clock)
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
        new_id = IdGenerator(clock=clock)
        for _ in range(3):
            queue(spool, new_id, "a@busy.test")
        queue(spool, new_id, "b@other.test")
        queue(spool, new_id, "c@third.test")
        scheduler.start_due()
        domains = sorted(key.split(b"\0")[1].decode() for key in scheduler.in_flight)
        assert domains == ["busy.test", "busy.test", "other.test"]
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())
        attempts.release.clear()
        scheduler.start_due()  # the rest (jobs still due: the fake attempt records nothing)
        assert len(scheduler.in_flight) == 3
        attempts.release.set()
        await asyncio.gather(*scheduler.in_flight.values())

    asyncio.run(main())


def test_held_jobs_are_never_started(tmp_path: Path) -> None:
    async def main() -> None:
        clock, attempts = Clock(), Attempts()
        spool, scheduler = make(tmp_path, attempts, clock)
        queue_id = queue(spool, IdGenerator(clock=clock), "a@one.test")
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
        queue(spool, IdGenerator(clock=clock), "a@one.test")
        scheduler.start_due()
        await asyncio.gather(*scheduler.in_flight.values(), return_exceptions=True)
        scheduler.start_due()
        assert not scheduler.in_flight and len(calls) == 1  # paused, still in the spool
        clock.now += 61
        scheduler.start_due()
        await asyncio.gather(*scheduler.in_flight.values(), return_exceptions=True)
        assert len(calls) == 2

    asyncio.run(main())
