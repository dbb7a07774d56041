"""IP warmup plans: daily caps that grow from first_day, a ceiling or an end, day roll-over."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.warmup import WarmupPlan, daily_cap, day_of, remaining

START = datetime.date(2026, 11, 1)
PLAN = WarmupPlan(start=START)


def day(n: int) -> datetime.date:
    """Day n of the plan (day 1 is the start)."""
    return START + datetime.timedelta(days=n - 1)


def test_doubling_from_500() -> None:
    assert [daily_cap(PLAN, day(n)) for n in range(1, 8)] == [
        500,
        1000,
        2000,
        4000,
        8000,
        16000,
        32000,
    ]


def test_without_a_cap_the_plan_ends_when_the_cap_would_reach_until() -> None:
    assert daily_cap(PLAN, day(11)) == 512_000
    assert daily_cap(PLAN, day(12)) is None  # 1,024,000 >= 1,000,000: warmed up
    assert daily_cap(PLAN, day(400)) is None
    assert remaining(PLAN, day(12), 5_000_000) is None


def test_reaching_until_exactly_ends_the_plan() -> None:
    plan = WarmupPlan(start=START, first_day=1000, until=8000)
    assert [daily_cap(plan, day(n)) for n in range(1, 6)] == [1000, 2000, 4000, None, None]


def test_a_cap_holds_the_daily_limit_for_good() -> None:
    plan = WarmupPlan(start=START, cap=5000)
    assert [daily_cap(plan, day(n)) for n in range(1, 7)] == [500, 1000, 2000, 4000, 5000, 5000]
    assert daily_cap(plan, day(10_000)) == 5000
    assert daily_cap(plan, datetime.date.max) == 5000  # no overflow, however late


def test_days_before_the_start_are_cold() -> None:
    assert daily_cap(PLAN, START - datetime.timedelta(days=30)) == 500
    assert daily_cap(PLAN, datetime.date.min) == 500


def test_a_slow_factor_rounds_down_to_whole_messages() -> None:
    plan = WarmupPlan(start=START, first_day=500, factor=1.1)
    assert [daily_cap(plan, day(n)) for n in range(1, 5)] == [500, 550, 605, 665]


def test_factor_one_is_a_fixed_daily_cap() -> None:
    plan = WarmupPlan(start=START, first_day=2000, factor=1)
    assert daily_cap(plan, day(1)) == daily_cap(plan, day(10_000)) == 2000


def test_remaining_counts_down_and_never_goes_negative() -> None:
    assert remaining(PLAN, day(1), 0) == 500
    assert remaining(PLAN, day(1), 499) == 1
    assert remaining(PLAN, day(1), 500) == 0
    assert remaining(PLAN, day(1), 10_000) == 0
    assert remaining(PLAN, day(2), 400) == 600


def test_remaining_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="sent_today must be"):
        remaining(PLAN, day(1), -1)


def test_days_roll_over_at_midnight_utc() -> None:
    midnight = datetime.datetime(2026, 11, 2, tzinfo=datetime.UTC).timestamp()
    before, after = day_of(midnight - 1), day_of(midnight)
    assert (before, after) == (datetime.date(2026, 11, 1), datetime.date(2026, 11, 2))
    # The caller keys its counters by day: the new day starts from 0 sent.
    sent = {before: 500}
    assert remaining(PLAN, before, sent.get(before, 0)) == 0
    assert remaining(PLAN, after, sent.get(after, 0)) == 1000


def test_days_can_roll_over_at_another_offset() -> None:
    # 23:30 UTC on Nov 1 is already Nov 2 at UTC+1, still Nov 1 at UTC-5.
    moment = datetime.datetime(2026, 11, 1, 23, 30, tzinfo=datetime.UTC).timestamp()
    assert day_of(moment) == datetime.date(2026, 11, 1)
    assert day_of(moment, utc_offset_hours=1) == datetime.date(2026, 11, 2)
    assert day_of(moment, utc_offset_hours=-5) == datetime.date(2026, 11, 1)
    assert day_of(moment, utc_offset_hours=0.5) == datetime.date(2026, 11, 2)


@pytest.mark.parametrize("offset", [24, -24, float("nan"), float("inf")])
def test_day_of_refuses_an_offset_of_a_day_or_more(offset: float) -> None:
    with pytest.raises(ValueError, match="utc_offset_hours"):
        day_of(0, offset)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"first_day": 0}, "first_day must be a whole number above 0, got 0"),
        ({"first_day": -5}, "first_day must be"),
        ({"first_day": 1.5}, "first_day must be"),
        ({"first_day": True}, "first_day must be"),
        ({"factor": 0.5}, "factor must be a number, 1 or more, got 0.5"),
        ({"factor": float("nan")}, "factor must be"),
        ({"factor": float("inf")}, "factor must be"),
        ({"cap": 100}, r"cap must be a whole number, at least first_day \(500\), got 100"),
        ({"cap": 1000.0}, "cap must be"),
        ({"until": 500}, r"until must be a whole number above first_day \(500\)"),
    ],
)
def test_bad_plans_are_refused_with_one_sentence(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        WarmupPlan(start=START, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(error.value)


def test_start_must_be_a_date() -> None:
    with pytest.raises(ValueError, match="start must be a date"):
        WarmupPlan(start="2026-11-01")  # type: ignore[arg-type]


plans = st.builds(
    WarmupPlan,
    start=st.dates(),
    first_day=st.integers(min_value=1, max_value=100_000),
    factor=st.floats(min_value=1, max_value=10),
    cap=st.none() | st.integers(min_value=100_000, max_value=10**12),
    until=st.integers(min_value=100_001, max_value=10**12),
)


@given(plan=plans, offset=st.integers(min_value=-1000, max_value=5000))
def test_caps_grow_never_shrink_and_respect_cap_and_until(plan: WarmupPlan, offset: int) -> None:
    try:
        today = plan.start + datetime.timedelta(days=offset)
        tomorrow = today + datetime.timedelta(days=1)
    except OverflowError:
        return
    cap_today, cap_tomorrow = daily_cap(plan, today), daily_cap(plan, tomorrow)
    if cap_today is None:  # warmed up stays warmed up
        assert plan.cap is None and cap_tomorrow is None
        return
    assert cap_today >= plan.first_day
    if plan.cap is not None:
        assert cap_today <= plan.cap
        assert cap_tomorrow is not None
    else:
        assert cap_today < plan.until
    assert cap_tomorrow is None or cap_tomorrow >= cap_today


@given(plan=plans, offset=st.integers(min_value=0, max_value=2000), sent=st.integers(0, 10**13))
def test_remaining_is_cap_minus_sent_floored_at_zero(
    plan: WarmupPlan, offset: int, sent: int
) -> None:
    try:
        today = plan.start + datetime.timedelta(days=offset)
    except OverflowError:
        return
    cap = daily_cap(plan, today)
    left = remaining(plan, today, sent)
    assert left is None if cap is None else left == max(cap - sent, 0)


@given(st.floats(min_value=0, max_value=4e9), st.floats(min_value=-23.9, max_value=23.9))
def test_day_of_is_the_calendar_date_at_that_offset(now: float, offset: float) -> None:
    shifted = datetime.datetime.fromtimestamp(now + offset * 3600, tz=datetime.UTC)
    since_midnight = shifted - shifted.replace(hour=0, minute=0, second=0, microsecond=0)
    if min(since_midnight.total_seconds(), 86400 - since_midnight.total_seconds()) < 0.001:
        return  # the two ways of adding the offset may round to either side of midnight
    assert day_of(now, offset) == shifted.date()
