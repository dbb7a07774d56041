"""IP warmup: how many messages a new source may send to one provider per day and per hour.

A new sending IP has no reputation, and the big providers defer or junk
mail from an IP that starts at full volume. A ``WarmupPlan`` starts low and
raises the daily cap (per source, per provider) day by day, in one of two
ways:

- a ``schedule``: the daily caps of day 1, day 2, ... written out, after
  which the cap holds at ``cap`` (default: the schedule's last value) for
  good. ``PRESETS`` ships three, all ending at a cap; ``preset_plan``
  builds a plan from one.
- growth: ``first_day`` messages on day 1, times ``factor`` each day. Either
  ``cap`` holds it at a ceiling for good or, without a cap, the plan ends
  when the daily cap would reach ``until`` and the source has no daily
  limit any more.

Days are calendar days (midnight UTC by default, see ``day_of``). A day on
which the source was held back by the provider (suspended or throttled for
reputation) does not count towards the plan (``plan_day``). Within a day,
each clock hour may send only its share of the day's cap (``hour_share``),
so that the cap is spread over the day rather than spent just after
midnight. The caller keeps its sent counters per (source, provider, day) or
per (source, provider, hour), so a new day or hour starts from zero by
itself.

Pure (docs/architecture.md, invariant 7): dates and timestamps are arguments.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

HOURS_PER_DAY = 24

# Daily caps per provider, day 1 first, a line a week; each ends at the cap it then holds.
#
# Sources (figures carried over, words ours):
# [Postmark] https://postmarkapp.com/guides/how-to-warm-up-a-domain
#   Warm up per receiving provider: start at about 100-500 messages to each
#   for the first couple of days, double at first, then grow by only 20-50%
#   a day once the volume is substantial.
# [Google] https://support.google.com/mail/answer/81126
#   Start with a low volume to engaged users and increase slowly; send at a
#   consistent rate, not in bursts; suddenly doubling the volume can bring
#   rate limiting or a reputation drop; when mail starts bouncing or being
#   deferred, send less until the errors go down, then grow slowly again.
# [SES] https://docs.aws.amazon.com/ses/latest/DeveloperGuide/dedicated-ip-warming.html
#   A new IP needs at least 14 days, and up to 6 weeks with many ISPs, to
#   build a reputation; warm up with the recipients who engage the most.
# [SES auto] https://aws.amazon.com/about-aws/whats-new/2017/03/amazon-ses-can-now-automatically-warm-up-your-dedicated-ip-addresses/
#   SES's automatic warm-up raises an IP's daily maximum to 50,000 within 45 days.
# [SendGrid] https://www.twilio.com/docs/sendgrid/ui/sending-email/warming-up-an-ip-address
#   Automated warm-up of an IP added beside the account's warm ones (which
#   take the overflow): hourly limits of 20 on day 0, 28, 39, 55, ... (about
#   1.4 times a day), 1,000 on day 12, 45,917 on day 23; "the slower you can
#   warm up the better".
# [SparkPost] https://www.sparkpost.com/docs/deliverability/ip-warm-up-overview/ (April 2017)
#   Full deliverability takes 4 to 8 weeks; AOL held new senders to
#   5,000/day and Outlook to 20,000/day for the first week.
#
# All three stay below AOL's 5,000/day in their first week [SparkPost].
_CONSERVATIVE = (
    # 100 on day 1, the low end of [Postmark]'s start, then 20% more each day
    # (its slowest growth, never doubling [Google]), rounded up to two
    # figures, to 50,000, [SES auto]'s figure, on day 32: four and a half
    # weeks, within [SES]'s 2 to 6 and [SparkPost]'s 4 to 8.
    *(100, 120, 150, 180, 220, 270, 330),
    *(400, 480, 580, 700, 840, 1_100, 1_400),
    *(1_700, 2_100, 2_600, 3_200, 3_900, 4_700, 5_700),
    *(6_900, 8_300, 10_000, 12_000, 15_000, 18_000, 22_000),
    *(27_000, 33_000, 40_000, 50_000),
)
_STANDARD = (
    # 200 on day 1, within [Postmark]'s 100-500, then 30% more each day (the
    # middle of its 20-50%), rounded up to two figures, to 100,000 on day 23.
    *(200, 260, 340, 450, 590, 770, 1_100),
    *(1_500, 2_000, 2_600, 3_400, 4_500, 5_900, 7_700),
    *(11_000, 15_000, 20_000, 26_000, 34_000, 45_000, 59_000),
    *(77_000, 100_000),
)
_AGGRESSIVE = (
    # [SendGrid]'s hourly limits for days 0-22 times 24 hours, so that each
    # hour's share (hour_share) is exactly its hourly limit, then 1,000,000
    # (its day 23 would be 1,102,008). SendGrid's limits are for the whole
    # IP and here they hold per provider: hence for established domains only.
    *(480, 672, 936, 1_320, 1_848, 2_592, 3_624),
    *(5_064, 7_080, 9_912, 13_896, 19_440, 24_000, 38_088),
    *(53_328, 74_664, 104_544, 146_352, 205_992, 286_872, 401_616),
    *(562_248, 787_152, 1_000_000),
)
PRESETS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {"conservative": _CONSERVATIVE, "standard": _STANDARD, "aggressive": _AGGRESSIVE}
)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class WarmupPlan:
    start: datetime.date  # day 1 of the plan
    first_day: int = 500  # growth: messages per day per provider on day 1
    factor: float = 2.0  # growth: each day's cap is factor times the previous
    cap: int | None = None  # the daily cap never exceeds this (and the plan never ends)
    until: int = 1_000_000  # growth without a cap: once the daily cap would reach this, no cap
    schedule: tuple[int, ...] = ()  # daily caps of day 1, 2, ...; first_day, factor, until unused

    def __post_init__(self) -> None:
        # Phrased "x must be ..., got ..." so a config loader can put the
        # key's place in front and show it as is.
        if not isinstance(self.start, datetime.date) or isinstance(self.start, datetime.datetime):
            raise ValueError(f"start must be a date such as 2026-11-25, got {self.start!r}")
        _check_growth(self)
        _check_schedule(self.schedule)
        _check_cap(self)


def _check_growth(plan: WarmupPlan) -> None:
    if not (_whole(plan.first_day) and plan.first_day > 0):
        raise ValueError(f"first_day must be a whole number above 0, got {plan.first_day!r}")
    factor = plan.factor
    if isinstance(factor, bool) or not isinstance(factor, int | float):
        raise ValueError(f"factor must be a number, 1 or more, got {factor!r}")
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"factor must be a number, 1 or more, got {factor!r}")
    if not (_whole(plan.until) and plan.until > plan.first_day):
        raise ValueError(
            f"until must be a whole number above first_day ({plan.first_day}), got {plan.until!r}"
        )


def _check_schedule(schedule: object) -> None:
    if not isinstance(schedule, tuple):
        raise ValueError(f"schedule must be a tuple of daily caps, got {schedule!r}")
    for number, day_cap in enumerate(schedule, start=1):
        if not (_whole(day_cap) and day_cap > 0):
            raise ValueError(
                f"schedule day {number} must be a whole number above 0, got {day_cap!r}"
            )


def _check_cap(plan: WarmupPlan) -> None:
    if plan.cap is None:
        return
    if plan.schedule:
        if not (_whole(plan.cap) and plan.cap > 0):
            raise ValueError(f"cap must be a whole number above 0, got {plan.cap!r}")
    # A growth plan starts at first_day, so a lower cap would contradict it.
    elif not (_whole(plan.cap) and plan.cap >= plan.first_day):
        raise ValueError(
            f"cap must be a whole number, at least first_day ({plan.first_day}), got {plan.cap!r}"
        )


def preset_plan(name: str, start: datetime.date, *, cap: int | None = None) -> WarmupPlan:
    """A plan on one of ``PRESETS``' schedules from ``start``; ``cap`` overrides its last value.

    - "conservative" (100 to 50,000 a day per provider by day 32): a new IP
      on a domain with little sending history, sending only to the most
      engaged recipients while on it.
    - "standard" (200 to 100,000 by day 23): the typical case, a new IP
      for a domain with some history and a list in good health.
    - "aggressive" (480 to 1,000,000 by day 24, SendGrid's automated
      schedule): only for a new IP joining a domain whose reputation is
      already established, with warm sources beside it to carry the overflow.

    A ``cap`` below a schedule's figures clips them; one above its last
    value is reached in a single step the day after the schedule ends.
    """
    schedule = PRESETS.get(name)
    if schedule is None:
        raise ValueError(f"warmup preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return WarmupPlan(start, cap=cap, schedule=schedule)


def plan_day(plan: WarmupPlan, day: datetime.date, held: Collection[datetime.date] = ()) -> int:
    """Which day of the plan `day` is: 1 on the start, one more for each day that counted.

    ``held`` are the days on which the provider held the source back
    (suspended or throttled it for reputation): they do not count, because
    a provider pushing back asks for less volume, not more (Google's sender
    guidelines: send less until the errors go down, then grow slowly again).
    Only the days before ``day`` matter, so being held today does not lower
    today's cap: it only keeps tomorrow's where today's is. A day before the
    start is day 1: a source used early is still cold.
    """
    if day <= plan.start:
        return 1
    not_counted = {held_day for held_day in held if plan.start <= held_day < day}
    return 1 + (day - plan.start).days - len(not_counted)


def daily_cap(
    plan: WarmupPlan, day: datetime.date, held: Collection[datetime.date] = ()
) -> int | None:
    """Messages per provider allowed on `day`; None: no limit (warmed up).

    The cap of the plan's day number (``plan_day``) on `day`: with a
    schedule, its entry for that day (past its end, ``cap`` or its last
    value), never above ``cap``. With growth, day n is first_day *
    factor ** (n - 1) rounded down, held at ``cap`` if there is one; without
    a cap, the day this would reach ``until`` and every later day have no
    limit.
    """
    return _cap_of_day(plan, plan_day(plan, day, held))


def cap_tomorrow(
    plan: WarmupPlan, today: datetime.date, held: Collection[datetime.date] = ()
) -> int | None:
    """The cap the day after `today` gets if nothing more is held than ``held`` says.

    Counted from today's day number rather than from today + 1 day, so that
    the last representable date has a tomorrow too.
    """
    counts = plan.start <= today and today not in held
    return _cap_of_day(plan, plan_day(plan, today, held) + (1 if counts else 0))


def _cap_of_day(plan: WarmupPlan, number: int) -> int | None:
    if plan.schedule:
        return _scheduled_cap(plan, number)
    return _grown_cap(plan, number - 1)


def _scheduled_cap(plan: WarmupPlan, number: int) -> int:
    if number > len(plan.schedule):
        return plan.schedule[-1] if plan.cap is None else plan.cap
    day_cap = plan.schedule[number - 1]
    return day_cap if plan.cap is None else min(day_cap, plan.cap)


def _grown_cap(plan: WarmupPlan, steps: int) -> int | None:
    grown = _grown(plan, steps)
    if plan.cap is not None:
        return plan.cap if grown >= plan.cap else min(_round_down(grown), plan.cap)
    if grown >= plan.until:
        return None
    capped = _round_down(grown)
    return None if capped >= plan.until else capped


def _grown(plan: WarmupPlan, steps: int) -> float:
    """first_day * factor ** steps; inf where that overflows a float (years of doubling)."""
    if steps == 0 or plan.factor == 1:
        return plan.first_day
    try:
        return plan.first_day * plan.factor**steps
    except OverflowError:
        return math.inf


def _round_down(value: float) -> int:
    """The whole number of messages in `value`, read through float noise.

    500 * 1.1 ** 2 is 605.0000000000001, and another product could as well
    land on 604.9999999999999: a value within a relative 1e-9 of a whole
    number is that number, anything else is rounded down.
    """
    nearest = round(value)
    if abs(value - nearest) <= 1e-9 * max(1.0, abs(value)):
        return int(nearest)
    return math.floor(value)


def remaining(
    plan: WarmupPlan,
    day: datetime.date,
    sent_today: int,
    held: Collection[datetime.date] = (),
) -> int | None:
    """How many more messages may go to the provider on `day`; None: unlimited.

    Never negative: a source that went over its cap (a cap lowered in the
    config, counters from before a restart) has 0 left, not a debt.
    """
    if isinstance(sent_today, bool) or not isinstance(sent_today, int) or sent_today < 0:
        raise ValueError(f"sent_today must be a whole number, 0 or more, got {sent_today!r}")
    cap = daily_cap(plan, day, held)
    if cap is None:
        return None
    return max(cap - sent_today, 0)


def hour_share(cap: int, hour: int) -> int:
    """The part of a day's `cap` that clock hour `hour` (0-23) may send.

    floor(cap * (hour + 1) / 24) - floor(cap * hour / 24): the 24 shares add
    up to the cap exactly and none is more than ceil(cap / 24), so mail
    leaves at a steady rate instead of in one burst after midnight (Google:
    "send email at a consistent rate"; SendGrid's warm-up limits are hourly
    too). With one counter per clock hour capped at its share, a day never
    sends more than its cap. An hour's unused share is not carried over,
    since that would allow the burst again: a source that starts at noon
    sends about half the day's cap that day at most.

    Clock hours, not a sliding window: a counter per hour is one key in the
    store, where a window would need every send's time. The price is that a
    window straddling two hours (10:30 to 11:30) may hold both hours' shares,
    so up to twice ceil(cap / 24) within an hour, never more.
    """
    if not (_whole(cap) and cap >= 0):
        raise ValueError(f"cap must be a whole number, 0 or more, got {cap!r}")
    if not (_whole(hour) and 0 <= hour < HOURS_PER_DAY):
        raise ValueError(f"hour must be a whole number from 0 to 23, got {hour!r}")
    return cap * (hour + 1) // HOURS_PER_DAY - cap * hour // HOURS_PER_DAY


def day_of(now: float, utc_offset_hours: float = 0.0) -> datetime.date:
    """The warmup day a Unix timestamp belongs to.

    Days roll over at midnight UTC, or at midnight of the given offset from
    UTC (-12..+14 in practice; anything within a day is accepted), so that
    a plan can follow the receiving provider's day if it is known.
    """
    return _local_time(now, utc_offset_hours).date()


def hour_of(now: float, utc_offset_hours: float = 0.0) -> int:
    """The clock hour (0-23) a Unix timestamp belongs to, on the day ``day_of`` gives.

    Pass both the same offset: hour 0 is the first hour of that day.
    """
    return _local_time(now, utc_offset_hours).hour


def _local_time(now: float, utc_offset_hours: float) -> datetime.datetime:
    if not (math.isfinite(utc_offset_hours) and -24 < utc_offset_hours < 24):
        raise ValueError(
            f"utc_offset_hours must be less than a day either way, got {utc_offset_hours!r}"
        )
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    return moment + datetime.timedelta(hours=utc_offset_hours)
