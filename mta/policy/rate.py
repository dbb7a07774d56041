"""How fast one egress path may send: a smooth rate with a bounded burst.

``RateLimiter`` is the generic cell rate algorithm (GCRA, "virtual
scheduling"): it keeps one number, the theoretical arrival time (TAT) at
which the next message would be due if messages went out exactly evenly.
A message may go when ``now`` is no more than ``(burst - 1)`` intervals
before that time. So at rate r and burst b, any window of length T sees at
most ``b + T * r`` messages: sends are spread out, never a fixed window's
worth at once followed by silence, and an idle path earns no credit beyond
``burst``.

``parse_rate`` reads the configuration's "10/s", "600/min", "20000/hour".

Pure (docs/architecture.md, invariant 7): the clock is an argument of every call; the
limiter says how long to wait and never waits itself.
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
# ASCII digits only (\d would accept other scripts' digits); the sign is
# matched so that "-5/s" gets the "more than zero" message, not "not a rate".
_RATE = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*/\s*([A-Za-z]+)\s*")
_EXAMPLES = '"10/s", "600/min", "20000/hour" or "1/day"'


def parse_rate(text: str) -> float:
    """Messages per second from "10/s", "600/min", "20000/hour", "1/day".

    Units: s, sec, second; min, minute; h, hr, hour; d, day (plurals too,
    any case). The count may have a fraction ("0.5/s"). Anything else, and
    a rate of zero or less, raises ValueError with one sentence.
    """
    found = _RATE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(found.group(2).lower()) if found is not None else None
    if found is None or unit is None:
        raise ValueError(f"expected a rate such as {_EXAMPLES}, got {text!r}")
    count = float(found.group(1))
    if not (math.isfinite(count) and count > 0):
        raise ValueError(f"a rate must be more than zero messages, got {text!r}")
    return count / unit


def _check_rate(per_second: float) -> float:
    if isinstance(per_second, bool) or not isinstance(per_second, int | float):
        raise ValueError(f"a rate must be a number of messages per second, got {per_second!r}")
    if not (math.isfinite(per_second) and per_second > 0):
        raise ValueError(f"a rate must be a finite number above zero, got {per_second!r}")
    return float(per_second)


class RateLimiter:
    """At most ``per_second`` messages a second on average, at most ``burst`` at once.

    Callers ask ``wait(now)``; when it is 0.0 they send and call ``take(now)``.
    ``wait`` answers 0.0 for a message that is due within a few float ulps,
    so a caller that sleeps exactly ``wait(now)`` and asks again is let
    through rather than told to wait 1e-16 s.
    """

    def __init__(self, per_second: float, burst: int = 1) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a whole number of messages, 1 or more, got {burst!r}")
        self._interval = 1.0 / _check_rate(per_second)
        self._burst = burst
        # The theoretical arrival time (TAT) of the next message at an even
        # pace is _base + _debt: _base is when the path last went from idle
        # to busy (or its rate changed), _debt the intervals of the messages
        # taken since. Kept apart because at wall-clock magnitudes (1.7e9) a
        # float resolves only 2.4e-7 s, and adding intervals to such a number
        # drifts; small sums of intervals stay exact enough. None: nothing
        # sent yet, so the first `burst` messages may go at once.
        self._base: float | None = None
        self._debt = 0.0

    @property
    def per_second(self) -> float:
        return 1.0 / self._interval

    @property
    def burst(self) -> int:
        return self._burst

    def wait(self, now: float) -> float:
        """Seconds until one more message may go (0.0: now). Does not consume."""
        if self._base is None:
            return 0.0
        delay = (self._base - now) + (self._debt - (self._burst - 1) * self._interval)
        if delay <= _tolerance(now, self._base, self._debt):
            return 0.0
        return delay

    def take(self, now: float) -> None:
        """Record one message sent at `now` (after wait(now) said 0.0)."""
        if self._base is None or self._debt <= now - self._base:  # TAT <= now: idle
            self._base, self._debt = now, self._interval
        else:
            self._debt += self._interval

    def set_rate(self, per_second: float, now: float) -> None:
        """Change the rate from `now` on (throttling, and back) without a burst.

        The messages the limiter is still "in debt" for (TAT - now, in
        intervals) are kept as a count and paid off at the new rate. So a
        lower rate slows the very next message down, and a higher one never
        lets more than `burst` go at once: the change itself grants no credit.
        """
        interval = 1.0 / _check_rate(per_second)
        if interval == self._interval:
            return
        if self._base is not None:
            owed = (self._base - now) + self._debt  # TAT - now
            if owed > 0:
                self._base, self._debt = now, owed * (interval / self._interval)
        self._interval = interval


def _tolerance(now: float, base: float, debt: float) -> float:
    # A few ulps of the numbers involved: wall-clock times around 1.7e9 have
    # an ulp of about 2.4e-7 s, monotonic clocks and sums of intervals far less.
    return 4 * (math.ulp(max(abs(now), abs(base), 1.0)) + math.ulp(debt))
