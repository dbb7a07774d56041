"""The LMDB spool and group commit, on a real LMDB file in a temporary directory.

There is no public reader for the ``due`` index yet (the scheduler that will
read it does not exist), so ``due_entries`` reads ``spool._due`` directly.
"""

from __future__ import annotations

import asyncio
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.spool.commit import INLINE_BATCH, GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.records import Job, JobState, Message, due_key
from mta.spool.store import Spool, SpoolFull, SpoolMissing

ARRIVED = 1_700_000_000.0


def ids() -> IdGenerator:
    return IdGenerator(node="test", clock=lambda: ARRIVED, pid=1)


def message(queue_id: str, recipients: tuple[str, ...], body: bytes) -> Message:
    return Message(
        id=queue_id,
        sender="app@sender.example",
        recipients=recipients,
        arrived=ARRIVED,
        size=len(body),
        client="app1 (app1.internal[10.0.0.5])",
        message_id=f"<{queue_id}@sender.example>",
    )


def due_entries(spool: Spool) -> list[bytes]:
    """The due index's keys in order (private: no public reader exists)."""
    with spool.read() as txn:
        return [bytes(key) for key, _ in txn.cursor(db=spool._due)]


@pytest.fixture
def new_id() -> IdGenerator:
    return ids()


# --- adding and reading ---


def test_added_message_is_readable_with_its_body_and_one_job_per_domain(
    spool: Spool, new_id: IdGenerator
) -> None:
    body = b"From: app@sender.example\r\n\r\nhello\r\n"
    added = message(new_id(), ("a@gmail.com", "b@example.org", "c@GMAIL.com"), body)
    with spool.write() as txn:
        spool.add(txn, added, body)
    with spool.read() as txn:
        assert spool.message(txn, added.id) == added
        assert spool.body(txn, added.id) == body
        jobs = spool.jobs_of(txn, added.id)
        assert spool.stored_bytes(txn) == len(body)
        assert spool.message_count(txn) == 1
    assert [(job.domain, job.recipients, job.state) for job in jobs] == [
        ("example.org", ("b@example.org",), JobState.READY),
        ("gmail.com", ("a@gmail.com", "c@GMAIL.com"), JobState.READY),
    ]  # stored by key: queue ID, then domain
    assert due_entries(spool) == sorted(due_key(job) for job in jobs)


def test_unknown_queue_id_reads_as_none(spool: Spool) -> None:
    with spool.read() as txn:
        assert spool.message(txn, "0000000000000000") is None
        assert spool.body(txn, "0000000000000000") is None
        assert spool.jobs_of(txn, "0000000000000000") == []


def test_counters_add_up_over_several_messages(spool: Spool, new_id: IdGenerator) -> None:
    bodies = [b"x" * size for size in (10, 200, 3000)]
    with spool.write() as txn:
        for body in bodies:
            spool.add(txn, message(new_id(), ("a@example.com",), body), body)
    with spool.read() as txn:
        assert spool.stored_bytes(txn) == 3210
        assert spool.message_count(txn) == 3


def test_jobs_of_returns_only_that_messages_jobs(spool: Spool, new_id: IdGenerator) -> None:
    first, second, third = (
        message(new_id(), ("a@one.example", "b@two.example"), b"1"),
        message(new_id(), ("c@one.example",), b"2"),
        message(new_id(), ("d@three.example",), b"3"),
    )
    with spool.write() as txn:
        for added, body in ((first, b"1"), (second, b"2"), (third, b"3")):
            spool.add(txn, added, body)
    with spool.read() as txn:
        assert [job.recipients for job in spool.jobs_of(txn, second.id)] == [("c@one.example",)]
        assert len(spool.jobs_of(txn, first.id)) == 2


def test_all_jobs_and_messages_come_in_arrival_order(spool: Spool, new_id: IdGenerator) -> None:
    made = [message(new_id(), ("a@example.com",), b"x") for _ in range(5)]
    with spool.write() as txn:
        for added in reversed(made):  # stored in the opposite order
            spool.add(txn, added, b"x")
    with spool.read() as txn:
        assert [job.message_id for job in spool.all_jobs(txn)] == [m.id for m in made]
        assert [m.id for m in spool.all_messages(txn)] == [m.id for m in made]


