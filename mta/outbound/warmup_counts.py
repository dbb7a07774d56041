"""Warmup in the spool: the counter a delivery counts against, and the days that do not count.

A source on a warmup plan (mta.policy.warmup) sends each provider at most
the day's cap, spread over the day: each clock hour may take its share of
the cap (``hour_share``), so one counter per (source, provider, hour) whose
cap is that share keeps both the hour and the day within bounds, and the
shared limits (mta.cluster) hold it exact across workers and nodes.

A day on which a provider held a source back for its reputation (a response
rule classified "reputation" or "spam_block" suspended or throttled it)
does not count towards the plan: ``hold`` notes the day in the spool, in
the commit that stores the suspension, and the next day's cap is worked
out without it. Today's cap never changes once the day has begun.

Counters and held days older than ``KEEP_DAYS`` are forgotten (``forget_old``).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass

import lmdb

from mta.config import WarmupConfig
from mta.policy.warmup import cap_tomorrow, daily_cap, day_of, hour_of, hour_share, plan_day
from mta.spool.store import Spool

HELD = "warmup-held"  # the spool policy-state name of the held days
PREFIX = "warmup\0"
KEEP_DAYS = 400  # held days stay long enough to count any plan's days; counts a little over a day


def counter(source: str, provider: str, day: datetime.date, hour: int) -> str:
    return f"{PREFIX}{source}\0{provider}\0{day.isoformat()}T{hour:02d}"


def day_counters(source: str, provider: str, day: datetime.date) -> list[str]:
    """The 24 counters of a day: their sum is what the source sent the provider that day."""
    return [counter(source, provider, day, hour) for hour in range(24)]


def held_days(spool: Spool, txn: lmdb.Transaction, source: str, provider: str) -> frozenset:
    """The days ``source`` was held back by ``provider`` for its reputation."""
    return frozenset(
        datetime.date.fromisoformat(day)
        for day in _load(spool, txn).get(_key(source, provider), [])
    )


def hold(
    spool: Spool, txn: lmdb.Transaction, held: Iterable[tuple[str, str]], day: datetime.date
) -> None:
    """Note that each (source, provider) of ``held`` was held back on ``day``."""
    table = _load(spool, txn)
    changed = False
    for source, provider in held:
        days = table.setdefault(_key(source, provider), [])
        if day.isoformat() not in days:
            days.append(day.isoformat())
            days.sort()
            changed = True
    if changed:
        spool.set_state(txn, HELD, json.dumps(table, sort_keys=True).encode())


def forget_old(spool: Spool, txn: lmdb.Transaction, today: datetime.date) -> None:
    """Drop hourly counters from before yesterday and held days older than KEEP_DAYS."""
    spool.delete_states(
        txn, PREFIX, lambda name: _counter_day(name) < today - datetime.timedelta(1)
    )
    oldest = (today - datetime.timedelta(KEEP_DAYS)).isoformat()
    table = _load(spool, txn)
    kept = {key: [d for d in days if d >= oldest] for key, days in table.items()}
    kept = {key: days for key, days in kept.items() if days}
    if kept != table:
        spool.set_state(txn, HELD, json.dumps(kept, sort_keys=True).encode())


def _counter_day(name: str) -> datetime.date:
    return datetime.date.fromisoformat(name.rpartition("\0")[2][:10])


def _key(source: str, provider: str) -> str:
    return f"{source}\0{provider}"


def _load(spool: Spool, txn: lmdb.Transaction) -> dict[str, list[str]]:
    raw = spool.state(txn, HELD)
    return json.loads(raw) if raw else {}


# --- what a source may send now, and what `mta policy show` prints ---


@dataclass(frozen=True)
class PlanToday:
    """Where a source's plan with one provider is today."""

    day: int  # of the plan, not counting the days held back
    cap: int | None  # today's; None: warmed up
    cap_tomorrow: int | None  # if today counts
    held_days: int


def plan_today(
    spool: Spool,
    txn: lmdb.Transaction,
    warmup: WarmupConfig,
    source: str,
    provider: str,
    now: float,
) -> PlanToday:
    plan = warmup.plan_for(provider)
    today = day_of(now)
    held = held_days(spool, txn, source, provider)
    return PlanToday(
        plan_day(plan, today, held),
        daily_cap(plan, today, held),
        cap_tomorrow(plan, today, held),
        len(held),
    )


def hour_counter(source: str, provider: str, cap: int, now: float) -> tuple[str, int]:
    """The counter of the hour ``now`` is in, and the part of ``cap`` it may take."""
    hour = hour_of(now)
    return counter(source, provider, day_of(now), hour), hour_share(cap, hour)


def sent_today(spool: Spool, txn: lmdb.Transaction, source: str, provider: str, now: float) -> int:
    """What ``source`` sent ``provider`` today (this node's count)."""
    return sum(spool.counter(txn, name) for name in day_counters(source, provider, day_of(now)))
