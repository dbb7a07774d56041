"""Suspensions and throttles of egress paths, and when each ends.

A response rule (mta.policy.rules) or an operator can suspend (send nothing
until a time) or throttle (scale the rate and connection limits by a factor
until a time). ``Throttles`` keeps these per key and answers, for a given
moment, what is in force. A key is a (sender, site) pair of names, the
sender being what the rule's scope (mta.policy.rules.Scope) penalises:

- scope source: the source's name, ``("ip1", "gmail")``, its path to the site;
- scope domain: ``domain_key(d)``, ``("domain:example.com", "gmail")``, the
  mail of sending domain d (its DKIM d=, else its envelope sender's domain) on every path
  to the site;
- scope site: ``EVERY_SOURCE``, ``("*", "gmail")``, every source's path.

A delivery from source s of mail from domain d to site x is held by all three
of (s, x), (domain_key(d), x) and (EVERY_SOURCE, x): it waits if any is
suspended, and goes at the lowest factor of them. Source names cannot hold
":" or "*" (mta.config.label_name), so the three kinds never meet.

- A suspension is extended by a later one that ends later, never shortened;
  only ``resume`` (the operator) lifts it early.
- A suspension says whether the pool may send the path's mail from its other
  sources meanwhile (``failover``). One that may not (a provider's word on
  the address's reputation: moving the mail would be IP-hopping) keeps the
  mail on the path until it ends, even if a suspension that allows failing
  over outlasts it.
- Throttles that overlap are all kept: the strongest (lowest) factor in
  force wins, and when it ends a weaker one still running takes over.
- A throttle decided (``at``) while another is in force, at least
  ``COMPOUND_AFTER`` seconds after the strongest one in force began,
  compounds it: the factor in force times the new one, never below
  ``FLOOR``, for the new one's duration; then one level back up (divided by
  the new factor) for another duration, and so on up to 1. The steps are
  overlapping throttles like any others.
- Applying the same throttle decision (key, reason, at) again changes
  nothing: every node applies its own decisions at once and again when it
  reads them back from the fleet's stream (mta.cluster.throttle_log).
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
from dataclasses import dataclass, field, replace
from typing import Any

Key = tuple[str, str]  # (sender, site): a source name, domain_key(d) or EVERY_SOURCE

EVERY_SOURCE = "*"  # the sender of a key that holds every source (scope site)
_DOMAIN = "domain:"

# A throttle compounds one in force that began at least this long before it.
# The replies of the deliveries already under way when that one began arrive
# within seconds and say nothing of the slower sending since; a minute is past
# them, and still short next to any rule's duration.
COMPOUND_AFTER = 60.0
# The lowest factor compounding reaches, four halvings (50/s becomes about 3/s):
# slower than that a path hardly sends at all, and stopping it is a suspension's job.
FLOOR = 1 / 16

# Fields added since version 1 (held_until, since, applied) are optional, and
# older readers leave them out.
_FORMAT_VERSION = 1
# Overlapping throttles kept per key. A compounded x0.5 throttle steps back up
# through at most 4 levels (from FLOOR), which leaves room for another rule's;
# past this the two that end first are merged into one with the lower factor
# and the later end (stricter, never looser).
_MAX_THROTTLES = 8
# Ends kept per suspension. A suspension is extended by the replies of the
# deliveries in flight when it began, a few; jobs told an older end than
# these come back at that end, and wait again for the current one.
_MAX_ENDS = 8
# Throttle decisions remembered per key, so that applying one again changes
# nothing: a node reads its own back from the fleet's stream a second or so
# later, when the key has had at most a reply per delivery then under way.
_MAX_APPLIED = 64
# Steps a compounded throttle climbs back to 1 in, at most: half the entries
# kept per key, to leave room for other rules'. x0.5 from FLOOR takes 4; a
# rule whose factor is nearer 1 climbs several of its levels a step, so that
# no compounded throttle lasts more than this many of its durations.
_MAX_STEPS = _MAX_THROTTLES // 2
# How near a whole number of steps counts as it: a level that is 1 but for
# rounding is no step.
_ROUNDING = 1e-9


def domain_key(domain: str) -> str:
    """The sender part of the key for the mail of sending `domain` (scope domain)."""
    return _DOMAIN + domain.lower().rstrip(".")


def describe(sender: str) -> str:
    """A restriction's sender in words: a source's name, "every source", "mail of d"."""
    if sender == EVERY_SOURCE:
        return "every source"
    if sender.startswith(_DOMAIN):
        return f"mail of {sender.removeprefix(_DOMAIN)}"
    return sender


@dataclass(frozen=True)
class Restriction:
    suspended_until: float = 0.0  # nothing is sent on this path before this time
    throttled_until: float = 0.0  # when `factor` ends (a weaker step may follow)
    factor: float = 1.0  # applies while now < throttled_until
    reason: str = ""  # the rule name or "operator"
    # While suspended: whether the pool may send the path's mail from its other sources.
    failover: bool = False
    # (factor, until) of each throttle step from the one in force on, factors
    # rising; the last until is when the path is back to full speed.
    steps: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class _Throttle:
    factor: float
    until: float
    reason: str
    since: float = -math.inf  # when its decision was made; -inf when not known


_UNTHROTTLED = _Throttle(1.0, 0.0, "")  # what a path without throttles shows


@dataclass
class _Path:
    suspended_until: float = -math.inf
    suspend_reason: str = ""
    held_until: float = -math.inf  # the latest end of a suspension that may not fail over
    ends: list[float] = field(default_factory=list)  # every suspended_until it had, ascending
    # Sorted by `until`; none dominates another (lower-or-equal factor and
    # later-or-equal end), so factors rise as ends get later.
    throttles: list[_Throttle] = field(default_factory=list)
    # (reason, at) of each throttle decision applied -> when its last step ends.
    applied: dict[tuple[str, float], float] = field(default_factory=dict)


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


def _check_decided(at: float, until: float) -> float:
    at = _check_time("at", at)
    if not (math.isfinite(at) and at < until):
        raise ValueError(f"a throttle is decided at a finite time before it ends, got at={at!r}")
    return at


class Throttles:
    """What is suspended or throttled, per (sender, site) key."""

    def __init__(self) -> None:
        self._paths: dict[Key, _Path] = {}

    def suspend(self, key: Key, until: float, reason: str, failover: bool = False) -> None:
        """Send nothing on `key` before `until`; a longer suspension in force stays.

        Unless `failover`, the key's mail stays on it (is not sent from the pool's
        other sources) until `until`, whatever other suspensions allow.
        """
        path = self._paths.setdefault(_check_key(key), _Path())
        until = _check_time("until", until)
        if until > path.suspended_until:
            path.suspended_until = until
            path.suspend_reason = str(reason)
            path.ends = [*path.ends, until][-_MAX_ENDS:]
        if not failover:
            path.held_until = max(path.held_until, until)

    def throttle(
        self, key: Key, factor: float, until: float, reason: str, at: float | None = None
    ) -> None:
        """Scale `key`'s limits by `factor` (0 < factor <= 1; below FLOOR is FLOOR) before `until`.

        `at` is when the decision was made (the rule acted), before `until`: the
        throttle then compounds one in force (the module's docstring), and the same
        (reason, at) applied again changes nothing. Without it (a decision of an
        older node) the throttle is kept as it is.
        """
        factor, until = max(FLOOR, _check_factor(factor)), _check_time("until", until)
        if factor == 1:
            return  # it restricts nothing
        path = self._paths.setdefault(_check_key(key), _Path())
        if at is None:
            path.throttles = _added(path.throttles, [_Throttle(factor, until, str(reason))])
        else:
            _decide(path, factor, until, str(reason), _check_decided(at, until))

    def resume(self, key: Key) -> tuple[float, ...]:
        """Lift `key`'s suspension and throttles now (the operator's `policy resume`);
        the ends the suspension had, when the jobs it deferred were told to come back."""
        path = self._paths.pop(_check_key(key), None)
        return tuple(path.ends) if path is not None else ()

    def state(self, key: Key, now: float) -> Restriction:
        """What is in force on `key` at `now`; a key with nothing in force is forgotten."""
        restriction = self._in_force(key, now)
        return Restriction() if restriction is None else restriction

    def active(self, now: float) -> dict[Key, Restriction]:
        """Every key with something in force at `now` (`mta policy show`, the gauge)."""
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
        _forget_ended(path, now)
        restriction = _restriction(path, now)
        if restriction is None:
            del self._paths[key]
        return restriction

    def to_json(self, now: float | None = None) -> str:
        """Everything kept, as JSON; with `now`, what has expired by then is left out."""
        paths = []
        for (source, site), path in sorted(self._paths.items()):
            document = _document(path, now)
            if document:
                paths.append({"source": source, "site": site, **document})
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
                throttles._restore(entry, now)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"suspension state is not in the expected form: {detail}") from None
        return throttles

    def _restore(self, entry: dict[str, Any], now: float | None) -> None:
        """Take one path of a to_json document, less what has ended by `now`."""
        key = _check_key((entry["source"], entry["site"]))
        if "suspended_until" in entry:
            self._restore_suspension(key, entry, now)
        for item in entry.get("throttles", []):
            self._restore_throttle(key, item, now)
        for item in entry.get("applied", []):
            until = _check_time("until", item["until"])
            if now is None or until > now:
                decision = (str(item["reason"]), _check_time("at", item["at"]))
                self._paths.setdefault(key, _Path()).applied[decision] = until

    def _restore_throttle(self, key: Key, item: dict[str, Any], now: float | None) -> None:
        until = _check_time("until", item["until"])
        if now is not None and not until > now:
            return
        factor = max(FLOOR, _check_factor(item["factor"]))
        # Written before since was kept: begun long ago, as far as compounding goes.
        since = _check_time("since", item.get("since", -math.inf))
        path = self._paths.setdefault(key, _Path())
        path.throttles = _added(
            path.throttles, [_Throttle(factor, until, str(item["reason"]), since)]
        )

    def _restore_suspension(self, key: Key, entry: dict[str, Any], now: float | None) -> None:
        until = _check_time("suspended_until", entry["suspended_until"])
        if now is not None and not until > now:
            return
        # Written before ends were kept: the end in force is the only one.
        ends = {_check_time("ends", end) for end in entry.get("ends", [])}
        for end in sorted(end for end in ends | {until} if end <= until):
            self.suspend(key, end, entry["suspend_reason"], failover=True)
        # Written before failover was kept, every suspension failed over.
        if "held_until" in entry:
            held = _check_time("held_until", entry["held_until"])
            self.suspend(key, held, entry["suspend_reason"], failover=False)


def _decide(path: _Path, factor: float, until: float, reason: str, at: float) -> None:
    """Apply the throttle decided at `at` to `path`, unless it already was."""
    decision = (reason, at)
    if decision in path.applied:
        return
    steps = _steps(path.throttles, factor, until, reason, at)
    path.throttles = _added(path.throttles, steps)
    if len(path.applied) >= _MAX_APPLIED:
        del path.applied[min(path.applied, key=lambda applied: applied[1])]
    path.applied[decision] = steps[-1].until


def _steps(
    throttles: list[_Throttle], factor: float, until: float, reason: str, at: float
) -> list[_Throttle]:
    """What a throttle decided at `at` adds: itself; or, when it compounds the
    strongest in force, the compounded level and each level back up to 1 (the
    level divided by `factor`, or by a power of it past _MAX_STEPS), each
    lasting the decision's duration."""
    base = _strongest(throttles, at)
    if base is None or at - base.since < COMPOUND_AFTER:
        return [_Throttle(factor, until, reason, at)]
    lowest = max(FLOOR, base.factor * factor)
    levels = math.ceil(math.log(lowest) / math.log(factor) - _ROUNDING)
    stride = math.ceil(levels / _MAX_STEPS)
    return [
        _Throttle(lowest / factor**level, at + (until - at) * (level // stride + 1), reason, at)
        for level in range(0, levels, stride)
    ]


def _strongest(throttles: list[_Throttle], at: float) -> _Throttle | None:
    """The lowest throttle in force at `at`, the latest begun of equals; None if none."""
    in_force = [t for t in throttles if t.since <= at < t.until]
    return min(in_force, key=lambda t: (t.factor, -t.since), default=None)


def _added(throttles: list[_Throttle], new: list[_Throttle]) -> list[_Throttle]:
    """`throttles` with `new` added, less what another covers, at most _MAX_THROTTLES."""
    for throttle in new:
        if any(_covers(kept, throttle) for kept in throttles):
            continue  # a stronger one lasts at least as long
        covered = [kept for kept in throttles if _covers(throttle, kept)]
        began = [kept.since for kept in covered if _goes_on(kept, throttle)]
        throttle = replace(throttle, since=min([throttle.since, *began]))
        throttles = [kept for kept in throttles if not _covers(throttle, kept)]
        throttles = sorted([*throttles, throttle], key=lambda kept: kept.until)
    while len(throttles) > _MAX_THROTTLES:
        first, second, *rest = throttles
        throttles = [replace(first, until=second.until), *rest]
    return throttles


def _covers(stronger: _Throttle, other: _Throttle) -> bool:
    return stronger.factor <= other.factor and stronger.until >= other.until


def _goes_on(earlier: _Throttle, later: _Throttle) -> bool:
    """Whether `later` prolongs `earlier`'s level (the replies of deliveries under way
    when it began), so that level began when `earlier` did."""
    return earlier.factor == later.factor and earlier.since <= later.since < earlier.until


def _forget_ended(path: _Path, now: float) -> None:
    """Drop what has ended by `now` from `path`."""
    if not path.suspended_until > now:
        path.suspended_until = path.held_until = -math.inf
        path.suspend_reason = ""
        path.ends = []
    path.throttles = [t for t in path.throttles if t.until > now]
    path.applied = {d: until for d, until in path.applied.items() if until > now}


def _restriction(path: _Path, now: float) -> Restriction | None:
    """What is in force on `path` at `now` (its ended parts forgotten); None if nothing."""
    suspended = path.suspended_until > now
    if not (suspended or path.throttles):
        return None
    strongest = path.throttles[0] if path.throttles else _UNTHROTTLED
    return Restriction(
        suspended_until=path.suspended_until if suspended else 0.0,
        throttled_until=strongest.until,
        factor=strongest.factor,
        reason=path.suspend_reason if suspended else strongest.reason,
        failover=suspended and not path.held_until > now,
        steps=tuple((t.factor, t.until) for t in path.throttles),
    )


def _document(path: _Path, now: float | None) -> dict[str, Any]:
    """What to_json keeps of `path`: with `now`, less what has ended by then."""

    def kept(until: float) -> bool:
        return until != -math.inf and (now is None or until > now)

    document: dict[str, Any] = {}
    if kept(path.suspended_until):
        document["suspended_until"] = path.suspended_until
        document["suspend_reason"] = path.suspend_reason
        document["ends"] = path.ends
        if kept(path.held_until):
            document["held_until"] = path.held_until
    throttles = [_throttle_document(t) for t in path.throttles if kept(t.until)]
    if not (document or throttles):
        return {}
    if throttles:
        document["throttles"] = throttles
    applied = [
        {"reason": reason, "at": at, "until": until}
        for (reason, at), until in sorted(path.applied.items())
        if kept(until)
    ]
    if applied:
        document["applied"] = applied
    return document


def _throttle_document(throttle: _Throttle) -> dict[str, Any]:
    document = {"factor": throttle.factor, "until": throttle.until, "reason": throttle.reason}
    return document if throttle.since == -math.inf else {**document, "since": throttle.since}
