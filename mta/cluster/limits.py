"""Connection leases and rates per egress path, shared by the node or the fleet.

``SharedLimits`` is what egress asks before a delivery starts. Without
``[cluster] redis`` it decides in the node's file (mta.cluster.local_limits),
shared by every worker; with it, in Redis (mta.cluster.redis_limits), shared
by every node that names the same server.

While Redis is away (down, or slower than ``redis_timeout``), the node decides
in its own file on its share of each limit: the connection limit split
between the nodes last seen alive so that the shares add up to the limit,
and the rate divided by their number. It tries Redis again a second later,
and logs once when it goes and once when it comes back. Accepting mail never
waits on any of this. The nodes last seen alive are remembered beside the
spool, so a node that starts while Redis is away takes its share, not the
whole limit.

Every lease is renewed while its connection is open (``run``), so the leases
of a process or node that died expire within ``LEASE_SECONDS``.

What a node holds is counted wherever a decision is made. The node's file
always holds every lease of all its workers (a lease Redis grants is written
there too: one write per new connection, as a reused one holds its lease), so a
node deciding there while Redis is away counts them all; and before a node
decides in Redis again after Redis was away, or after Redis restarted empty
(its epoch key is gone or new), it writes its whole file back to Redis; after
an empty restart Redis grants nothing until every node has had the time to. While
Redis is away, a rate starts afresh on each node's share, so the first moments
of a change may let a burst through (the fallback's margin).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mta.cluster import redis_client
from mta.cluster.local_limits import LocalLimits, local_limits_dir
from mta.cluster.redis_limits import EpochChanged, RedisLimits
from mta.cluster.throttle_log import Decision, ThrottleLog
from mta.config import ClusterConfig
from mta.observe import metrics
from mta.policy.admission import Ask, Granted, Refused, share

log = logging.getLogger("mta.cluster")
T = TypeVar("T")

LEASE_SECONDS = 15.0  # a dead holder's slots come back within this
RENEW_SECONDS = 1.0  # leases are renewed (and Redis's epoch checked) this often
ALIVE_SECONDS = 30.0  # a node silent this long no longer counts for the shares
RETRY_SECONDS = 1.0  # after a Redis failure, decide locally this long
NODES_FILE = "fleet-nodes.json"  # beside the spool: the nodes last seen alive


class WarmupCounts(Protocol):
    """The node's warmup counts in its spool: the named ones, or all of the day."""

    def __call__(self, names: Collection[str] | None = None) -> dict[str, int]: ...


@dataclass(frozen=True)
class Holding:
    """A granted lease, and which ask got it."""

    ask: Ask
    lease: str


@dataclass(frozen=True)
class Reservation:
    """Recipients a delivery may send under its source's warmup cap; ``settle`` it
    once the delivery is recorded."""

    counter: str
    name: str
    recipients: int


@dataclass(frozen=True)
class Admitted:
    index: int  # which ask was granted
    holding: Holding | None  # None: no new lease (a reused connection, or no limits)
    reservation: Reservation | None = None  # None: no warmup cap
    left: int | None = None  # what the cap leaves after this reservation


