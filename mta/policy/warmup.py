"""IP warmup: how many messages a new source may send to one provider per day.

A new sending IP has no reputation, and the big providers defer or junk
mail from an IP that starts at full volume. A ``WarmupPlan`` starts low
(``first_day`` messages per day per provider on day 1) and multiplies the
cap by ``factor`` each day. Either ``cap`` holds it at a ceiling for good,
or, without a cap, the plan ends when the daily cap would reach ``until``:
the source is warmed up and has no daily limit any more.

Days are calendar days (midnight UTC by default, see ``day_of``); the
caller keeps its sent counters per (source, provider, day), so a new day
starts from zero by itself.

Pure (docs/architecture.md, invariant 7): dates and timestamps are arguments.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class WarmupPlan:
    start: datetime.date  # day 1 of the plan
    first_day: int = 500  # messages per day per provider on day 1
    factor: float = 2.0  # each day's cap is factor times the previous
    cap: int | None = None  # the daily cap never exceeds this (and the plan never ends)
    until: int = 1_000_000  # without a cap: once the daily cap would reach this, no cap any more

    def __post_init__(self) -> None:
        # Phrased "x must be ..., got ..." so a config loader can put the
        # key's place in front and show it as is.
        if not isinstance(self.start, datetime.date) or isinstance(self.start, datetime.datetime):
            raise ValueError(f"start must be a date such as 2026-11-25, got {self.start!r}")
        if not (_whole(self.first_day) and self.first_day > 0):
            raise ValueError(f"first_day must be a whole number above 0, got {self.first_day!r}")
        factor = self.factor
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ValueError(f"factor must be a number, 1 or more, got {factor!r}")
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"factor must be a number, 1 or more, got {factor!r}")
        if self.cap is not None and not (_whole(self.cap) and self.cap >= self.first_day):
            raise ValueError(
                f"cap must be a whole number, at least first_day ({self.first_day}), "
                f"got {self.cap!r}"
            )
        if not (_whole(self.until) and self.until > self.first_day):
            raise ValueError(
                f"until must be a whole number above first_day ({self.first_day}), "
                f"got {self.until!r}"
            )


def daily_cap(plan: WarmupPlan, day: datetime.date) -> int | None:
    """Messages per provider allowed on `day`; None: no limit (warmed up).

    Day 1 (plan.start) is first_day, day n is first_day * factor ** (n - 1),
    rounded down, held at plan.cap if there is one. Without a cap, the day
    this would reach plan.until and every later day have no limit. A day
    before the start gets first_day: a source used early is still cold.
    """
    steps = max((day - plan.start).days, 0)
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


def remaining(plan: WarmupPlan, day: datetime.date, sent_today: int) -> int | None:
    """How many more messages may go to the provider on `day`; None: unlimited.

    Never negative: a source that went over its cap (a cap lowered in the
    config, counters from before a restart) has 0 left, not a debt.
    """
    if isinstance(sent_today, bool) or not isinstance(sent_today, int) or sent_today < 0:
        raise ValueError(f"sent_today must be a whole number, 0 or more, got {sent_today!r}")
    cap = daily_cap(plan, day)
    if cap is None:
        return None
    return max(cap - sent_today, 0)


def day_of(now: float, utc_offset_hours: float = 0.0) -> datetime.date:
    """The warmup day a Unix timestamp belongs to.

    Days roll over at midnight UTC, or at midnight of the given offset from
    UTC (-12..+14 in practice; anything within a day is accepted), so that
    a plan can follow the receiving provider's day if it is known.
    """
    if not (math.isfinite(utc_offset_hours) and -24 < utc_offset_hours < 24):
        raise ValueError(
            f"utc_offset_hours must be less than a day either way, got {utc_offset_hours!r}"
        )
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    return (moment + datetime.timedelta(hours=utc_offset_hours)).date()
