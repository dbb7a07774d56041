"""Smooth rate limiting (GCRA): parsing "10/s", spacing, burst, no idle credit, rate changes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.rate import RateLimiter, parse_rate

T0 = 1_700_000_000.0  # wall-clock sized times: float rounding is coarsest here


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("10/s", 10.0),
        ("5/sec", 5.0),
        ("2/second", 2.0),
        ("600/min", 10.0),
        ("100/minute", 100 / 60),
        ("30/minutes", 0.5),
        ("20000/hour", 20000 / 3600),
        ("2000/h", 2000 / 3600),
        ("7200/hr", 2.0),
        ("1/day", 1 / 86400),
        ("86400/d", 1.0),
        ("0.5/s", 0.5),
        (" 10 / S ", 10.0),
        ("10/Hour", 10 / 3600),
    ],
)
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(
    "text",
    ["", "10", "10/", "/s", "ten/s", "10/fortnight", "10/m", "10 per second", "1e3/s", "10/s/s"],
)
def test_parse_rate_refuses_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a rate such as \"10/s\".*, got ") as error:
        parse_rate(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["0/s", "0.0/min", "-5/s", "9" * 400 + "/s"])
def test_parse_rate_refuses_zero_negative_and_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="must be more than zero"):
        parse_rate(text)


@given(st.text(max_size=30))
def test_parse_rate_returns_a_positive_rate_or_raises_value_error(text: str) -> None:
    try:
        rate = parse_rate(text)
    except ValueError:
        return
    assert math.isfinite(rate) and rate > 0


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (1, 0), (1, 1.5), (True, 1)]
)
def test_limiter_refuses_bad_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


def test_first_message_goes_at_once_then_one_per_interval() -> None:
    limiter = RateLimiter(10)
    assert limiter.wait(T0) == 0.0
    limiter.take(T0)
    assert limiter.wait(T0) == pytest.approx(0.1)
    assert limiter.wait(T0 + 0.05) == pytest.approx(0.05)
    assert limiter.wait(T0 + 0.1) == 0.0


def test_wait_does_not_consume() -> None:
    limiter = RateLimiter(1)
    for _ in range(5):
        assert limiter.wait(T0) == 0.0
    limiter.take(T0)
    assert limiter.wait(T0 + 0.5) == pytest.approx(0.5)


def test_burst_goes_at_once_then_the_rate_holds() -> None:
    limiter = RateLimiter(2, burst=5)
    sent = 0
    while limiter.wait(T0) == 0.0:
        limiter.take(T0)
        sent += 1
    assert sent == 5
    assert limiter.wait(T0) == pytest.approx(0.5)


def test_a_long_idle_earns_no_more_than_the_burst() -> None:
    limiter = RateLimiter(100, burst=3)
    limiter.take(T0)
    later = T0 + 86400
    sent = 0
    while limiter.wait(later) == 0.0:
        limiter.take(later)
        sent += 1
    assert sent == 3


def test_advancing_the_clock_by_exactly_the_wait_is_enough() -> None:
    # Float rounding at wall-clock magnitudes must not leave a 1e-7 s wait.
    limiter = RateLimiter(3)
    now = T0
    for _ in range(1000):
        now += limiter.wait(now)
        assert limiter.wait(now) == 0.0
        limiter.take(now)
    assert now - T0 == pytest.approx(999 / 3, rel=1e-6)


def test_lowering_the_rate_slows_the_next_message_at_once() -> None:
    limiter = RateLimiter(10, burst=1)
    limiter.take(T0)  # next due at T0 + 0.1
    limiter.set_rate(1, T0)  # one message of debt, now worth 1 s
    assert limiter.wait(T0) == pytest.approx(1.0)
    limiter.take(T0 + 1.0)
    assert limiter.wait(T0 + 1.0) == pytest.approx(1.0)


def test_raising_the_rate_grants_no_burst() -> None:
    limiter = RateLimiter(1, burst=2)
    limiter.take(T0)
    limiter.take(T0)  # the burst is used up
    limiter.set_rate(1000, T0 + 0.5)
    sent = 0
    while limiter.wait(T0 + 0.5) == 0.0:
        limiter.take(T0 + 0.5)
        sent += 1
    assert sent <= 2
    assert limiter.per_second == 1000


def test_set_rate_when_idle_keeps_the_burst() -> None:
    limiter = RateLimiter(1, burst=4)
    limiter.set_rate(0.5, T0)
    sent = 0
    while limiter.wait(T0) == 0.0:
        limiter.take(T0)
        sent += 1
    assert sent == 4
    assert limiter.wait(T0) == pytest.approx(2.0)


def test_set_rate_refuses_a_bad_rate() -> None:
    limiter = RateLimiter(1)
    with pytest.raises(ValueError):
        limiter.set_rate(0, T0)
    assert limiter.per_second == 1


def _drive(limiter: RateLimiter, start: float, steps: list[tuple[float, bool]]) -> list[float]:
    """Send whenever allowed: each step advances the clock (or jumps to the next
    allowed time) and sends as many as wait() lets through right then."""
    now = start
    sent: list[float] = []
    for advance, jump in steps:
        now += limiter.wait(now) if jump else advance
        while limiter.wait(now) == 0.0 and len(sent) < 10_000:
            limiter.take(now)
            sent.append(now)
    return sent


_steps = st.lists(
    st.tuples(st.floats(min_value=0, max_value=5, allow_nan=False), st.booleans()),
    max_size=60,
)


@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    burst=st.integers(min_value=1, max_value=20),
    start=st.sampled_from([0.0, 12345.678, T0]),
    steps=_steps,
)
def test_no_window_holds_more_than_burst_plus_rate_times_length(
    rate: float, burst: int, start: float, steps: list[tuple[float, bool]]
) -> None:
    sent = _drive(RateLimiter(rate, burst), start, steps)
    # Float slack: wait() lets a message through a few ulps early, and each
    # step of the schedule may round by an ulp of the clock's magnitude.
    ulp = math.ulp(max(abs(start), *sent, 1.0))
    # The fullest windows start and end on a send: check every such window.
    for i, first in enumerate(sent):
        for j in range(i, len(sent)):
            count = j - i + 1
            allowed = burst + (sent[j] - first) * rate
            assert count <= allowed + rate * (count + 8) * ulp + 1e-9


@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    start=st.sampled_from([0.0, T0]),
    steps=_steps,
)
def test_burst_one_spaces_sends_by_the_interval(
    rate: float, start: float, steps: list[tuple[float, bool]]
) -> None:
    sent = _drive(RateLimiter(rate, 1), start, steps)
    for earlier, later in zip(sent, sent[1:], strict=False):
        slack = 8 * (math.ulp(max(abs(later), 1.0)) + math.ulp(1 / rate))
        assert later - earlier >= 1 / rate - slack


@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    burst=st.integers(min_value=1, max_value=50),
    idle=st.floats(min_value=0, max_value=1e7),
    before=st.integers(min_value=0, max_value=100),
)
def test_after_any_idle_at_most_burst_go_at_once(
    rate: float, burst: int, idle: float, before: int
) -> None:
    limiter = RateLimiter(rate, burst)
    for n in range(before):
        limiter.take(T0 + n / rate)  # a steady stream at the full rate
    now = T0 + before / rate + idle
    sent = 0
    while limiter.wait(now) == 0.0 and sent <= burst:
        limiter.take(now)
        sent += 1
    assert sent <= burst
    if idle >= burst / rate:  # fully rested: the whole burst, no more
        assert sent == burst
