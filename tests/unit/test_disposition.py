"""What becomes of each recipient after an attempt: pure, with an injected clock."""

from __future__ import annotations

import random

from mta.mail.reply import Reply
from mta.policy.disposition import EXPIRED_NOTE, decide
from mta.policy.retry import RetrySchedule
from mta.spool.records import Job

SCHEDULE = RetrySchedule(first=60, factor=2, cap=3600, jitter=0, max_age=86400)
OK = Reply(250, "2.0.0 Ok: queued")
BUSY = Reply(451, "4.3.0 try later")
UNKNOWN = Reply(550, "5.1.1 no such user")


def job(*recipients: str, attempts: int = 0) -> Job:
    return Job("06H13HS0N80M1W00", "example.net", recipients, next_attempt=0.0, attempts=attempts)


def test_each_recipient_gets_its_own_outcome() -> None:
    replies = {"a@example.net": OK, "b@example.net": UNKNOWN, "c@example.net": BUSY}
    decision = decide(job(*replies), replies, 1000.0, 1000.0, SCHEDULE, random.Random(1))
    assert decision.delivered == ("a@example.net",)
    assert decision.bounced == (("b@example.net", UNKNOWN),)
    assert decision.deferred == ("c@example.net",)
    assert decision.next_attempt == 1060.0
    assert not decision.expired


def test_retries_back_off_with_the_attempt_count() -> None:
    replies = {"a@example.net": BUSY}
    decision = decide(
        job("a@example.net", attempts=3), replies, 0.0, 500.0, SCHEDULE, random.Random()
    )
    assert decision.next_attempt == 500.0 + 480.0  # 60 * 2**3


def test_nothing_left_means_no_next_attempt() -> None:
    replies = {"a@example.net": OK, "b@example.net": UNKNOWN}
    decision = decide(job(*replies), replies, 0.0, 10.0, SCHEDULE, random.Random())
    assert decision.deferred == () and decision.next_attempt is None


def test_temporary_failure_past_max_age_bounces_with_the_last_reply() -> None:
    replies = {"a@example.net": BUSY, "b@example.net": OK}
    decision = decide(job(*replies), replies, 0.0, 86400.0, SCHEDULE, random.Random())
    assert decision.expired and decision.deferred == () and decision.next_attempt is None
    [(recipient, reply)] = decision.bounced
    assert recipient == "a@example.net"
    assert reply.code == 451 and reply.status == "4.3.0" and EXPIRED_NOTE in reply.text
    assert decision.delivered == ("b@example.net",)


def test_just_before_max_age_still_defers() -> None:
    replies = {"a@example.net": BUSY}
    decision = decide(job("a@example.net"), replies, 0.0, 86399.0, SCHEDULE, random.Random())
    assert decision.deferred == ("a@example.net",) and not decision.bounced
