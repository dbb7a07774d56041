"""The ready queue's lines, waits and wake-ups, with an injected clock: no sleeps.

The tests step the event loop instead of waiting for time to pass; a wait
bounded by ``retry_in`` or ``recheck`` is tested with a bound of zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from mta import config
from mta.outbound.egress import Egress, Lease
from mta.outbound.ready_queue import Busy, ReadyQueue
from mta.policy.limits import site_for
from mta.spool.store import Spool
from tests.harness.poll import loop_turns

HOUR = 3600.0


LINE = ("pool", "site")


async def step_loop() -> None:
    """Let every task that can run do so (a wake-up takes a few loop turns)."""
    await loop_turns(20)


class Slots:
    """Free connection slots that named jobs take, recording who looked when."""

    def __init__(self, now: list[float]) -> None:
        self.now = now
        self.free = 0
        self.looks: list[tuple[str, float]] = []

    def attempt(self, name: str) -> Callable[[float], Awaitable[str | Busy]]:
        async def look(now: float) -> str | Busy:
            self.looks.append((name, now))
            if self.free == 0:
                return Busy(HOUR)
            self.free -= 1
            return name

        return look

    def queue(self) -> ReadyQueue:
        return ReadyQueue(lambda: self.now[0], recheck=HOUR)


def test_an_answer_that_is_not_busy_is_returned_without_waiting() -> None:
    slots = Slots([100.0])
    slots.free = 1

    async def main() -> None:
        assert await slots.queue().wait(LINE, slots.attempt("a")) == "a"

    asyncio.run(main())
    assert slots.looks == [("a", 100.0)]


def test_a_busy_job_waits_for_a_wake_and_looks_again_at_the_new_time() -> None:
    now = [100.0]
    slots = Slots(now)

    async def main() -> None:
        queue = slots.queue()
        waiting = asyncio.create_task(queue.wait(LINE, slots.attempt("a")))
        await step_loop()
        assert not waiting.done() and slots.looks == [("a", 100.0)]
        now[0] = 105.0
        slots.free = 1
        queue.wake()
        assert await waiting == "a"

    asyncio.run(main())
    assert slots.looks == [("a", 100.0), ("a", 105.0)]


def test_only_the_first_of_a_line_looks_and_the_next_looks_when_it_leaves() -> None:
    slots = Slots([100.0])

    async def main() -> None:
        queue = slots.queue()
        waiting = {}
        for name in ("a", "b", "c"):
            waiting[name] = asyncio.create_task(queue.wait(LINE, slots.attempt(name)))
            await step_loop()
        assert [name for name, _ in slots.looks] == ["a"]  # b and c wait behind a
        assert queue.waiting() == 3
        slots.free = 2
        queue.wake()
        await step_loop()
        # a takes a slot and leaves; b looks at once and takes the other; c looks, waits.
        assert [name for name, _ in slots.looks] == ["a", "a", "b", "c"]
        assert waiting["a"].done() and waiting["b"].done() and not waiting["c"].done()
        slots.free = 1
        queue.wake()
        assert await waiting["c"] == "c"
        assert queue.waiting() == 0

    asyncio.run(main())


def test_a_newcomer_waits_behind_the_line_it_joins() -> None:
    slots = Slots([100.0])

    async def main() -> None:
        queue = slots.queue()
        early = asyncio.create_task(queue.wait(LINE, slots.attempt("early")))
        await step_loop()
        newcomer = asyncio.create_task(queue.wait(LINE, slots.attempt("newcomer")))
        slots.free = 1
        queue.wake()
        await step_loop()
        assert early.result() == "early" and not newcomer.done()
        assert [name for name, _ in slots.looks] == ["early", "early", "newcomer"]
        newcomer.cancel()

    asyncio.run(main())


def test_lines_do_not_wait_for_each_other() -> None:
    slots = Slots([100.0])

    async def main() -> None:
        queue = slots.queue()
        blocked = asyncio.create_task(queue.wait(LINE, slots.attempt("a")))
        await step_loop()
        slots.free = 1
        assert await queue.wait(("pool", "other site"), slots.attempt("b")) == "b"
        blocked.cancel()

    asyncio.run(main())


def test_a_cancelled_first_job_hands_its_turn_on() -> None:
    slots = Slots([100.0])

    async def main() -> None:
        queue = slots.queue()
        first = asyncio.create_task(queue.wait(LINE, slots.attempt("a")))
        await step_loop()
        second = asyncio.create_task(queue.wait(LINE, slots.attempt("b")))
        await step_loop()
        slots.free = 1
        first.cancel()
        assert await second == "b"

    asyncio.run(main())


async def pop(answers: list[str | Busy]) -> str | Busy:
    return answers.pop(0)


def test_a_busy_job_looks_again_after_retry_in_without_a_wake() -> None:
    answers: list[str | Busy] = [Busy(0.0), "sent"]

    async def main() -> None:
        queue = ReadyQueue(lambda: 100.0, recheck=HOUR)
        assert await queue.wait(LINE, lambda now: pop(answers)) == "sent"

    asyncio.run(main())
    assert answers == []


def test_a_busy_job_looks_again_after_recheck_however_long_retry_in_is() -> None:
    answers: list[str | Busy] = [Busy(HOUR), "sent"]

    async def main() -> None:
        queue = ReadyQueue(lambda: 100.0, recheck=0.0)
        assert await queue.wait(LINE, lambda now: pop(answers)) == "sent"

    asyncio.run(main())
    assert answers == []


def test_egress_jobs_waiting_for_a_connection_slot_take_it_in_turn(tmp_path: Path) -> None:
    # No shipped rate: the slot is all a job waits for.
    settings = config.parse(
        {"policy": {"default": {"max_connections": 1}, "shipped_shaping": False}}
    )
    spool = Spool(tmp_path / "spool", max_size=2**20)
    egress = Egress(settings, spool, clock=lambda: 1_800_000_000.0)
    site = site_for("ops.test", ["mx.ops.test"], {})

    async def main() -> None:
        first = await egress.lease("", site, "ops.test")
        assert isinstance(first, Lease)
        second = asyncio.create_task(egress.lease("", site, "ops.test"))
        await step_loop()
        third = asyncio.create_task(egress.lease("", site, "ops.test"))
        await step_loop()
        assert not second.done() and not third.done()
        egress.release(first)
        await step_loop()
        assert second.done() and not third.done()
        leased = second.result()
        assert isinstance(leased, Lease) and leased.path is first.path
        egress.release(leased)
        last = await third
        assert isinstance(last, Lease)
        egress.release(last)
        assert first.path.in_use == 0

    try:
        asyncio.run(main())
    finally:
        spool.close()


class RoundTrips:
    """Looks that wait for an answer the test gives, recording who started when."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.answers: dict[str, asyncio.Future[str]] = {}

    def attempt(self, name: str) -> Callable[[float], Awaitable[str]]:
        async def look(now: float) -> str:
            self.started.append(name)
            self.answers[name] = asyncio.get_running_loop().create_future()
            return await self.answers[name]

        return look