def test_duplicate_queue_id_is_refused_and_changes_nothing(
    spool: Spool, new_id: IdGenerator
) -> None:
    queue_id = new_id()
    with spool.write() as txn:
        spool.add(txn, message(queue_id, ("a@example.com",), b"first"), b"first")
    with spool.write() as txn, pytest.raises(ValueError, match=queue_id):
        spool.add(txn, message(queue_id, ("b@other.example",), b"second!"), b"second!")
    with spool.read() as txn:
        assert spool.body(txn, queue_id) == b"first"
        assert spool.message(txn, queue_id).recipients == ("a@example.com",)  # type: ignore[union-attr]
        assert [job.domain for job in spool.jobs_of(txn, queue_id)] == ["example.com"]
        assert spool.stored_bytes(txn) == 5


def test_leaving_the_write_block_with_an_error_commits_nothing(
    spool: Spool, new_id: IdGenerator
) -> None:
    added = message(new_id(), ("a@example.com",), b"body")
    with pytest.raises(RuntimeError), spool.write() as txn:
        spool.add(txn, added, b"body")
        raise RuntimeError("crash before commit")
    with spool.read() as txn:
        assert spool.message(txn, added.id) is None
        assert spool.message_count(txn) == 0
    assert due_entries(spool) == []


# --- room ---


def test_message_over_max_size_raises_spool_full_and_writes_nothing(
    tmp_path: Path, new_id: IdGenerator
) -> None:
    small = Spool(tmp_path / "spool", max_size=100)
    try:
        fits, too_big = b"a" * 60, b"b" * 41
        first = message(new_id(), ("a@example.com",), fits)
        second = message(new_id(), ("b@example.com",), too_big)
        with small.write() as txn:
            small.add(txn, first, fits)
            with pytest.raises(SpoolFull, match="spool size limit reached"):
                small.add(txn, second, too_big)
        with small.read() as txn:
            assert small.message(txn, second.id) is None
            assert small.body(txn, second.id) is None
            assert small.jobs_of(txn, second.id) == []
            assert small.stored_bytes(txn) == 60
            assert small.message_count(txn) == 1
        assert len(due_entries(small)) == 1
        # Exactly at the limit is still room.
        exact = b"c" * 40
        with small.write() as txn:
            small.add(txn, message(new_id(), ("c@example.com",), exact), exact)
            assert small.stored_bytes(txn) == 100
    finally:
        small.close()


def test_too_little_free_disk_raises_spool_full(tmp_path: Path, new_id: IdGenerator) -> None:
    starved = Spool(tmp_path / "spool", max_size=1_000_000, min_free_disk=2**62)
    try:
        with starved.write() as txn, pytest.raises(SpoolFull, match="disk nearly full"):
            starved.add(txn, message(new_id(), ("a@example.com",), b"x"), b"x")
        with starved.read() as txn:
            assert starved.message_count(txn) == 0
    finally:
        starved.close()


def test_room_problem_says_none_when_there_is_room(spool: Spool) -> None:
    with spool.read() as txn:
        assert spool.room_problem(txn, 1000) is None
        assert spool.room_problem(txn, spool.max_size + 1) == "spool size limit reached"


# --- changing and deleting jobs ---


def test_put_job_with_old_moves_the_due_entry(spool: Spool, new_id: IdGenerator) -> None:
    added = message(new_id(), ("a@example.com", "b@example.org"), b"x")
    with spool.write() as txn:
        spool.add(txn, added, b"x")
    with spool.read() as txn:
        job, other = spool.jobs_of(txn, added.id)
    retried = replace(job, next_attempt=ARRIVED + 300, attempts=1, last_reply="451 4.3.0 later")
    with spool.write() as txn:
        spool.put_job(txn, retried, old=job)
    assert due_entries(spool) == [due_key(other), due_key(retried)]
    with spool.read() as txn:
        assert spool.jobs_of(txn, added.id) == [retried, other]


def test_held_jobs_are_not_due_and_come_back_when_released(
    spool: Spool, new_id: IdGenerator
) -> None:
    added = message(new_id(), ("a@example.com",), b"x")
    with spool.write() as txn:
        spool.add(txn, added, b"x")
    with spool.read() as txn:
        (job,) = spool.jobs_of(txn, added.id)
    held = job.with_state(JobState.HELD)
    with spool.write() as txn:
        spool.put_job(txn, held, old=job)
    assert due_entries(spool) == []
    with spool.read() as txn:
        assert spool.jobs_of(txn, added.id)[0].state is JobState.HELD
    released = held.with_state(JobState.READY, next_attempt=ARRIVED + 60)
    with spool.write() as txn:
        spool.put_job(txn, released, old=held)
    assert due_entries(spool) == [due_key(released)]


