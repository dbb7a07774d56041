"""IP warmup plans: daily caps from a schedule or growth, held days, hourly shares, roll-over."""

from __future__ import annotations

import datetime
import inspect
import math
import re
from collections.abc import Collection
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy import warmup
from mta.policy.warmup import (
    PRESETS,
    WarmupPlan,
    cap_tomorrow,
    daily_cap,
    day_of,
    hour_of,
    hour_share,
    plan_day,
    preset_plan,
    remaining,
)

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
        ({"schedule": [100, 200]}, r"schedule must be a tuple of daily caps, got \[100, 200\]"),
        ({"schedule": (100, 0)}, "schedule day 2 must be a whole number above 0, got 0"),
        ({"schedule": (100, -5)}, "schedule day 2 must be"),
        ({"schedule": (1.5,)}, "schedule day 1 must be"),
        ({"schedule": (True,)}, "schedule day 1 must be"),
        ({"schedule": (100,), "cap": 0}, "cap must be a whole number above 0, got 0"),
        ({"schedule": (100,), "cap": 50.0}, "cap must be a whole number above 0"),
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


# --- schedules and presets ---

SCHEDULED = WarmupPlan(start=START, schedule=(100, 300, 200))

# Twilio SendGrid's automated warm-up, hourly limits of its days 0-22 (the
# source of the "aggressive" preset, cited in mta/policy/warmup.py).
SENDGRID_HOURLY = (
    *(20, 28, 39, 55, 77, 108, 151, 211, 295, 413, 579, 810),
    *(1000, 1587, 2222, 3111, 4356, 6098, 8583, 11953, 16734, 23427, 32798),
)


def growth(schedule: tuple[int, ...]) -> list[float]:
    """Each day's cap over the day before's."""
    return [later / earlier for earlier, later in pairwise(schedule)]


def limited_cap(plan: WarmupPlan, on: datetime.date, held: Collection[datetime.date] = ()) -> int:
    """The day's cap of a plan that ends with a cap (never None)."""
    cap = daily_cap(plan, on, held)
    assert cap is not None
    return cap


def test_a_schedule_gives_each_day_its_cap_then_holds_the_last_for_good() -> None:
    # Growing every day is not required: the 200 after 300 is taken as is.
    assert [daily_cap(SCHEDULED, day(n)) for n in range(1, 6)] == [100, 300, 200, 200, 200]
    assert daily_cap(SCHEDULED, datetime.date.max) == 200
    assert daily_cap(SCHEDULED, datetime.date.min) == 100


def test_a_cap_over_a_schedule_holds_after_it_and_clips_it() -> None:
    raised = WarmupPlan(start=START, schedule=(100, 300, 200), cap=5000)
    assert [daily_cap(raised, day(n)) for n in range(1, 6)] == [100, 300, 200, 5000, 5000]
    clipped = WarmupPlan(start=START, schedule=(100, 300, 200), cap=150)
    assert [daily_cap(clipped, day(n)) for n in range(1, 6)] == [100, 150, 150, 150, 150]


def test_a_schedule_leaves_the_growth_settings_unused() -> None:
    plan = WarmupPlan(start=START, first_day=1, factor=10, until=2, schedule=(700,))
    assert daily_cap(plan, day(1)) == daily_cap(plan, day(50)) == 700
    # Nor does its cap have to reach first_day (500 by default).
    assert daily_cap(WarmupPlan(start=START, schedule=(50,), cap=80), day(9)) == 80


