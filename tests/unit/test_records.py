"""Spool records: messages and jobs survive encoding; keys sort as the scheduler needs."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from mta.spool.ids import ALPHABET
from mta.spool.records import (
    Job,
    JobState,
    Message,
    domain_of,
    due_key,
    due_time,
    job_key,
    job_prefix,
    jobs_for,
    split_job_key,
)

QID = "0123456789ABCDEF"

queue_ids = st.text(alphabet=ALPHABET, min_size=16, max_size=16)
times = st.floats(min_value=0, max_value=2**40, allow_nan=False, allow_infinity=False)

messages = st.builds(
    Message,
    id=queue_ids,
    sender=st.text(),
    recipients=st.lists(st.text(), max_size=5).map(tuple),
    arrived=times,
    size=st.integers(min_value=0, max_value=2**40),
    client=st.text(),
    message_id=st.text(),
)

jobs = st.builds(
    Job,
    message_id=queue_ids,
    domain=st.text(),
    recipients=st.lists(st.text(), max_size=5).map(tuple),
    next_attempt=times,
    state=st.sampled_from(JobState),
    attempts=st.integers(min_value=0, max_value=10_000),
    last_reply=st.text(),
)


@given(messages)
def test_message_round_trips(message: Message) -> None:
    assert Message.decode(message.encode()) == message


@given(jobs)
def test_job_round_trips(job: Job) -> None:
    decoded = Job.decode(job.encode())
    assert decoded == job
    assert decoded.state is job.state
    assert isinstance(decoded.recipients, tuple)


def test_encoding_is_json_an_operator_can_read() -> None:
    job = Job(
        QID,
        "example.com",
        ("a@example.com",),
        next_attempt=12.5,
        attempts=2,
        state=JobState.HELD,
        last_reply="451 4.7.1 try later",
        last_class="rate_limited",
    )
    assert json.loads(job.encode()) == {
        "message_id": QID,
        "domain": "example.com",
        "recipients": ["a@example.com"],
        "next_attempt": 12.5,
        "state": "held",
        "attempts": 2,
        "last_reply": "451 4.7.1 try later",
        "last_class": "rate_limited",
        "priority": "bulk",
    }


def test_with_state_keeps_or_sets_the_due_time() -> None:
    job = Job(QID, "example.com", ("a@example.com",), next_attempt=100.0)
    held = job.with_state(JobState.HELD)
    assert (held.state, held.next_attempt) == (JobState.HELD, 100.0)
    released = held.with_state(JobState.READY, next_attempt=250.0)
    assert (released.state, released.next_attempt) == (JobState.READY, 250.0)
    assert released.recipients == job.recipients


# --- jobs_for ---


def test_jobs_for_groups_recipients_by_lowercased_domain_in_first_seen_order() -> None:
    message = Message(
        id=QID,
        sender="app@sender.example",
        recipients=("a@Gmail.com", "b@example.org", "c@gmail.COM", "d@EXAMPLE.org", "e@x.net"),
        arrived=1_700_000_000.5,
        size=10,
    )
    result = jobs_for(message)
    assert [(job.domain, job.recipients) for job in result] == [
        ("gmail.com", ("a@Gmail.com", "c@gmail.COM")),  # addresses keep their case
        ("example.org", ("b@example.org", "d@EXAMPLE.org")),
        ("x.net", ("e@x.net",)),
    ]
    for job in result:
        assert job.message_id == QID
        assert job.state is JobState.READY
        assert job.next_attempt == message.arrived  # due at once
        assert (job.attempts, job.last_reply) == (0, "")


def test_jobs_for_one_domain_is_one_job() -> None:
    message = Message(QID, "", ("a@example.com", "b@example.com"), arrived=1.0, size=1)
    assert len(jobs_for(message)) == 1


def test_domain_of_takes_the_part_after_the_last_at() -> None:
    assert domain_of('"a@b"@Example.COM') == "example.com"


# --- keys ---


@given(queue_ids, st.text())
def test_job_key_round_trips(queue_id: str, domain: str) -> None:
    key = job_key(queue_id, domain)
    assert split_job_key(key) == (queue_id, domain)
    assert key.startswith(job_prefix(queue_id))
    assert Job(queue_id, domain, (), 0.0).key == key


@given(queue_ids, queue_ids, st.text())
def test_a_job_key_does_not_match_another_messages_prefix(a: str, b: str, domain: str) -> None:
    if a != b:
        assert not job_key(a, domain).startswith(job_prefix(b))


@given(st.lists(st.tuples(times, queue_ids, st.text(min_size=1, max_size=20)), max_size=30))
def test_due_keys_sort_by_time_then_job_key(entries: list[tuple[float, str, str]]) -> None:
    all_jobs = [Job(queue_id, domain, (), next_attempt=t) for t, queue_id, domain in entries]
    by_key = sorted(all_jobs, key=due_key)
    expected = sorted(all_jobs, key=lambda job: (int(job.next_attempt * 1000), job.key))
    assert [due_key(job) for job in by_key] == [due_key(job) for job in expected]


def test_due_key_orders_by_time_before_key() -> None:
    early = Job("ZZZZZZZZZZZZZZZZ", "z.example", (), next_attempt=1.0)
    late = Job("0000000000000000", "a.example", (), next_attempt=2.0)
    same_time_other_key = Job("0000000000000001", "a.example", (), next_attempt=2.0)
    assert due_key(early) < due_key(late) < due_key(same_time_other_key)


@given(times)
def test_due_time_reads_back_the_millisecond(t: float) -> None:
    job = Job(QID, "example.com", (), next_attempt=t)
    assert due_time(due_key(job)) == int(t * 1000) / 1000


def test_due_key_clamps_times_before_the_epoch_to_zero() -> None:
    job = Job(QID, "example.com", (), next_attempt=-5.0)
    assert due_time(due_key(job)) == 0.0
    assert due_key(job).endswith(job.key)
