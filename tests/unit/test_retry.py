"""Retry schedule: exponential waits up to a cap, bounded jitter, expiry; all without a clock."""

from __future__ import annotations

import math
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.retry import RetrySchedule, base_wait, expired, next_attempt

NOW = 1_700_000_000.0
DEFAULT = RetrySchedule()
NO_JITTER = RetrySchedule(jitter=0.0)


def test_waits_double_from_first_to_cap() -> None:
    rng = random.Random(1)
    waits = [next_attempt(NO_JITTER, n, NOW, rng) - NOW for n in range(1, 10)]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_seeded_rng_gives_the_same_schedule_twice() -> None:
    first = [next_attempt(DEFAULT, n, NOW, random.Random(7)) for n in range(1, 12)]
    again = [next_attempt(DEFAULT, n, NOW, random.Random(7)) for n in range(1, 12)]
    assert first == again


def test_jitter_spreads_a_burst() -> None:
    rng = random.Random(3)
    times = {next_attempt(DEFAULT, 1, NOW, rng) for _ in range(100)}
    assert len(times) == 100
    assert min(times) - NOW < 57 and max(times) - NOW > 63  # uses most of 54..66


def test_jitter_at_the_cap_stays_below_the_cap_and_still_spreads() -> None:
    rng = random.Random(5)
    waits = [next_attempt(DEFAULT, 50, NOW, rng) - NOW for _ in range(200)]
    assert all(3600 * 0.9 <= w <= 3600 for w in waits)
    assert len(set(waits)) == 200  # reflected, not clamped onto the cap


@pytest.mark.parametrize("attempts", [1100, 10**6, 10**400])
def test_huge_attempt_counts_do_not_overflow(attempts: int) -> None:
    assert base_wait(DEFAULT, attempts) == 3600
    assert math.isfinite(next_attempt(DEFAULT, attempts, NOW, random.Random(0)))


def test_factor_one_is_a_fixed_interval() -> None:
    schedule = RetrySchedule(first=300, factor=1, cap=3600, jitter=0)
    assert [base_wait(schedule, n) for n in (1, 2, 50, 10**9)] == [300] * 4


def test_cap_below_first_wins() -> None:
    schedule = RetrySchedule(first=600, cap=120, jitter=0)
    assert [base_wait(schedule, n) for n in (1, 2, 3)] == [120] * 3


def test_attempts_below_one_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        next_attempt(DEFAULT, 0, NOW, random.Random(0))


@given(
    attempts=st.integers(min_value=1, max_value=10**30),
    now=st.floats(min_value=0, max_value=4e9),
    seed=st.integers(min_value=0, max_value=2**64),
    jitter=st.floats(min_value=0, max_value=0.99),
)
def test_jitter_bounds_hold(attempts: int, now: float, seed: int, jitter: float) -> None:
    schedule = RetrySchedule(jitter=jitter)
    base = base_wait(schedule, attempts)
    wait = next_attempt(schedule, attempts, now, random.Random(seed)) - now
    slack = 1e-6 * max(1.0, now)  # now + wait loses some bits of wait when now is large
    assert base * (1 - jitter) - slack <= wait <= min(schedule.cap, base * (1 + jitter)) + slack
    assert wait > 0


@given(attempts=st.integers(min_value=1, max_value=200))
def test_waits_never_shrink_and_never_pass_the_cap(attempts: int) -> None:
    assert base_wait(DEFAULT, attempts) <= base_wait(DEFAULT, attempts + 1) <= DEFAULT.cap


def test_expired_boundary() -> None:
    arrived = NOW
    assert not expired(DEFAULT, arrived, arrived)
    assert not expired(DEFAULT, arrived, arrived + 5 * 86400 - 0.001)
    assert expired(DEFAULT, arrived, arrived + 5 * 86400)
    assert expired(DEFAULT, arrived, arrived + 6 * 86400)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"first": 0}, "first must be a positive number of seconds, got 0."),
        ({"first": -1.0}, "first must be a positive number of seconds"),
        ({"cap": 0}, "cap must be a positive number of seconds"),
        ({"cap": math.inf}, "cap must be a positive number of seconds, got inf."),
        ({"max_age": 0}, "max_age must be a positive number of seconds"),
        ({"first": math.nan}, "first must be a positive number of seconds, got nan."),
        ({"factor": 0.5}, "factor must be a number >= 1, got 0.5."),
        ({"factor": math.inf}, "factor must be a number >= 1"),
        ({"jitter": 1.0}, "jitter must be at least 0 and less than 1, got 1.0."),
        ({"jitter": -0.1}, "jitter must be at least 0 and less than 1"),
        ({"jitter": math.nan}, "jitter must be at least 0 and less than 1"),
    ],
)
def test_invalid_schedules_are_refused_with_a_sentence(
    fields: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RetrySchedule(**fields)