def test_the_presets_are_conservative_standard_aggressive() -> None:
    assert list(PRESETS) == ["conservative", "standard", "aggressive"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_grows_to_its_cap_and_holds_it_for_good(name: str) -> None:
    schedule = PRESETS[name]
    plan = preset_plan(name, START)
    caps = [daily_cap(plan, day(n)) for n in range(1, len(schedule) + 1)]
    assert caps == list(schedule) == sorted(schedule)  # reaches its cap on its last day
    assert daily_cap(plan, day(len(schedule) + 1)) == schedule[-1]
    assert daily_cap(plan, datetime.date.max) == schedule[-1]  # never unlimited


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_keeps_to_what_its_sources_say(name: str) -> None:
    schedule = PRESETS[name]
    assert 14 <= len(schedule) <= 42  # Amazon SES: at least 14 days, up to 6 weeks
    assert max(schedule[:7]) < 5000  # SparkPost: AOL held a new sender to 5,000/day
    assert max(growth(schedule)) < 2  # Google: doubling at once can bring rate limiting


@pytest.mark.parametrize("name", ["conservative", "standard"])
def test_conservative_and_standard_grow_as_postmark_advises(name: str) -> None:
    schedule = PRESETS[name]
    assert 100 <= schedule[0] <= 500  # to each provider at first
    assert all(1.2 <= step <= 1.5 for step in growth(schedule))  # then 20-50% a day


def test_aggressive_is_sendgrids_hourly_schedule_over_24_hours() -> None:
    plan = preset_plan("aggressive", START)
    for n, hourly in enumerate(SENDGRID_HOURLY, start=1):
        cap = limited_cap(plan, day(n))
        assert cap == hourly * 24
        assert {hour_share(cap, hour) for hour in range(24)} == {hourly}
    assert daily_cap(plan, day(len(SENDGRID_HOURLY) + 1)) == 1_000_000


def test_conservative_ends_at_the_50000_a_day_of_ses_automatic_warmup() -> None:
    assert PRESETS["conservative"][-1] == 50_000


def test_the_presets_are_ordered_on_every_day() -> None:
    for number in range(1, 100):
        caps = [limited_cap(preset_plan(name, START), day(number)) for name in PRESETS]
        assert caps == sorted(caps)


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_cites_sources_with_their_address(name: str) -> None:
    source = inspect.getsource(warmup)
    definition = source[source.index(f"_{name.upper()} = (") :]
    comment = definition[: definition.index("\n)")]
    cited = set(re.findall(r"\[([A-Za-z ]+)\]", comment))
    assert cited
    for tag in cited:
        assert re.search(rf"^# \[{tag}\] https://\S+", source, re.MULTILINE), tag


def test_a_preset_plan_takes_a_cap_of_its_own() -> None:
    plan = preset_plan("standard", START, cap=20_000)
    assert daily_cap(plan, day(1)) == PRESETS["standard"][0]
    assert daily_cap(plan, day(100)) == 20_000
    assert max(limited_cap(plan, day(n)) for n in range(1, 100)) == 20_000


def test_an_unknown_preset_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError) as error:
        preset_plan("fast", START)
    assert str(error.value) == (
        "warmup preset must be one of conservative, standard, aggressive, got 'fast'"
    )


# --- days that do not count ---

COUNTING = WarmupPlan(start=START, schedule=(10, 20, 30, 40, 50, 60, 70))


def test_a_held_day_in_the_middle_pushes_the_rest_back_by_one() -> None:
    held = {day(3)}
    caps = [daily_cap(COUNTING, day(n), held) for n in range(1, 8)]
    assert caps == [10, 20, 30, 30, 40, 50, 60]
    assert [plan_day(COUNTING, day(n), held) for n in range(1, 8)] == [1, 2, 3, 3, 4, 5, 6]


def test_held_days_before_the_start_or_from_the_day_on_change_nothing() -> None:
    held = [START - datetime.timedelta(days=5), day(6), day(9)]
    assert plan_day(COUNTING, day(6), held) == 6
    assert daily_cap(COUNTING, day(6), held) == daily_cap(COUNTING, day(6)) == 60


def test_being_held_today_keeps_todays_cap_and_tomorrows() -> None:
    assert daily_cap(COUNTING, day(4), {day(4)}) == 40
    assert cap_tomorrow(COUNTING, day(4), {day(4)}) == 40
    assert cap_tomorrow(COUNTING, day(4)) == 50


def test_a_day_held_twice_counts_once() -> None:
    assert plan_day(COUNTING, day(5), [day(2), day(2)]) == 4


def test_held_days_hold_a_growth_plan_too() -> None:
    caps = [daily_cap(PLAN, day(n), {day(2)}) for n in range(1, 5)]
    assert caps == [500, 1000, 1000, 2000]
    assert remaining(PLAN, day(3), 400, {day(2)}) == 600


def test_days_before_the_start_are_day_one() -> None:
    assert plan_day(COUNTING, START - datetime.timedelta(days=3)) == 1
    assert plan_day(COUNTING, datetime.date.min) == 1
    assert cap_tomorrow(COUNTING, START - datetime.timedelta(days=3)) == 10
    assert cap_tomorrow(COUNTING, START - datetime.timedelta(days=1)) == 10


def test_the_last_date_has_a_tomorrow() -> None:
    assert cap_tomorrow(COUNTING, datetime.date.max) == 70


held_days = st.sets(st.integers(min_value=-5, max_value=40), max_size=20)


