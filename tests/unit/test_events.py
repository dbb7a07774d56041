"""Delivery events: construction, the file, spooling in the outcome's commit,
and the webhook loop's decisions (backoff, batches, what is deleted).

No sockets and no sleeps: the clock is a number, the webhook's POST is a
function, backoff delays are drawn from an injected random source (and are
zero where the loop runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import lmdb
import pytest

from mta.config import EventsConfig
from mta.events.event import Event, attempt_events, received_events
from mta.events.log import EventLog, RotatingFile
from mta.events.webhook import Backoff, Webhook, batch_body, post_result
from mta.mail.reply import Reply
from mta.observe.timefmt import iso_time
from mta.policy.disposition import Decision
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.records import Message
from mta.spool.store import Spool
from tests.unit.test_attempt import run_attempt

NOW = 1_800_000_000.0
MESSAGE = Message(
    id="0123456789ABCDEF",
    sender="app@example.test",
    recipients=("a@example.net", "b@example.net"),
    arrived=NOW - 10,
    size=100,
    message_id="<m1@example.test>",
)
OK = Reply(250, "2.0.0 Ok")
BUSY = Reply(451, "4.3.0 try later")
GONE = Reply(550, "5.1.1 no such user")
BODY = b"From: app@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
WEBHOOK = EventsConfig(webhook_url="http://127.0.0.1:9/hook", webhook_batch=2)


def by_recipient(events: list[Event]) -> dict[str, Event]:
    return {event.recipient: event for event in events}


# --- construction ---


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert iso_time(NOW + 0.1234) == "2027-01-15T08:00:00.123Z"


def test_a_reception_is_one_event_per_recipient() -> None:
    events = received_events(MESSAGE, NOW)
    assert [e.recipient for e in events] == ["a@example.net", "b@example.net"]
    first = events[0]
    assert first.id == "0123456789ABCDEF.a@example.net.0.received"
    assert first.type == "received"
    assert first.time == iso_time(NOW)
    assert first.arrived == iso_time(NOW - 10)
    assert (first.queue_id, first.message_id, first.sender) == (
        MESSAGE.id,
        "<m1@example.test>",
        "app@example.test",
    )
    assert first.attempt == 0
    assert first.mx is first.reply is first.dsn is first.classification is None


def test_two_nodes_events_of_the_same_moment_and_process_differ() -> None:
    # Containers: two nodes' workers with equal PIDs accept a message in the same millisecond.
    a, b = (
        replace(MESSAGE, id=IdGenerator(node=node, clock=lambda: NOW, pid=7)())
        for node in ("mx1", "mx2")
    )
    events_a, events_b = received_events(a, NOW), received_events(b, NOW)
    assert not {event.id for event in events_a} & {event.id for event in events_b}
    assert events_a[0].id.startswith(a.id + ".")


def test_an_event_is_compact_ascii_json_with_every_field() -> None:
    message = Message("0123456789ABCDEF", "", ("jürgen@example.net",), NOW, 1)
    encoded = received_events(message, NOW)[0].encode()
    assert b" " not in encoded and b"\n" not in encoded
    assert encoded.isascii()
    fields = json.loads(encoded)
    assert list(fields) == [
        "id",
        "type",
        "time",
        "queue_id",
        "message_id",
        "sender",
        "recipient",
        "source",
        "site",
        "mx",
        "reply",
        "dsn",
        "classification",
        "attempt",
        "arrived",
        "tenant",
        "campaign",
        "metadata",
    ]
    assert fields["recipient"] == "jürgen@example.net"
    assert fields["sender"] == ""


def attempt(
    replies: dict[str, Reply], decision: Decision, *, tried: bool = True, attempt: int = 3
) -> dict[str, Event]:
    return by_recipient(
        attempt_events(
            message=MESSAGE,
            recipients=list(replies),
            replies=replies,
            decision=decision,
            attempt=attempt,
            now=NOW,
            classify=lambda reply: f"class-{reply.code}",
            mx="mx.example.net[192.0.2.1]:25",
            source="default",
            site="example.net",
            tried=tried,
        )
    )


def test_an_attempt_makes_delivered_bounced_and_deferred_events() -> None:
    events = attempt(
        {"a@example.net": OK, "b@example.net": GONE, "c@example.net": BUSY},
        Decision(
            delivered=("a@example.net",),
            bounced=(("b@example.net", GONE),),
            deferred=("c@example.net",),
            next_attempt=NOW + 60,
            expired=False,
        ),
    )
    delivered, bounced, deferred = (events[f"{n}@example.net"] for n in "abc")
    assert delivered.type == "delivered"
    assert delivered.id == "0123456789ABCDEF.a@example.net.3.delivered"
    assert (delivered.reply, delivered.dsn, delivered.classification) == (
        "250 2.0.0 Ok",
        "2.0.0",
        None,
    )
    assert (delivered.mx, delivered.source, delivered.site, delivered.attempt) == (
        "mx.example.net[192.0.2.1]:25",
        "default",
        "example.net",
        3,
    )
    assert (bounced.type, bounced.dsn, bounced.classification) == ("bounced", "5.1.1", "class-550")
    assert (deferred.type, deferred.dsn, deferred.classification) == (
        "deferred",
        "4.3.0",
        "class-451",
    )
    assert len({event.id for event in events.values()}) == 3


def test_expiry_is_told_apart_from_a_bounce_in_the_same_attempt() -> None:
    expired_reply = Reply(451, "4.3.0 try later (delivery time expired)")
    events = attempt(
        {"a@example.net": BUSY, "b@example.net": GONE},
        Decision(
            delivered=(),
            bounced=(("b@example.net", GONE), ("a@example.net", expired_reply)),
            deferred=(),
            next_attempt=None,
            expired=True,
        ),
    )
    assert events["a@example.net"].type == "expired"
    assert events["a@example.net"].reply == str(expired_reply)
    assert events["b@example.net"].type == "bounced"


def test_waiting_for_a_path_is_no_deferral_but_expiry_still_is_an_event() -> None:
    waiting = Decision((), (), ("a@example.net",), NOW + 5, False)
    assert attempt({"a@example.net": BUSY}, waiting, tried=False) == {}
    expired = Decision((), (("a@example.net", BUSY),), (), None, True)
    assert attempt({"a@example.net": BUSY}, expired, tried=False)["a@example.net"].type == (
        "expired"
    )


# --- backoff and batches (pure) ---


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_doubles_from_one_second_up_to_the_cap() -> None:
    backoff = Backoff(cap=10.0)
    top = FixedRandom(0.999999)
    ceilings = [round(backoff.delay(n, top), 3) for n in range(1, 7)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay(0, top) == 0.0
    assert backoff.delay(10_000, top) <= 10.0  # no overflow after a long outage


def test_backoff_jitter_stays_between_half_and_all_of_the_step() -> None:
    backoff = Backoff(cap=300.0)
    assert backoff.delay(3, FixedRandom(0.0)) == 2.0
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(200)]
    assert all(2.0 <= delay <= 4.0 for delay in delays)
    assert len(set(delays)) > 100  # spread, so many MTAs do not retry in step


@pytest.mark.parametrize(
    ("status", "result"),
    [
        (200, "ok"),
        (204, "ok"),
        (299, "ok"),
        (301, "http_error"),
        (400, "http_error"),
        (500, "http_error"),
        (None, "connection_error"),
    ],
)
def test_only_a_2xx_answer_counts_as_delivered(status: int | None, result: str) -> None:
    assert post_result(status) == result


def test_a_batch_is_a_json_array_of_the_stored_events() -> None:
    events = [event.encode() for event in received_events(MESSAGE, NOW)]
    assert json.loads(batch_body(events)) == [json.loads(event) for event in events]
    assert batch_body([]) == b"[]"


# --- the file ---


def test_the_file_gets_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(EventsConfig(file=str(path)))
    events = received_events(MESSAGE, NOW)
    log.publish(events)
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [event.id for event in events]


def test_the_file_rotates_by_size_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    line_size = len(received_events(MESSAGE, NOW)[0].encode()) + 1
    log = EventLog(EventsConfig(file=str(path), max_file_bytes=line_size * 3, backups=2))
    for _ in range(10):
        log.publish(received_events(MESSAGE, NOW))  # 20 lines
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= line_size * 3


def test_no_backups_means_the_file_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    line_size = len(received_events(MESSAGE, NOW)[0].encode()) + 1
    log = EventLog(EventsConfig(file=str(path), max_file_bytes=line_size * 3, backups=0))
    for _ in range(10):
        log.publish(received_events(MESSAGE, NOW))
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]
    assert 0 < path.stat().st_size <= line_size * 3


# --- the spool ---


def test_events_are_spooled_only_for_a_webhook(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    events = received_events(MESSAGE, NOW)
    woken: list[bool] = []
    for settings in (EventsConfig(), WEBHOOK):
        log = EventLog(settings, spool)
        log.wake = lambda: woken.append(True)
        with spool.write() as txn:
            log.store(txn, events)
        log.publish(events)
    with spool.read() as txn:
        stored = spool.events(txn, 10)
    assert [json.loads(data)["id"] for _, data in stored] == [event.id for event in events]
    assert woken == [True]  # only the webhook's log wakes it


def test_storing_wraps_a_change_so_its_events_share_its_transaction(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    log = EventLog(WEBHOOK, spool)
    message = replace(MESSAGE, size=len(BODY))
    events = received_events(message, NOW)

    def add(txn: lmdb.Transaction) -> str:
        spool.add(txn, message, BODY)
        return "done"

    with spool.write() as txn:
        assert log.storing(events, add)(txn) == "done"
    with spool.read() as txn:
        assert spool.message(txn, message.id) == message
        assert spool.event_count(txn) == 2
    failing = log.storing(events, lambda txn: 1 / 0)
    with pytest.raises(ZeroDivisionError), spool.write() as txn:
        failing(txn)
    with spool.read() as txn:
        assert spool.event_count(txn) == 2  # rolled back with the change


def test_an_attempt_stores_its_events_in_the_commit_of_its_outcome(tmp_path: Path) -> None:
    published: list[Event] = []

    def recording(spool: Spool) -> EventLog:
        events = EventLog(WEBHOOK, spool)
        original = events.publish

        def publish(batch: list[Event]) -> None:
            # Published only after the commit: the events are in the spool already.
            with spool.read() as txn:
                assert spool.event_count(txn) == len(batch)
            published.extend(batch)
            original(batch)

        events.publish = publish  # type: ignore[method-assign]
        return events

    recipients = ("ok@example.net", "busy@example.net", "gone@example.net")
    spool, _ = run_attempt(tmp_path, recipients, events=recording)
    kinds = {event.recipient: event.type for event in published}
    assert kinds == {
        "ok@example.net": "delivered",
        "busy@example.net": "deferred",
        "gone@example.net": "bounced",
    }
    with spool.read() as txn:
        stored = [json.loads(data) for _, data in spool.events(txn, 10)]
    assert [e["id"] for e in stored] == [e.id for e in published]
    assert {e["attempt"] for e in stored} == {1}
    assert {e["mx"] for e in stored} == {"mx.example.net[192.0.2.1]:25"}
    assert {e["classification"] for e in stored if e["type"] == "bounced"} == {"invalid_recipient"}


# --- the webhook loop ---


class FakePost:
    """Answers POSTs with the statuses given (an exception for None), records bodies."""

    def __init__(self, statuses: list[int | None], during: Callable[[], None] = lambda: None):
        self.statuses = statuses
        self.bodies: list[list[dict[str, object]]] = []
        self.during = during

    def __call__(self, url: str, body: bytes, timeout: float) -> int:
        self.during()
        self.bodies.append(json.loads(body))
        status = self.statuses.pop(0) if self.statuses else 200
        if status is None:
            raise ConnectionRefusedError(111, "Connection refused")
        return status


def spool_with_events(tmp_path: Path, count: int) -> tuple[Spool, list[str]]:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    message = Message("0123456789ABCDEF", "a@example.test", (), NOW, 1)
    ids = []
    with spool.write() as txn:
        for number in range(count):
            event = received_events(
                Message(message.id, message.sender, (f"r{number}@example.net",), NOW, 1), NOW
            )[0]
            spool.append_event(txn, event.encode())
            ids.append(event.id)
    return spool, ids


def pending(spool: Spool) -> int:
    with spool.read() as txn:
        return spool.event_count(txn)


def send_batches(spool: Spool, post: FakePost, times: int) -> list[int | None]:
    """Call send_batch ``times`` times in a row; what each returned."""

    async def main() -> list[int | None]:
        committer = GroupCommitter(spool)
        webhook = Webhook(spool, committer, WEBHOOK, post=post)
        results = [await webhook.send_batch() for _ in range(times)]
        committer.close()
        return results

    return asyncio.run(main())


def test_batches_go_oldest_first_and_leave_the_spool(tmp_path: Path) -> None:
    spool, ids = spool_with_events(tmp_path, 5)
    post = FakePost([])
    assert send_batches(spool, post, 4) == [2, 2, 1, 0]  # webhook_batch = 2; then none left
    assert [event["id"] for body in post.bodies for event in body] == ids
    assert pending(spool) == 0


def test_a_failing_webhook_gets_the_same_batch_again(tmp_path: Path) -> None:
    spool, ids = spool_with_events(tmp_path, 3)
    post = FakePost([500, None, 302, 200])
    assert send_batches(spool, post, 5) == [None, None, None, 2, 1]
    sent = [[event["id"] for event in body] for body in post.bodies]
    assert sent == [ids[:2]] * 4 + [ids[2:]]  # three failures, then accepted once
    assert pending(spool) == 0


def test_events_added_during_a_post_are_not_deleted_with_it(tmp_path: Path) -> None:
    spool, ids = spool_with_events(tmp_path, 2)
    late = received_events(MESSAGE, NOW)[0]

    def add_one() -> None:
        if not post.bodies:
            with spool.write() as txn:
                spool.append_event(txn, late.encode())

    post = FakePost([], during=add_one)
    assert send_batches(spool, post, 3) == [2, 1, 0]
    assert [event["id"] for body in post.bodies for event in body] == [*ids, late.id]


def run_until_posts(spool: Spool, post: FakePost, posts: int) -> Webhook:
    """Run the webhook task (no backoff delays) and stop it from its ``posts``-th POST."""

    async def main() -> Webhook:
        loop = asyncio.get_running_loop()
        committer = GroupCommitter(spool)
        webhook = Webhook(spool, committer, WEBHOOK, post=post, backoff=Backoff(cap=0, first=0))
        before = post.during

        def during() -> None:
            before()
            if len(post.bodies) + 1 == posts:
                loop.call_soon_threadsafe(webhook.stop)

        post.during = during
        await webhook.run()
        committer.close()
        return webhook

    return asyncio.run(main())


def test_the_task_retries_until_accepted_then_goes_on(tmp_path: Path) -> None:
    spool, ids = spool_with_events(tmp_path, 3)
    post = FakePost([None, 500, 200, 200])
    webhook = run_until_posts(spool, post, 4)
    assert webhook.failures == 0
    assert [[event["id"] for event in body] for body in post.bodies] == [ids[:2]] * 3 + [ids[2:]]
    assert pending(spool) == 0  # the last POST's delete committed before the task ended


def test_failures_count_up_while_the_webhook_is_down(tmp_path: Path) -> None:
    spool, _ = spool_with_events(tmp_path, 1)
    post = FakePost([None] * 5)
    webhook = run_until_posts(spool, post, 5)
    assert webhook.failures == 5
    assert pending(spool) == 1  # nothing lost


def test_stop_leaves_what_was_not_posted_in_the_spool(tmp_path: Path) -> None:
    spool, _ = spool_with_events(tmp_path, 5)
    post = FakePost([])

    async def main() -> None:
        committer = GroupCommitter(spool)
        webhook = Webhook(spool, committer, WEBHOOK, post=post)
        webhook.stop()
        await webhook.run()
        committer.close()

    asyncio.run(main())
    assert post.bodies == []
    assert pending(spool) == 5


def test_two_workers_share_the_file_and_its_rotation_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # Two handlers on one file, as two worker processes have: each keeps its
    # own open file, so each must notice when the other rotated it.
    workers = [RotatingFile(str(path), maxBytes=500, backupCount=100) for _ in range(2)]
    for number in range(120):
        line = f"{number:099}"  # 100 bytes with its newline
        workers[number % 2].emit(logging.LogRecord("e", logging.INFO, "", 0, line, None, None))
    for worker in workers:
        worker.close()

    def age(file: Path) -> int:  # events.jsonl.N is older for a larger N
        suffix = file.name.rpartition(".")[2]
        return int(suffix) if suffix.isdigit() else 0

    oldest_first = sorted(tmp_path.iterdir(), key=age, reverse=True)
    assert [path.name for path in oldest_first][-1] == "events.jsonl"
    lines = [int(line) for file in oldest_first for line in file.read_text().splitlines()]
    assert lines == list(range(120))  # none lost, none written into a rotated file
    assert all(file.stat().st_size <= 500 for file in oldest_first)