class SharedLimits:
    def __init__(
        self,
        node: str,
        local: LocalLimits,
        remote: RedisLimits | None = None,
        timeout: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        counts: WarmupCounts = lambda names=None: {},
        nodes_file: Path | None = None,
    ) -> None:
        """``counts``: the node's warmup counts in its spool (the current day's, or
        the ones named); ``nodes_file``: where the nodes last seen alive are remembered."""
        self.node = node
        self.local = local
        self.remote = remote
        self.counts = counts
        self.throttle_log = ThrottleLog(remote.client) if remote is not None else None
        self.timeout = timeout
        self.clock = clock
        self.nodes_file = nodes_file
        self.nodes = _recall_nodes(nodes_file, node)  # the nodes last seen alive, sorted
        self._away_until = float("-inf")
        self._held: dict[str, Holding] = {}
        self._reserved: dict[str, Reservation] = {}
        self._tell_redis_all = True  # write the node's file to Redis before deciding there
        self._tasks: set[asyncio.Task[None]] = set()  # writes to Redis in the background
        # Leases asked for when Redis did not answer in time: the script may
        # still have granted them when Redis woke up, to a holder that gave up.
        self._unanswered: list[tuple[list[str], str]] = []
        self._names = (f"{node}.{os.getpid()}.{n}" for n in itertools.count())
        # What a Redis that is away raises (redis-py's names only with Redis:
        # mta.cluster.redis_client); nothing is asked of Redis without it.
        self._trouble: tuple[type[BaseException], ...] = (
            (TimeoutError, OSError, redis_client.redis_error(), EpochChanged) if remote else ()
        )
        metrics.CLUSTER_REDIS_UP.set(1 if remote else 0)

    @property
    def shared_with(self) -> list[str]:
        """The nodes this node's limits are shared with (itself included)."""
        return self.nodes if self.remote else [self.node]

    async def admit(self, asks: Sequence[Ask]) -> Admitted | Refused:
        """The first free candidate (with its new lease), or how long until one may be."""
        if all(ask.max_connections is None and ask.interval is None for ask in asks) and all(
            ask.warmup is None for ask in asks
        ):
            return Admitted(0, None)  # nothing to count: no store is asked
        lease = next(self._names)
        result = await self._admit_remote(asks, lease)
        if result is None:
            result = self._admit_here(asks, lease)
        elif isinstance(result, Granted) and asks[result.index].takes_slot:
            self.local.renew([(asks[result.index].path, lease)])
        if isinstance(result, Refused):
            return result
        ask = asks[result.index]
        reservation = None
        if ask.warmup is not None:
            reservation = Reservation(ask.warmup.counter, lease, result.reserved)
            self._reserved[lease] = reservation
        holding = None
        if ask.takes_slot:
            holding = Holding(ask, lease)
            self._held[lease] = holding
        return Admitted(result.index, holding, reservation, result.left)

    def _admit_here(self, asks: Sequence[Ask], lease: str) -> Granted | Refused:
        """Decide in the node's file: alone, or on the node's share while Redis is away."""
        if self.remote is None:
            return self.local.admit(asks, lease, self._sent)
        # The fleet's warmup counts are out of reach: those sources wait.
        shares = [(i, self._fallback(ask)) for i, ask in enumerate(asks) if ask.warmup is None]
        if not shares:
            return Refused(RETRY_SECONDS)
        result = self.local.admit([ask for _, ask in shares], lease)
        if isinstance(result, Refused):
            return result
        return replace(result, index=shares[result.index][0])

    def _sent(self, counter: str) -> int:
        return self.counts([counter]).get(counter, 0)

    def settle(self, reservation: Reservation) -> None:
        """The delivery made under ``reservation`` is recorded in the spool: its
        recipients count now, in the node's file or (in the background) in Redis."""
        self._reserved.pop(reservation.name, None)
        if self.remote is None:
            self.local.settle(reservation.counter, reservation.name)
            return
        count = self._sent(reservation.counter)
        self._background(self._settle_remote(reservation.counter, count, reservation.name))

    async def _settle_remote(self, counter: str, count: int, reservation: str) -> None:
        if self._away():
            return  # written back with every count when Redis is back
        try:
            await self._ask_redis(self._redis.settle(self.node, [(counter, count, reservation)]))
        except self._trouble as error:
            self._went_away(error)

    async def release(self, holding: Holding) -> None:
        self._held.pop(holding.lease, None)
        self.local.release(holding.ask.path, holding.lease)
        if self.remote is None or self._away():
            return  # Redis's copy, if any, expires within LEASE_SECONDS
        with contextlib.suppress(*self._trouble):
            await self._ask_redis(self._redis.release(holding.ask.path, holding.lease))

    async def run(self) -> None:
        """Renew the leases held and, with Redis, keep the heartbeat; until cancelled."""
        while True:
            await self.renew()
            await asyncio.sleep(RENEW_SECONDS)

    async def renew(self) -> None:
        held = [(h.ask.path, h.lease) for h in self._held.values()]
        self.local.renew(held)
        if self.remote is None:
            self.local.renew_reservations(self._reservations())
            return
        if self._away():
            return
        try:
            await self._forget_unanswered()
            if self._tell_redis_all:
                await self._reassert()
            await self._ask_redis(self._redis.renew(held))
            reserved = [(*r, LEASE_SECONDS) for r in self._reservations()]
            await self._ask_redis(self._redis.reserve(reserved))
            try:
                alive = await self._ask_redis(self._redis.heartbeat(self.node, ALIVE_SECONDS))
            except EpochChanged:  # Redis restarted empty: every node writes back now
                await self._reassert()
                alive = await self._ask_redis(self._redis.heartbeat(self.node, ALIVE_SECONDS))
            self._seen_alive(sorted(alive) or [self.node])
        except self._trouble as error:
            self._went_away(error)
            return
        self._came_back()

    def _seen_alive(self, nodes: list[str]) -> None:
        """Take the nodes Redis says are alive, and remember them for a start while
        Redis is away: a node that forgot them would take every limit whole."""
        if nodes == self.nodes:
            return
        self.nodes = nodes
        if self.nodes_file is not None:
            with contextlib.suppress(OSError):  # remembered next time, then
                written = self.nodes_file.with_suffix(".new")
                written.write_text(json.dumps(nodes))
                written.replace(self.nodes_file)

    def _reservations(self) -> list[tuple[str, str, int]]:
        return [(r.counter, r.name, r.recipients) for r in self._reserved.values()]

    def tell(self, decisions: list[Decision]) -> None:
        """Tell the fleet a suspension, throttle or resume, in the background."""
        if self.throttle_log is not None:
            self._background(self._tell(decisions))

    def _background(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tell(self, decisions: list[Decision]) -> None:
        assert self.throttle_log is not None
        try:
            await self._ask_redis(self.throttle_log.publish(decisions))
        except self._trouble as error:
            self._went_away(error)  # kept, and appended with the next decisions read

    async def read_decisions(self, after: str) -> tuple[list[Decision], str] | None:
        """The fleet's decisions after stream ID ``after``, and the new place;
        None while Redis is away or not configured."""
        if self.throttle_log is None or self._away():
            return None
        try:
            await self._ask_redis(self.throttle_log.publish([]))
            return await self._ask_redis(self.throttle_log.read(after))
        except self._trouble as error:
            self._went_away(error)
            return None

    async def close(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.remote is not None:
            await self.remote.client.aclose()
        self.local.close()

    # --- Redis, and deciding without it ---

    @property
    def _redis(self) -> RedisLimits:
        assert self.remote is not None
        return self.remote

    def _away(self) -> bool:
        return self.clock() < self._away_until

    async def _admit_remote(self, asks: Sequence[Ask], lease: str) -> Granted | Refused | None:
        if self.remote is None or self._away():
            return None
        try:
            await self._forget_unanswered()
            if self._tell_redis_all:
                await self._reassert()
            try:
                result = await self._ask_redis(self._redis.admit(asks, lease))
            except EpochChanged:  # Redis restarted empty, or this node is new to it
                await self._reassert()
                result = await self._ask_redis(self._redis.admit(asks, lease))
        except self._trouble as error:
            self._unanswered.append(([ask.path for ask in asks], lease))
            self._went_away(error)
            return None
        self._came_back()
        return result

    def _came_back(self) -> None:
        """Redis answered: after it was away, say so once."""
        if self._away_until != float("-inf"):
            self._away_until = float("-inf")
            metrics.CLUSTER_REDIS_UP.set(1)
            log.warning("redis is back: limits are shared with the fleet again")

    async def _forget_unanswered(self) -> None:
        """Give back what Redis may have granted while we had stopped waiting."""
        while self._unanswered:
            # Taken off first: other deliveries of this process may be here too.
            paths, lease = self._unanswered.pop()
            try:
                for path in paths:
                    await self._ask_redis(self._redis.release(path, lease))
            except BaseException:
                self._unanswered.append((paths, lease))  # given back the next time
                raise

    async def _ask_redis(self, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):  # no task of its own, unlike wait_for
                return await call
        except BaseException:
            metrics.CLUSTER_REDIS_ERRORS.inc()
            raise
        finally:
            metrics.CLUSTER_REDIS_SECONDS.observe(time.perf_counter() - started)

    async def _reassert(self) -> None:
        """Write every lease, warmup reservation and count of the node (its file,
        this process, its spool) to Redis, then join Redis's epoch."""
        await self._ask_redis(self._redis.restore(self.local.leases()))
        reserved = [(*r, LEASE_SECONDS) for r in self._reservations()]
        await self._ask_redis(self._redis.reserve(reserved))
        counts = [(counter, count, None) for counter, count in self.counts().items()]
        await self._ask_redis(self._redis.settle(self.node, counts))
        await self._ask_redis(self._redis.join())
        self._tell_redis_all = False

    def _went_away(self, error: BaseException) -> None:
        self._tell_redis_all = True  # what the node decides meanwhile goes back first
        if self._away_until == float("-inf"):
            metrics.CLUSTER_REDIS_UP.set(0)
            log.warning(
                "redis away (%s): each limit is shared by %d nodes until it is back",
                type(error).__name__ if isinstance(error, TimeoutError) else error,
                len(self.nodes),
            )
        self._away_until = self.clock() + RETRY_SECONDS

    def _fallback(self, ask: Ask) -> Ask:
        """This node's share of ``ask`` while the fleet cannot coordinate."""
        nodes = len(self.shared_with)
        if nodes == 1:
            return ask
        rank = self.nodes.index(self.node) if self.node in self.nodes else nodes - 1
        return replace(
            ask,
            max_connections=None
            if ask.max_connections is None
            else share(ask.max_connections, rank, nodes),
            interval=None if ask.interval is None else ask.interval * nodes,
        )


def _recall_nodes(nodes_file: Path | None, node: str) -> list[str]:
    """The nodes last seen alive, as remembered, this one among them."""
    remembered: list[str] = []
    if nodes_file is not None:
        with contextlib.suppress(OSError, ValueError):
            remembered = [str(name) for name in json.loads(nodes_file.read_text())]
    return sorted({*remembered, node})


def shared_limits(
    cluster: ClusterConfig, spool_path: str, counts: WarmupCounts = lambda names=None: {}
) -> SharedLimits:
    """The node's file beside the spool, and Redis when ``[cluster] redis`` names one;
    ``counts``: the node's current warmup counts."""
    local = LocalLimits(str(local_limits_dir(spool_path)), LEASE_SECONDS)
    if cluster.redis is None:
        return SharedLimits(cluster.node, local, counts=counts)
    client = redis_client.connect(cluster.redis, socket_connect_timeout=1.0)
    # Every node renews, so writes its leases back, within RENEW_SECONDS.
    remote = RedisLimits(client, LEASE_SECONDS, settling=2 * RENEW_SECONDS + 0.5)
    nodes_file = Path(spool_path) / NODES_FILE
    return SharedLimits(
        cluster.node, local, remote, cluster.redis_timeout, counts=counts, nodes_file=nodes_file
    )