def test_new_held_job_is_stored_but_not_due(spool: Spool) -> None:
    job = Job("0000000000000001", "example.com", ("a@example.com",), ARRIVED, JobState.HELD)
    with spool.write() as txn:
        spool.put_job(txn, job)
    with spool.read() as txn:
        assert spool.jobs_of(txn, job.message_id) == [job]
    assert due_entries(spool) == []


def test_deleting_one_of_two_jobs_keeps_the_message(spool: Spool, new_id: IdGenerator) -> None:
    added = message(new_id(), ("a@example.com", "b@example.org"), b"body")
    with spool.write() as txn:
        spool.add(txn, added, b"body")
    with spool.read() as txn:
        first, second = spool.jobs_of(txn, added.id)
    with spool.write() as txn:
        assert spool.delete_job(txn, first) is False
    with spool.read() as txn:
        assert spool.jobs_of(txn, added.id) == [second]
        assert spool.body(txn, added.id) == b"body"
        assert spool.stored_bytes(txn) == 4
    assert due_entries(spool) == [due_key(second)]


def test_deleting_the_last_job_removes_message_body_and_bytes(
    spool: Spool, new_id: IdGenerator
) -> None:
    keep = message(new_id(), ("k@example.com",), b"kept")
    gone = message(new_id(), ("a@example.com",), b"to be delivered")
    with spool.write() as txn:
        spool.add(txn, keep, b"kept")
        spool.add(txn, gone, b"to be delivered")
    with spool.read() as txn:
        (job,) = spool.jobs_of(txn, gone.id)
    with spool.write() as txn:
        assert spool.delete_job(txn, job) is True
    with spool.read() as txn:
        assert spool.message(txn, gone.id) is None
        assert spool.body(txn, gone.id) is None
        assert spool.jobs_of(txn, gone.id) == []
        assert spool.stored_bytes(txn) == len(b"kept")
        assert spool.message_count(txn) == 1
        assert spool.body(txn, keep.id) == b"kept"
    assert len(due_entries(spool)) == 1


def test_deleting_a_held_last_job_removes_the_message(spool: Spool, new_id: IdGenerator) -> None:
    added = message(new_id(), ("a@example.com",), b"x")
    with spool.write() as txn:
        spool.add(txn, added, b"x")
        (job,) = spool.jobs_of(txn, added.id)
        held = job.with_state(JobState.HELD)
        spool.put_job(txn, held, old=job)
    with spool.write() as txn:
        assert spool.delete_job(txn, held) is True
    with spool.read() as txn:
        assert spool.message_count(txn) == 0
        assert spool.stored_bytes(txn) == 0
    assert due_entries(spool) == []


# --- stats ---


def test_stats_count_by_state_and_domain(spool: Spool, new_id: IdGenerator) -> None:
    one = message(new_id(), ("a@gmail.com", "b@gmail.com", "c@example.org"), b"12345")
    two = message(new_id(), ("d@gmail.com",), b"678")
    with spool.write() as txn:
        spool.add(txn, one, b"12345")
        spool.add(txn, two, b"678")
        gmail_job = spool.jobs_of(txn, two.id)[0]
        spool.put_job(txn, gmail_job.with_state(JobState.HELD), old=gmail_job)
    with spool.read() as txn:
        stats = spool.stats(txn)
    assert (stats.messages, stats.bytes, stats.jobs) == (2, 8, 3)
    assert stats.by_state == {"ready": 2, "held": 1}
    assert set(stats.by_domain) == {"gmail.com", "example.org"}
    gmail = stats.by_domain["gmail.com"]
    assert (gmail.jobs, gmail.recipients) == (2, 3)
    assert gmail.by_state == {"ready": 1, "held": 1}
    org = stats.by_domain["example.org"]
    assert (org.jobs, org.recipients, org.by_state) == (1, 1, {"ready": 1})


def test_stats_of_an_empty_spool(spool: Spool) -> None:
    with spool.read() as txn:
        stats = spool.stats(txn)
    assert (stats.messages, stats.bytes, stats.jobs, stats.by_state, stats.by_domain) == (
        0,
        0,
        0,
        {},
        {},
    )


# --- opening ---


