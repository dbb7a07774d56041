"""Whether a delivery may start on an egress path now: connection leases and the rate.

The one model of the traffic-policy state that the node's workers (and, with
``[cluster] redis``, the fleet's nodes) share. Each store keeps the same
state per path and makes the same decision; this module is that decision in
plain Python, which the node-local store runs as it is and the Redis store's
script is checked against (tests/integration/test_redis_limits.py).

Per path:

- *leases*: one per delivery under way, with an expiry. A holder renews its
  leases while it delivers; the leases of a process or node that died expire
  by themselves, so its connection slots come back without anyone cleaning up.
  At most ``max_connections`` unexpired leases at once.
- *tat*: the theoretical arrival time of the Generic Cell Rate Algorithm
  (GCRA): the time the next message is due at an even pace. A message may go
  when ``now >= tat - (burst - 1) * interval``, and moves ``tat`` on by one
  interval, so no window of length T holds more than ``burst + T / interval``
  messages. One number per path, so it is cheap to share.

``admit`` takes the candidate paths of a delivery in order of preference (the
pool's sources for the site) and takes a lease on the first one that has a
free connection slot and rate budget: one decision, so a store needs one round
trip for it. A candidate that would reuse an open connection (which holds its
lease already) takes no new lease (``takes_slot=False``): it may go on while
the path is not over its limit, so that a path above its limit (a throttle
lowered it, or Redis went away and the node's share is smaller) sheds
connections as they come back from use.

Pure: the time is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Below this many seconds a wait is float noise, not a rate: wall-clock times
# near 1.7e9 resolve to about 2.4e-7 s.
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Ask:
    """One candidate path and its limits (``None``: unlimited)."""

    path: str
    max_connections: int | None = None
    interval: float | None = None  # seconds per message: 1 / max_rate
    burst: int = 1
    takes_slot: bool = True  # False: over a connection already leased


@dataclass
class PathState:
    leases: dict[str, float] = field(default_factory=dict)  # lease -> when it expires
    tat: float | None = None  # None: no message yet (or long enough ago)


@dataclass(frozen=True)
class Granted:
    index: int  # which of the asks got the lease


@dataclass(frozen=True)
class Refused:
    """No candidate is free. ``retry_in``: seconds until a rate budget frees,
    ``None`` when only a connection slot (a release) can help."""

    retry_in: float | None


def prune(state: PathState, now: float) -> None:
    """Forget leases that expired (their holder died, or stopped renewing)."""
    for lease in [lease for lease, expiry in state.leases.items() if expiry <= now]:
        del state.leases[lease]


def rate_wait(state: PathState, ask: Ask, now: float) -> float:
    """Seconds until the path's rate lets one more message go (0.0: now)."""
    if ask.interval is None or state.tat is None:
        return 0.0
    wait = state.tat - (ask.burst - 1) * ask.interval - now
    return wait if wait > TOLERANCE else 0.0


def admit(
    states: Sequence[PathState], asks: Sequence[Ask], lease: str, now: float, ttl: float
) -> Granted | Refused:
    """Lease the first of ``asks`` (with its ``states``) that is free; update its state."""
    waits = []
    for index, (state, ask) in enumerate(zip(states, asks, strict=True)):
        prune(state, now)
        if ask.max_connections is not None:
            room = ask.max_connections - len(state.leases)
            if room < (1 if ask.takes_slot else 0):
                continue
        wait = rate_wait(state, ask, now)
        if wait > 0:
            waits.append(wait)
            continue
        if ask.takes_slot:
            state.leases[lease] = now + ttl
        if ask.interval is not None:
            state.tat = max(state.tat or now, now) + ask.interval
        return Granted(index)
    return Refused(min(waits, default=None))


def renew(state: PathState, lease: str, now: float, ttl: float) -> bool:
    """Push a live lease's expiry to ``now + ttl``; False if it had already expired."""
    if state.leases.get(lease, now) <= now:
        state.leases.pop(lease, None)
        return False
    state.leases[lease] = now + ttl
    return True


def release(state: PathState, lease: str) -> None:
    state.leases.pop(lease, None)


def share(limit: int, rank: int, nodes: int) -> int:
    """This node's part of a connection limit while the fleet cannot coordinate.

    The parts of the ``nodes`` nodes (ranks 0..nodes-1) add up to ``limit``
    exactly: never more in all, even when that leaves a node none.
    """
    return limit // nodes + (1 if rank < limit % nodes else 0)
