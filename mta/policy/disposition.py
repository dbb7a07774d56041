"""What becomes of each recipient of a job after a delivery attempt.

Pure: given the job, the reply each recipient got, the message's arrival and
the clock, it says who was delivered, who bounces (and with which reply),
who waits for another try, and when that try is. A recipient that keeps
failing temporarily until the message is older than ``max_age`` bounces
with its last reply, marked as expired.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from mta.mail.reply import Reply
from mta.policy.outcome import Outcome, outcome
from mta.policy.retry import RetrySchedule, expired, next_attempt

EXPIRED_NOTE = "delivery time expired"


class Tried(Protocol):
    """What a decision needs of the job just tried (a spooled job is one)."""

    @property
    def recipients(self) -> tuple[str, ...]: ...

    @property
    def attempts(self) -> int: ...  # attempts before this one


@dataclass(frozen=True)
class Decision:
    delivered: tuple[str, ...]
    bounced: tuple[tuple[str, Reply], ...]  # recipient, the reply that bounces it
    deferred: tuple[str, ...]
    next_attempt: float | None  # when to try the deferred ones again
    expired: bool  # the deferred ones ran out of time and bounce instead


def decide(
    job: Tried,
    replies: Mapping[str, Reply],
    arrived: float,
    now: float,
    schedule: RetrySchedule,
    rng: random.Random,
) -> Decision:
    delivered: list[str] = []
    bounced: list[tuple[str, Reply]] = []
    deferred: list[str] = []
    for recipient in job.recipients:
        reply = replies[recipient]
        result = outcome(reply)
        if result is Outcome.DELIVERED:
            delivered.append(recipient)
        elif result is Outcome.BOUNCED:
            bounced.append((recipient, reply))
        else:
            deferred.append(recipient)
    too_old = bool(deferred) and expired(schedule, arrived, now)
    if too_old:
        bounced += [(recipient, expired_reply(replies[recipient])) for recipient in deferred]
        deferred = []
    retry = next_attempt(schedule, job.attempts + 1, now, rng) if deferred else None
    return Decision(tuple(delivered), tuple(bounced), tuple(deferred), retry, too_old)


def expired_reply(last: Reply) -> Reply:
    """The last temporary reply, noted as the reason a recipient finally bounces."""
    return Reply(last.code, f"{last.text} ({EXPIRED_NOTE})")