def test_reopening_keeps_everything(tmp_path: Path, new_id: IdGenerator) -> None:
    path = tmp_path / "spool"
    first = Spool(path, max_size=1_000_000)
    added = message(new_id(), ("a@example.com", "b@example.org"), b"durable")
    with first.write() as txn:
        first.add(txn, added, b"durable")
        spool_job = first.jobs_of(txn, added.id)[0]
        first.put_job(txn, spool_job.with_state(JobState.HELD), old=spool_job)
    before = due_entries(first)
    first.close()

    again = Spool(path, max_size=1_000_000, create=False)
    try:
        with again.read() as txn:
            assert again.message(txn, added.id) == added
            assert again.body(txn, added.id) == b"durable"
            assert [job.state for job in again.jobs_of(txn, added.id)] == [
                JobState.HELD,
                JobState.READY,
            ]
            assert again.stored_bytes(txn) == 7
            assert again.message_count(txn) == 1
        assert due_entries(again) == before
        assert len(before) == 1
    finally:
        again.close()


def test_opening_a_spool_without_counts_builds_them(tmp_path: Path, new_id: IdGenerator) -> None:
    """A spool written before the counts existed gets them at its next opening."""
    path = tmp_path / "spool"
    first = Spool(path, max_size=1_000_000)
    with first.write() as txn:
        first.add(txn, message(new_id(), ("a@example.com", "b@example.org"), b"x"), b"x")
        first.add(txn, message(new_id(), ("c@example.com",), b"y"), b"y")
        txn.drop(first._counts, delete=False)  # as an older version left it
    with first.read() as txn:
        assert first.stats(txn).by_domain == {}
    first.close()

    again = Spool(path, max_size=1_000_000, create=False)
    try:
        with again.read() as txn:
            by_domain = again.stats(txn).by_domain
        assert {domain: stats.jobs for domain, stats in by_domain.items()} == {
            "example.com": 2,
            "example.org": 1,
        }
    finally:
        again.close()


def test_create_makes_a_private_directory(tmp_path: Path) -> None:
    path = tmp_path / "var" / "spool"
    Spool(path, max_size=1000).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert (path / "data.mdb").exists()


def test_opening_without_create_where_there_is_no_spool(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpoolMissing, match=str(empty)):
        Spool(empty, max_size=1000, create=False)
    missing = tmp_path / "missing"
    with pytest.raises(SpoolMissing):
        Spool(missing, max_size=1000, create=False)
    assert not missing.exists()  # looking must not create it


# --- group commit ---


