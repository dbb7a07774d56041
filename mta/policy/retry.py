"""When to try a deferred delivery again, and when to stop trying.

Exponential backoff with a cap and jitter: a domain that is down for a while
is not hammered, and the thousands of jobs one burst deferred at the same
moment do not all come back at the same moment either. After ``max_age`` in
the queue a message is given up on and bounced as expired.

Pure (docs/architecture.md, invariant 7): the clock and the random source are arguments, so
the schedule is tested without waiting and, with a seeded ``random.Random``,
reproducibly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetrySchedule:
    first: float = 60.0  # seconds after the first failed attempt
    factor: float = 2.0  # each later wait is factor times the previous
    cap: float = 3600.0  # no wait longer than this
    jitter: float = 0.1  # +/- fraction of the wait, so retries of a burst spread out
    max_age: float = 5 * 86400  # after this long in the queue, give up (bounce as expired)

    def __post_init__(self) -> None:
        # Each check is phrased as "x must be ..., got ..." so a config loader
        # can put the key name in front and show it as is. NaN fails every
        # comparison, and infinities are refused: an infinite cap would let
        # the wait grow until factor ** n overflows.
        for name in ("first", "cap", "max_age"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be a number >= 1, got {self.factor!r}.")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be at least 0 and less than 1, got {self.jitter!r}.")


def base_wait(schedule: RetrySchedule, attempts: int) -> float:
    """The wait before jitter after `attempts` failed attempts (>= 1).

    That is first * factor ** (attempts - 1), capped. A cap below `first`
    wins: every wait is then the cap.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1 (the attempt that failed), got {attempts}.")
    steps = attempts - 1
    if schedule.first >= schedule.cap:
        return schedule.cap
    if schedule.factor == 1:
        return schedule.first
    # factor ** steps overflows a float for large attempt counts (2.0 ** 1100
    # raises OverflowError), so decide "already at the cap" from logarithms
    # first; only exponents small enough to stay near the cap are computed.
    steps_to_cap = math.log(schedule.cap / schedule.first) / math.log(schedule.factor)
    if steps >= steps_to_cap:
        return schedule.cap
    return min(schedule.cap, schedule.first * schedule.factor**steps)


def next_attempt(schedule: RetrySchedule, attempts: int, now: float, rng: random.Random) -> float:
    """Absolute time of the next try, after `attempts` attempts (>= 1) of which the last failed.

    The wait is base_wait() scaled by a uniform factor in [1 - jitter, 1 + jitter],
    except that it never exceeds the cap: a jittered wait past the cap is
    reflected back below it. Jobs waiting at the cap thus still spread over
    [cap * (1 - jitter), cap], instead of all landing on exactly the cap as
    clamping would make them.
    """
    base = base_wait(schedule, attempts)
    wait = base * (1 + rng.uniform(-schedule.jitter, schedule.jitter))
    if wait > schedule.cap:
        wait = 2 * schedule.cap - wait
    return now + wait


def expired(schedule: RetrySchedule, arrived: float, now: float) -> bool:
    """True once the message has been queued for max_age seconds or more: bounce it."""
    return now - arrived >= schedule.max_age
