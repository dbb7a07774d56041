"""Suspensions and throttles of egress paths, and when each ends.

A path is a (source, site) pair of names: one sending IP to one
destination site. A response rule (mta.policy.rules) or an operator can
suspend a path (send nothing on it until a time) or throttle it (scale its
rate and connection limits by a factor until a time). ``Throttles`` keeps
these per path and answers, for a given moment, what is in force.

- A suspension is extended by a later one that ends later, never shortened;
  only ``resume`` (the operator) lifts it early.
- Throttles that overlap are all kept: the strongest (lowest) factor in
  force wins, and when it ends a weaker one still running takes over.
- Everything expired is forgotten when ``state`` or ``active`` next looks
  at it, so memory is bounded by what is in force (plus what was added
  since the last look).
- A suspension remembers the ends it has had (``resume`` returns them): a
  job deferred by it was told to come back at one of them, so that is where
  the operator's resume finds the jobs to make due at once.

``to_json`` / ``from_json`` let the daemon keep suspensions across a
restart (an operator's suspension must survive one); times are then
absolute wall-clock seconds (time.time()), not a monotonic clock.

Pure (docs/architecture.md, invariant 7): the clock is an argument, nothing waits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]  # (source, site)

_FORMAT_VERSION = 1
# Overlapping throttles kept per path. Rules come with a handful of factors,
# so a real path has one or two; past this the two that end first are merged
# into one with the lower factor and the later end (stricter, never looser).
_MAX_THROTTLES = 8
# Ends kept per suspension. A suspension is extended by the replies of the
# deliveries in flight when it began, a few; jobs told an older end than
# these come back at that end, and wait again for the current one.
_MAX_ENDS = 8


@dataclass(frozen=True)
class Restriction:
    suspended_until: float = 0.0  # nothing is sent on this path before this time
    throttled_until: float = 0.0
    factor: float = 1.0  # applies while now < throttled_until
    reason: str = ""  # the rule name or "operator"


@dataclass(frozen=True)
class _Throttle:
    factor: float
    until: float
    reason: str


@dataclass
class _Path:
    suspended_until: float = -math.inf
    suspend_reason: str = ""
    ends: list[float] = field(default_factory=list)  # every suspended_until it had, ascending
    # Sorted by `until`; none dominates another (lower-or-equal factor and
    # later-or-equal end), so factors rise as ends get later.
    throttles: list[_Throttle] = field(default_factory=list)


def _check_key(key: Key) -> Key:
    if not (
        isinstance(key, tuple)
        and len(key) == 2
        and isinstance(key[0], str)
        and isinstance(key[1], str)
    ):
        raise ValueError(f"a path is a (source, site) pair of names, got {key!r}")
    return key


def _check_time(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a time in seconds, got {value!r}")
    return float(value)


def _check_factor(factor: float) -> float:
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise ValueError(f"a throttle factor must be above 0 and at most 1, got {factor!r}")
    return float(factor)


class Throttles:
    """What is suspended or throttled, per (source, site) path."""

    def __init__(self) -> None:
        self._paths: dict[Key, _Path] = {}

    def suspend(self, key: Key, until: float, reason: str) -> None:
        """Send nothing on `key` before `until`; a longer suspension in force stays."""
        path = self._paths.setdefault(_check_key(key), _Path())
        until = _check_time("until", until)
        if until > path.suspended_until:
            path.suspended_until = until
            path.suspend_reason = str(reason)
            path.ends = [*path.ends, until][-_MAX_ENDS:]

    def throttle(self, key: Key, factor: float, until: float, reason: str) -> None:
        """Scale `key`'s limits by `factor` (0 < factor <= 1) before `until`."""
        factor = _check_factor(factor)
        until = _check_time("until", until)
        path = self._paths.setdefault(_check_key(key), _Path())
        new = _Throttle(factor, until, str(reason))
        if any(t.factor <= new.factor and t.until >= new.until for t in path.throttles):
            return  # a stronger one lasts at least as long
        kept = [t for t in path.throttles if not (new.factor <= t.factor and new.until >= t.until)]
        kept.append(new)
        kept.sort(key=lambda t: t.until)
        while len(kept) > _MAX_THROTTLES:
            first, second = kept[0], kept[1]
            kept[:2] = [_Throttle(first.factor, second.until, first.reason)]
        path.throttles = kept

    def resume(self, key: Key) -> tuple[float, ...]:
        """Lift `key`'s suspension and throttles now (the operator's `policy resume`);
        the ends the suspension had, when the jobs it deferred were told to come back."""
        path = self._paths.pop(_check_key(key), None)
        return tuple(path.ends) if path is not None else ()

    def state(self, key: Key, now: float) -> Restriction:
        """What is in force on `key` at `now`; a path with nothing in force is forgotten."""
        restriction = self._in_force(key, now)
        return Restriction() if restriction is None else restriction

    def active(self, now: float) -> dict[Key, Restriction]:
        """Every path with something in force at `now` (`mta policy show`, the gauge)."""
        result: dict[Key, Restriction] = {}
        for key in list(self._paths):
            restriction = self._in_force(key, now)
            if restriction is not None:
                result[key] = restriction
        return result

    def is_suspended(self, key: Key, now: float) -> bool:
        if self._in_force(key, now) is None:
            return False
        return self._paths[key].suspended_until > now

    def factor(self, key: Key, now: float) -> float:
        """The factor on `key`'s limits at `now`: 1.0 when not throttled."""
        return self.state(key, now).factor

    def _in_force(self, key: Key, now: float) -> Restriction | None:
        path = self._paths.get(key)
        if path is None:
            return None
        restriction = _prune(path, now)
        if restriction is None:
            del self._paths[key]
        return restriction

    def to_json(self, now: float | None = None) -> str:
        """Everything kept, as JSON; with `now`, what has expired by then is left out."""
        paths = []
        for (source, site), path in sorted(self._paths.items()):
            suspended_until = path.suspended_until
            throttles = path.throttles
            if now is not None:
                if not suspended_until > now:
                    suspended_until = -math.inf
                throttles = [t for t in throttles if t.until > now]
            if suspended_until == -math.inf and not throttles:
                continue
            entry: dict[str, Any] = {"source": source, "site": site}
            if suspended_until != -math.inf:
                entry["suspended_until"] = suspended_until
                entry["suspend_reason"] = path.suspend_reason
                entry["ends"] = path.ends
            if throttles:
                entry["throttles"] = [
                    {"factor": t.factor, "until": t.until, "reason": t.reason} for t in throttles
                ]
            paths.append(entry)
        # An operator's open-ended suspension may be until=inf: Python's json
        # writes and reads it as Infinity.
        return json.dumps({"version": _FORMAT_VERSION, "paths": paths}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, now: float | None = None) -> Throttles:
        """Read what to_json wrote; with `now`, entries expired by then are dropped.

        ValueError with one sentence if the text is not such a document.
        """
        try:
            document = json.loads(text)
        except (ValueError, TypeError) as error:
            raise ValueError(f"suspension state is not valid JSON ({error})") from None
        throttles = cls()
        try:
            if document.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unknown version {document.get('version')!r}")
            for entry in document["paths"]:
                key = (entry["source"], entry["site"])
                if "suspended_until" in entry:
                    until = _check_time("suspended_until", entry["suspended_until"])
                    # Written before ends were kept: the end in force is the only one.
                    ends = {_check_time("ends", end) for end in entry.get("ends", [])}
                    if now is None or until > now:
                        for end in sorted(end for end in ends | {until} if end <= until):
                            throttles.suspend(key, end, entry["suspend_reason"])
                for item in entry.get("throttles", []):
                    until = _check_time("until", item["until"])
                    if now is None or until > now:
                        throttles.throttle(key, item["factor"], until, item["reason"])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"suspension state is not in the expected form: {detail}") from None
        return throttles


def _prune(path: _Path, now: float) -> Restriction | None:
    """Drop what has ended by `now` from `path`; return what is in force, None if nothing."""
    if not path.suspended_until > now:
        path.suspended_until = -math.inf
        path.suspend_reason = ""
        path.ends = []
    path.throttles = [t for t in path.throttles if t.until > now]
    suspended = path.suspended_until > now
    throttle = min(path.throttles, key=lambda t: (t.factor, -t.until), default=None)
    if throttle is None and not suspended:
        return None
    return Restriction(
        suspended_until=path.suspended_until if suspended else 0.0,
        throttled_until=throttle.until if throttle is not None else 0.0,
        factor=throttle.factor if throttle is not None else 1.0,
        reason=path.suspend_reason if suspended else throttle.reason if throttle else "",
    )