class GatedSpool(Spool):
    """A spool whose writer can be held inside one message's commit, and counts commits.

    Holding the writer lets a test queue up requests so that they are all
    taken as one batch, without sleeping.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commits = 0
        self.gate_id: str | None = None
        self.entered = threading.Event()
        self.release = threading.Event()

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        self.commits += 1
        with super().write() as txn:
            yield txn

    def add(self, txn: lmdb.Transaction, message: Message, body: bytes) -> None:
        if message.id == self.gate_id:
            self.entered.set()
            assert self.release.wait(30), "test never released the writer"
        super().add(txn, message, body)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedSpool]:
    opened = GatedSpool(tmp_path / "spool", max_size=1_000_000)
    yield opened
    opened.release.set()
    opened.close()


def test_200_concurrent_adds_are_all_stored(spool: Spool, new_id: IdGenerator) -> None:
    committer = GroupCommitter(spool)
    made = [message(new_id(), (f"u{n}@d{n % 7}.example",), b"m%d" % n) for n in range(200)]

    async def main() -> None:
        await asyncio.gather(*(committer.add(m, b"m%d" % n) for n, m in enumerate(made)))

    try:
        asyncio.run(main())
    finally:
        committer.close()
    with spool.read() as txn:
        assert spool.message_count(txn) == 200
        for n, added in enumerate(made):
            assert spool.body(txn, added.id) == b"m%d" % n
            assert [job.recipients for job in spool.jobs_of(txn, added.id)] == [added.recipients]
        assert spool.stored_bytes(txn) == sum(len(b"m%d" % n) for n in range(200))


async def _hold_writer(
    spool: GatedSpool, committer: GroupCommitter, first: Message
) -> asyncio.Task:
    """Start ``first`` and return once the writer thread is stuck inside its commit."""
    spool.gate_id = first.id
    task = asyncio.create_task(committer.add(first, b"first"))
    assert await asyncio.to_thread(spool.entered.wait, 30)
    return task


def test_queued_adds_share_one_commit(gated: GatedSpool, new_id: IdGenerator) -> None:
    committer = GroupCommitter(gated)
    first = message(new_id(), ("a@example.com",), b"first")
    made = [message(new_id(), ("a@example.com",), b"x") for _ in range(200)]

    async def main() -> None:
        held = await _hold_writer(gated, committer, first)
        tasks = [asyncio.create_task(committer.add(m, b"x")) for m in made]
        # Runs after every task above has handed in its message.
        asyncio.get_running_loop().call_soon(gated.release.set)
        await asyncio.gather(held, *tasks)

    try:
        asyncio.run(main())
    finally:
        committer.close()
    assert gated.commits == 2  # the held one, then all 200 in one commit
    with gated.read() as txn:
        assert gated.message_count(txn) == 201


def test_spool_full_goes_to_the_message_that_does_not_fit(
    tmp_path: Path, new_id: IdGenerator
) -> None:
    small = GatedSpool(tmp_path / "spool", max_size=100)
    committer = GroupCommitter(small)
    first = message(new_id(), ("a@example.com",), b"first")  # 5 bytes
    made = [message(new_id(), (f"u{n}@example.com",), b"y" * 40) for n in range(3)]

    async def main() -> list[BaseException | None]:
        held = await _hold_writer(small, committer, first)
        tasks = [asyncio.create_task(committer.add(m, b"y" * 40)) for m in made]
        asyncio.get_running_loop().call_soon(small.release.set)
        await held
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        outcomes = asyncio.run(main())
    finally:
        small.release.set()
        committer.close()
    try:
        assert small.commits == 2  # all three were in one batch
        assert outcomes[:2] == [None, None]
        assert isinstance(outcomes[2], SpoolFull)
        assert str(outcomes[2]) == "spool size limit reached"
        with small.read() as txn:
            assert [m.id for m in small.all_messages(txn)] == [first.id, made[0].id, made[1].id]
            assert small.stored_bytes(txn) == 85
    finally:
        small.close()


def test_a_session_that_goes_away_still_has_its_message_stored(
    gated: GatedSpool, new_id: IdGenerator
) -> None:
    committer = GroupCommitter(gated)
    first = message(new_id(), ("a@example.com",), b"first")
    leaving = message(new_id(), ("b@example.com",), b"gone")
    after = message(new_id(), ("c@example.com",), b"after")

    async def main() -> None:
        held = await _hold_writer(gated, committer, first)
        task = asyncio.create_task(committer.add(leaving, b"gone"))
        loop = asyncio.get_running_loop()
        loop.call_soon(task.cancel)  # after the task has handed in its message
        loop.call_soon(gated.release.set)
        await held
        with pytest.raises(asyncio.CancelledError):
            await task
        # The writer survived settling a cancelled future and keeps working.
        await committer.add(after, b"after")

    try:
        asyncio.run(main())
    finally:
        committer.close()
    with gated.read() as txn:
        assert gated.body(txn, leaving.id) == b"gone"
        assert gated.body(txn, after.id) == b"after"


def test_close_commits_what_was_handed_in(spool: Spool, new_id: IdGenerator) -> None:
    committer = GroupCommitter(spool)
    added = message(new_id(), ("a@example.com",), b"last")

    async def main() -> None:
        task = asyncio.create_task(committer.add(added, b"last"))
        closed = asyncio.get_running_loop().create_future()

        def close() -> None:  # runs after the task has handed in its message
            committer.close()
            closed.set_result(None)

        asyncio.get_running_loop().call_soon(close)
        await closed
        await task  # resolved: the message was committed before the writer stopped

    asyncio.run(main())
    with spool.read() as txn:
        assert spool.body(txn, added.id) == b"last"


def committing_threads(committer: GroupCommitter, count: int) -> list[str]:
    """The thread that ran each of ``count`` changes handed in during one pass of the loop."""

    def change(txn: lmdb.Transaction) -> str:
        committer.spool.add_to_counter(txn, "n", 1)
        return threading.current_thread().name

    async def main() -> list[str]:
        return await asyncio.gather(*(committer.run(change) for _ in range(count)))

    try:
        return asyncio.run(main())
    finally:
        committer.close()


def test_a_busy_pass_of_the_loop_is_committed_on_the_loop_in_one_commit(
    gated: GatedSpool,
) -> None:
    threads = committing_threads(GroupCommitter(gated), INLINE_BATCH)
    assert threads == [threading.current_thread().name] * INLINE_BATCH
    assert gated.commits == 1
    with gated.read() as txn:
        assert gated.counter(txn, "n") == INLINE_BATCH


def test_a_quiet_pass_of_the_loop_is_committed_by_the_writer_thread(gated: GatedSpool) -> None:
    """So the loop goes on serving sessions while a lone change is synced."""
    threads = committing_threads(GroupCommitter(gated), INLINE_BATCH - 1)
    assert threads == ["spool-writer"] * (INLINE_BATCH - 1)
    with gated.read() as txn:
        assert gated.counter(txn, "n") == INLINE_BATCH - 1


def test_a_loop_stopped_before_it_flushed_does_not_stall_the_next(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    first = asyncio.new_event_loop()

    abandoned = committer.run(lambda txn: spool.add_to_counter(txn, "n", 1))

    async def hand_in_and_stop() -> None:
        abandoned.send(None)  # run() hands its change in and waits for the commit
        first.stop()  # before the next pass, which would flush it

    first.run_until_complete(hand_in_and_stop())
    first.close()
    abandoned.close()  # nobody is waiting for it any more

    async def next_loop() -> None:
        await asyncio.wait_for(committer.run(lambda txn: spool.add_to_counter(txn, "n", 10)), 30)

    try:
        asyncio.run(next_loop())
    finally:
        committer.close()
    with spool.read() as txn:
        assert spool.counter(txn, "n") == 11  # the abandoned change is stored too


def test_a_message_whose_size_is_not_its_length_is_refused(
    spool: Spool, new_id: IdGenerator
) -> None:
    wrong = message(new_id(), ("a@example.com",), b"four")
    with spool.write() as txn, pytest.raises(ValueError, match="size 4 != 3 bytes"):
        spool.add(txn, wrong, b"two")
    with spool.read() as txn:
        assert spool.message_count(txn) == 0 and spool.stored_bytes(txn) == 0


def test_a_failed_commit_is_reported_and_the_writer_carries_on(
    spool: Spool, new_id: IdGenerator
) -> None:
    committer = GroupCommitter(spool)
    original = message(new_id(), ("a@example.com",), b"one")
    later = message(new_id(), ("b@example.com",), b"two")

    async def main() -> None:
        await committer.add(original, b"one")
        with pytest.raises(ValueError, match="already in the spool"):
            await committer.add(original, b"ONE")
        await committer.add(later, b"two")

    try:
        asyncio.run(main())
    finally:
        committer.close()
    with spool.read() as txn:
        assert spool.body(txn, original.id) == b"one"
        assert spool.body(txn, later.id) == b"two"


def test_a_change_that_raises_fails_alone_and_the_others_count_once(
    gated: GatedSpool, new_id: IdGenerator
) -> None:
    """The batch runs in one nested transaction first; when a change raises, that
    is undone and each change runs again alone: nothing counts twice."""
    committer = GroupCommitter(gated)
    first = message(new_id(), ("a@example.com",), b"first")

    def bump(txn: lmdb.Transaction) -> None:
        gated.add_to_counter(txn, "n", 1)

    def broken(txn: lmdb.Transaction) -> None:
        gated.add_to_counter(txn, "n", 100)
        raise ValueError("broken change")

    async def main() -> list[BaseException | None]:
        held = await _hold_writer(gated, committer, first)
        tasks = [asyncio.create_task(committer.run(change)) for change in (bump, broken, bump)]
        asyncio.get_running_loop().call_soon(gated.release.set)
        await held
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        outcomes = asyncio.run(main())
    finally:
        committer.close()
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ValueError)
    assert gated.commits == 2  # the held one, then the three in one commit
    with gated.read() as txn:
        assert gated.counter(txn, "n") == 2


def test_a_write_syncs_its_meta_page_after_releasing_the_writer_lock(spool: Spool) -> None:
    """metasync is off: write() syncs once the commit is visible and while another
    writer can already begin, so LMDB's lock is held for one fdatasync, not two."""
    seen: list[tuple[int, bool, bool]] = []
    env = spool.env

    class Watched:
        def __getattr__(self, name: str) -> object:
            return getattr(env, name)

        def sync(self, force: bool = False) -> None:
            with env.begin() as txn:
                committed = spool.counter(txn, "n")
            other = threading.Thread(target=lambda: env.begin(write=True).abort(), daemon=True)
            other.start()
            other.join(10)
            seen.append((committed, not other.is_alive(), force))
            env.sync(force)

    spool.env = Watched()  # type: ignore[assignment]
    try:
        with spool.write() as txn:
            spool.add_to_counter(txn, "n", 7)
    finally:
        spool.env = env
    assert seen == [(7, True, True)]


