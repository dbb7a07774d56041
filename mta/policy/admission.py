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

Per warmup counter (a source's hour with one provider, mta.outbound.warmup_counts):

- *sent*: the recipients delivered that day, per node (each node's own count,
  from its spool, so a store that lost them gets them back whole);
- *reserved*: what deliveries under way may still deliver, per reservation,
  with an expiry like a lease. A candidate on a warmup plan reserves the
  recipients it is about to send, or what is left of the day's cap if that
  is fewer; ``sent + reserved`` never exceeds the cap, so deliveries at once
  on any worker or node cannot overshoot it. ``settle`` turns a reservation
  into the count after the delivery is recorded.

Pure: the time is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Below this many seconds a wait is float noise, not a rate: wall-clock times
# near 1.7e9 resolve to about 2.4e-7 s.
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Warmup:
    """The warmup cap (an hour's share of the day's) a candidate counts against, and the
    recipients it would send."""

    counter: str  # the source's hour with the provider (warmup_counts.counter)
    cap: int
    wanted: int


@dataclass(frozen=True)
class Ask:
    """One candidate path and its limits (``None``: unlimited)."""

    path: str
    max_connections: int | None = None
    interval: float | None = None  # seconds per message: 1 / max_rate
    burst: int = 1
    takes_slot: bool = True  # False: over a connection already leased
    warmup: Warmup | None = None


@dataclass
class PathState:
    leases: dict[str, float] = field(default_factory=dict)  # lease -> when it expires
    tat: float | None = None  # None: no message yet (or long enough ago)


@dataclass
class CountState:
    sent: dict[str, int] = field(default_factory=dict)  # node -> recipients delivered
    reserved: dict[str, tuple[int, float]] = field(default_factory=dict)  # -> (n, expiry)


@dataclass(frozen=True)
class Granted:
    index: int  # which of the asks got the lease
    reserved: int = 0  # recipients it may deliver under its warmup cap
    left: int | None = None  # what the cap leaves after this reservation (None: no cap)


@dataclass(frozen=True)
class Refused:
    """No candidate is free. ``retry_in``: seconds until a rate budget frees,
    ``None`` when only a connection slot (a release) can help. ``full``: the
    candidates whose warmup cap is used up by what was sent (not by
    reservations, which may come back): none of them may send that day."""

    retry_in: float | None
    full: tuple[int, ...] = ()


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


def warmup_room(count: CountState, cap: int, now: float) -> int:
    """What a warmup cap leaves now: the cap less what was sent and what is reserved."""
    for reservation in [r for r, (_, expiry) in count.reserved.items() if expiry <= now]:
        del count.reserved[reservation]
    return cap - sum(count.sent.values()) - sum(n for n, _ in count.reserved.values())


def admit(
    states: Sequence[PathState],
    asks: Sequence[Ask],
    lease: str,
    now: float,
    ttl: float,
    counts: Sequence[CountState | None] = (),
) -> Granted | Refused:
    """Lease the first of ``asks`` (with its ``states``, and ``counts`` for the asks
    with a warmup cap) that is free; update its state. ``lease`` names the
    warmup reservation too."""
    waits, full = [], []
    counts = counts or [None] * len(asks)
    for index, (state, count, ask) in enumerate(zip(states, counts, asks, strict=True)):
        prune(state, now)
        cap_left = None
        if ask.warmup is not None:
            assert count is not None, "a warmup ask needs its counter's state"
            cap_left = warmup_room(count, ask.warmup.cap, now)
            if cap_left <= 0:
                if sum(count.sent.values()) >= ask.warmup.cap:
                    full.append(index)
                continue
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
        if ask.warmup is None or cap_left is None or count is None:
            return Granted(index)
        reserved = min(ask.warmup.wanted, cap_left)
        count.reserved[lease] = (reserved, now + ttl)
        return Granted(index, reserved, cap_left - reserved)
    return Refused(min(waits, default=None), tuple(full))


def settle(count: CountState, node: str, sent: int, reservation: str | None) -> None:
    """The node has ``sent`` in all on the counter (its spool's count, after the
    delivery's commit): take it, and void the reservation it was made under.
    A count never goes down: a late, older count changes nothing."""
    count.sent[node] = max(count.sent.get(node, 0), sent)
    if reservation is not None:
        count.reserved.pop(reservation, None)


def renew_reservation(
    count: CountState, reservation: str, recipients: int, now: float, ttl: float
) -> None:
    """Push a reservation's expiry to ``now + ttl``, writing it back if it was lost."""
    count.reserved[reservation] = (recipients, now + ttl)


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