@given(offset=st.integers(min_value=-5, max_value=40), held_offsets=held_days)
def test_plan_day_counts_the_days_from_the_start_that_were_not_held(
    offset: int, held_offsets: set[int]
) -> None:
    held = {day(1 + n) for n in held_offsets}
    counted = [n for n in range(offset) if n not in held_offsets]
    assert plan_day(COUNTING, day(1 + offset), held) == 1 + len(counted)


@given(
    name=st.sampled_from(list(PRESETS)),
    offset=st.integers(min_value=-5, max_value=60),
    held_offsets=held_days,
)
def test_tomorrow_is_the_next_days_cap_and_a_preset_never_shrinks(
    name: str, offset: int, held_offsets: set[int]
) -> None:
    plan = preset_plan(name, START)
    held = {day(1 + n) for n in held_offsets}
    today = day(1 + offset)
    tomorrow = today + datetime.timedelta(days=1)
    assert cap_tomorrow(plan, today, held) == daily_cap(plan, tomorrow, held)
    assert limited_cap(plan, tomorrow, held) >= limited_cap(plan, today, held)


# --- spread over the day ---


def test_hour_shares_add_up_to_the_cap_and_none_is_over_a_24th_rounded_up() -> None:
    for cap in [*range(0, 2000), 10**6 + 7, 1_102_008, 10**9 + 11]:
        shares = [hour_share(cap, hour) for hour in range(24)]
        assert sum(shares) == cap
        assert max(shares) <= math.ceil(cap / 24)


def test_a_small_cap_leaves_some_hours_nothing() -> None:
    assert [hour_share(10, hour) for hour in range(6)] == [0, 0, 1, 0, 1, 0]
    assert [hour_share(480, hour) for hour in range(24)] == [20] * 24


@given(cap=st.integers(min_value=1, max_value=10**7), hour=st.integers(min_value=0, max_value=23))
def test_no_hour_gets_more_than_its_part_of_the_day(cap: int, hour: int) -> None:
    share = hour_share(cap, hour)
    assert 0 <= share <= math.ceil(cap / 24)
    # The hours up to this one never have more than their part of the cap.
    assert sum(hour_share(cap, h) for h in range(hour + 1)) == cap * (hour + 1) // 24


@pytest.mark.parametrize(
    ("cap", "hour", "message"),
    [
        (100, 24, "hour must be a whole number from 0 to 23, got 24"),
        (100, -1, "hour must be"),
        (100, 1.0, "hour must be"),
        (100, True, "hour must be"),
        (-1, 0, "cap must be a whole number, 0 or more, got -1"),
        (1.5, 0, "cap must be"),
    ],
)
def test_hour_share_refuses_what_is_not_a_cap_or_an_hour(cap: int, hour: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hour_share(cap, hour)


def test_hours_follow_the_same_offset_as_days() -> None:
    # 23:30 UTC on Nov 1 is 00:30 on Nov 2 at UTC+1 and 18:30 at UTC-5.
    moment = datetime.datetime(2026, 11, 1, 23, 30, tzinfo=datetime.UTC).timestamp()
    assert hour_of(moment) == 23
    assert (day_of(moment, 1), hour_of(moment, 1)) == (datetime.date(2026, 11, 2), 0)
    assert (day_of(moment, -5), hour_of(moment, -5)) == (datetime.date(2026, 11, 1), 18)
    assert (day_of(moment, 0.5), hour_of(moment, 0.5)) == (datetime.date(2026, 11, 2), 0)


def test_hour_of_refuses_an_offset_of_a_day_or_more() -> None:
    with pytest.raises(ValueError, match="utc_offset_hours"):
        hour_of(0, 24)


@given(
    now=st.integers(min_value=0, max_value=4 * 10**9),
    quarters=st.integers(min_value=-12 * 4, max_value=14 * 4),
)
def test_hour_of_and_day_of_agree_at_every_offset(now: int, quarters: int) -> None:
    offset_seconds = quarters * 900
    local = now + offset_seconds
    epoch = datetime.date(1970, 1, 1)
    assert day_of(now, quarters / 4) == epoch + datetime.timedelta(days=local // 86400)
    assert hour_of(now, quarters / 4) == local % 86400 // 3600
    # The day turns exactly when the hour goes from 23 to 0.
    day_turns = day_of(now - 1, quarters / 4) != day_of(now, quarters / 4)
    assert day_turns == ((hour_of(now - 1, quarters / 4), hour_of(now, quarters / 4)) == (23, 0))