def scanned_stats(spool: Spool) -> dict[str, object]:
    """What stats() must say, computed the slow way: from every job."""
    with spool.read() as txn:
        jobs = list(spool.all_jobs(txn))
    by_domain: dict[str, tuple[int, int]] = {}
    by_class: dict[str, int] = {}
    for job in jobs:
        count, recipients = by_domain.get(job.domain, (0, 0))
        by_domain[job.domain] = (count + 1, recipients + len(job.recipients))
        if job.last_class:
            by_class[job.last_class] = by_class.get(job.last_class, 0) + 1
    return {"jobs": len(jobs), "by_domain": by_domain, "by_class": by_class}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    operations=st.lists(
        st.tuples(
            st.sampled_from(["add", "hold", "defer", "delete"]),
            st.integers(0, 9),
            st.lists(st.sampled_from(["a.test", "b.test", "c.test"]), min_size=1, max_size=3),
        ),
        max_size=25,
    )
)
def test_stats_counters_agree_with_a_scan(
    tmp_path_factory: pytest.TempPathFactory, operations: list
) -> None:  # type: ignore[type-arg]
    spool = Spool(tmp_path_factory.mktemp("spool"), max_size=2**20)
    new_id = IdGenerator(node="test")
    ids: list[str] = []
    for action, pick, domains in operations:
        with spool.write() as txn:
            if action == "add" or not ids:
                queue_id = new_id()
                recipients = tuple(f"u{n}@{d}" for n, d in enumerate(domains))
                spool.add(txn, message(queue_id, recipients, b"x"), b"x")
                ids.append(queue_id)
                continue
            jobs = spool.jobs_of(txn, ids[pick % len(ids)])
            if not jobs:
                continue
            job = jobs[0]
            if action == "hold":
                spool.put_job(txn, job.with_state(JobState.HELD), old=job)
            elif action == "defer":
                waiting = replace(job, attempts=job.attempts + 1, last_class="rate_limited")
                spool.put_job(txn, waiting, old=job)
            else:
                spool.delete_job(txn, job)
    with spool.read() as txn:
        stats = spool.stats(txn)
    expected = scanned_stats(spool)
    assert stats.jobs == expected["jobs"]
    assert {d: (s.jobs, s.recipients) for d, s in stats.by_domain.items()} == expected["by_domain"]
    assert stats.by_class == expected["by_class"]
    spool.close()