def test_several_jobs_of_a_line_may_look_at_once_in_order() -> None:
    """With a shared store a look is a round trip: lookers > 1 overlaps them."""
    queue = ReadyQueue(lambda: 100.0, recheck=HOUR, lookers=3)
    trips = RoundTrips()
    started, answers, attempt = trips.started, trips.answers, trips.attempt

    async def main() -> None:
        jobs = {n: asyncio.ensure_future(queue.wait(LINE, attempt(n))) for n in "abcde"}
        await step_loop()
        assert started == ["a", "b", "c"]  # three round trips at once, first come first
        jobs["b"].cancel()  # one that was looking goes: the next may look
        await step_loop()
        assert started == ["a", "b", "c", "d"]
        answers["a"].set_result("a")
        await step_loop()
        assert started == ["a", "b", "c", "d", "e"]
        for name in "cde":
            answers[name].set_result(name)
        assert [await jobs[n] for n in "acde"] == ["a", "c", "d", "e"]
        assert queue.waiting() == 0

    asyncio.run(main())


def test_a_job_that_leaves_while_waiting_for_its_turn_passes_no_turn_on() -> None:
    queue = ReadyQueue(lambda: 100.0, recheck=HOUR, lookers=2)
    trips = RoundTrips()
    started, answers, attempt = trips.started, trips.answers, trips.attempt

    async def main() -> None:
        jobs = {n: asyncio.ensure_future(queue.wait(LINE, attempt(n))) for n in "abcd"}
        await step_loop()
        jobs["c"].cancel()  # waiting, not looking: still two looks at most
        await step_loop()
        assert started == ["a", "b"]
        answers["a"].set_result("a")
        await step_loop()
        assert started == ["a", "b", "d"]
        answers["b"].set_result("b")
        answers["d"].set_result("d")
        assert [await jobs[n] for n in "abd"] == ["a", "b", "d"]

    asyncio.run(main())