def test_untried_jobs_are_new_mail_delivery_has_not_looked_at(
    spool: Spool, new_id: IdGenerator
) -> None:
    first = message(new_id(), ("a@one.example", "b@two.example"), b"x")
    second = message(new_id(), ("c@one.example",), b"y")
    with spool.write() as txn:
        spool.add(txn, first, b"x")
        spool.add(txn, second, b"y")
    with spool.write() as txn:
        assert spool.untried_jobs(txn) == 3
        one, two = spool.jobs_of(txn, first.id)
        spool.put_job(txn, replace(one, attempts=1, last_reply="451 later"), old=one)
        # A job that waited for a free path or a suspension has a reply, no attempt.
        spool.put_job(txn, replace(two, last_reply="451 4.7.0 delivery deferred"), old=two)
        [three] = spool.jobs_of(txn, second.id)
        spool.put_job(txn, three.with_state(JobState.HELD), old=three)
        assert spool.untried_jobs(txn) == 0
        assert spool.stats(txn).jobs == 3  # the count is not a job of any domain


def test_a_spool_counted_before_untried_jobs_were_gets_them_counted_once(
    tmp_path: Path, new_id: IdGenerator
) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    with spool.write() as txn:
        spool.add(txn, message(new_id(), ("a@one.example", "b@two.example"), b"x"), b"x")
        txn.delete(b"u", db=spool._counts)  # as an older version left it
        txn.delete(b"untried-counted", db=spool._meta)
    spool.close()
    reopened = Spool(tmp_path / "spool", max_size=2**20)
    with reopened.read() as txn:
        assert reopened.untried_jobs(txn) == 2
    reopened.close()
