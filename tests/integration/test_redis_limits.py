"""The Redis store's scripts against the pure model, on a real redis-server.

mta.policy.admission is the reference: for any sequence of decisions,
renewals, releases and warmup counts (times chosen by the test, passed to the
script in place of Redis's clock), the script must answer what the model
answers and leave the same leases, reservations and counts behind. Then what
a node does while Redis is away, or after it restarted empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.cluster.limits import Admitted, SharedLimits
from mta.cluster.local_limits import LocalLimits
from mta.cluster.redis_limits import RedisLimits, lease_key, reserved_key
from mta.policy import admission
from mta.policy.admission import Ask, CountState, Granted, PathState, Refused, Warmup
from tests.harness.redis_server import RedisServer

TTL = 10.0
PATHS = ("ip1>gmail", "ip2>gmail", "ip1>yahoo")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


COUNTERS = ("ip1", "ip2")  # a path's warmup counter is its source's


def source(path: str) -> str:
    return path.split(">")[0]


asks = st.lists(
    st.builds(
        Ask,
        path=st.sampled_from(PATHS),
        max_connections=st.one_of(st.none(), st.integers(min_value=0, max_value=3)),
        interval=st.one_of(st.none(), st.sampled_from([0.125, 0.5, 2.0])),
        burst=st.integers(min_value=1, max_value=3),
        takes_slot=st.booleans(),
        warmup=st.one_of(
            st.none(),
            st.builds(
                Warmup,
                counter=st.just(""),
                cap=st.integers(min_value=0, max_value=6),
                wanted=st.integers(min_value=1, max_value=3),
            ),
        ),
    ).map(lambda a: replace(a, warmup=a.warmup and replace(a.warmup, counter=source(a.path)))),
    min_size=1,
    max_size=2,
    unique_by=lambda ask: source(ask.path),
)
steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.125, 0.25, 1.0, 3.0, 11.0]),  # time passing first
        st.one_of(
            st.tuples(st.just("admit"), asks),
            st.tuples(st.just("release"), st.integers(min_value=0, max_value=20)),
            st.tuples(st.just("renew"), st.integers(min_value=0, max_value=20)),
            st.tuples(
                st.sampled_from(["settle", "reserve"]),
                st.tuples(
                    st.integers(min_value=0, max_value=20),  # which reservation
                    st.integers(min_value=0, max_value=3),  # recipients delivered
                    st.sampled_from(["node-a", "node-b"]),
                ),
            ),
        ),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps)
def test_the_script_decides_as_the_model_does(
    redis_server: RedisServer, sequence: list[tuple[float, tuple[str, object]]]
) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushdb()
        store = RedisLimits(client, TTL)
        await store.join()
        model = {path: PathState() for path in PATHS}
        counts = {counter: CountState() for counter in COUNTERS}
        now, held, reserved = 1_800_000_000.0, [], []
        for n, (elapsed, (operation, argument)) in enumerate(sequence):
            now += elapsed
            if operation == "admit":
                chosen: list[Ask] = argument  # type: ignore[assignment]
                lease = f"lease{n}"
                states = [model[a.path] for a in chosen]
                warm = [counts[source(a.path)] if a.warmup else None for a in chosen]
                expected = admission.admit(states, chosen, lease, now, TTL, warm)
                got = await store.admit(chosen, lease, now=now)
                if isinstance(expected, Refused) and expected.retry_in is not None:
                    assert isinstance(got, Refused) and got.retry_in is not None
                    assert got.retry_in == pytest.approx(expected.retry_in, abs=1e-5)
                    assert got.full == expected.full
                else:
                    assert got == expected
                if isinstance(got, Granted) and chosen[got.index].takes_slot:
                    held.append((chosen[got.index].path, lease))
                if isinstance(got, Granted) and chosen[got.index].warmup:
                    reserved.append((source(chosen[got.index].path), lease, got.reserved))
            elif operation in ("settle", "reserve"):
                if reserved:
                    which, delivered, node = argument  # type: ignore[misc]
                    counter, name, n = reserved[which % len(reserved)]
                    if operation == "settle":
                        reserved.remove((counter, name, n))
                        total = sum(counts[counter].sent.values()) + min(delivered, n)
                        admission.settle(counts[counter], node, total, name)
                        await store.settle(node, [(counter, total, name)])
                    else:
                        admission.renew_reservation(counts[counter], name, n, now, TTL)
                        await store.reserve([(counter, name, n, TTL)], now=now)
            elif held:
                path, lease = held[int(argument) % len(held)]  # type: ignore[call-overload]
                if operation == "release":
                    held.remove((path, lease))
                    admission.release(model[path], lease)
                    await store.release(path, lease)
                else:
                    model[path].leases[lease] = now + TTL  # renewing re-asserts
                    await store.renew([(path, lease)], now=now)
            for path in PATHS:
                admission.prune(model[path], now)
                stored = await client.zrangebyscore(lease_key(path), f"({now:.6f}", "+inf")
                assert sorted(s.decode() for s in stored) == sorted(model[path].leases)
            for counter in COUNTERS:
                admission.warmup_room(counts[counter], 0, now)  # forgets what expired
                assert await store.sent(counter) == counts[counter].sent
                reservations = await client.hgetall(reserved_key(counter))
                live = {
                    name.decode(): int(value.split()[0])
                    for name, value in reservations.items()
                    if float(value.split()[1]) > now
                }
                assert live == {name: n for name, (n, _) in counts[counter].reserved.items()}
        await client.aclose()

    asyncio.run(main())


def test_while_redis_is_stopped_a_node_takes_its_share_and_comes_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ask = Ask("ip1>gmail", max_connections=5)

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushdb()
        clock = [0.0]
        shared = node_limits(client, "node-b", tmp_path / "limits", clock=lambda: clock[0])
        other = RedisLimits(client, TTL)
        await other.heartbeat("node-a", 30.0)
        await shared.renew()  # the heartbeat: node-a and node-b are alive
        assert shared.nodes == ["node-a", "node-b"]
        first = await shared.admit([ask])
        assert isinstance(first, Admitted)
        assert await other.in_use("ip1>gmail") == 1
        redis_server.pause()
        try:
            # Away: node-b (rank 1 of 2) may hold 2 of the 5 connections, the
            # one it holds in Redis included.
            held = [await shared.admit([ask]) for _ in range(2)]
            assert [isinstance(h, Refused) for h in held] == [False, True]
            assert shared.local.in_use("ip1>gmail") == 2
        finally:
            redis_server.resume()
        clock[0] += 1.5  # past the retry pause: Redis is asked again
        back = await shared.admit([ask])
        assert isinstance(back, Admitted)
        # Redis now knows all three this node holds: the first, the one taken
        # while it was away, and this one; the lease asked for while it was
        # stopped was given back when it woke.
        assert await other.in_use("ip1>gmail") == 3
        await shared.close()

    asyncio.run(main())


def test_after_an_empty_restart_a_node_writes_back_what_it_holds_before_deciding(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ask = Ask("ip2>gmail", max_connections=2)

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushdb()
        shared = SharedLimits(
            "node-a", LocalLimits(str(tmp_path / "limits"), TTL), RedisLimits(client, TTL), 0.5
        )
        assert isinstance(await shared.admit([ask]), Admitted)
        await client.flushdb()  # as a restarted Redis without persistence
        assert isinstance(await shared.admit([ask]), Admitted)
        assert await shared.admit([ask]) == Refused(None)  # the first one still counts
        assert await RedisLimits(client, TTL).in_use("ip2>gmail") == 2
        await shared.close()

    asyncio.run(main())


def test_a_lease_of_a_node_that_died_expires(redis_server: RedisServer) -> None:
    ask = Ask("ip1>yahoo", max_connections=1)

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushdb()
        store = RedisLimits(client, TTL)
        await store.join()
        assert await store.admit([ask], "dead-node.1", now=1000.0) == Granted(0)
        assert await store.admit([ask], "live-node.1", now=1000.0 + TTL - 1) == Refused(None)
        assert await store.admit([ask], "live-node.1", now=1000.0 + TTL) == Granted(0)
        await client.aclose()

    asyncio.run(main())


def test_a_node_that_only_renews_sees_redis_come_back(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushdb()
        clock = [0.0]
        shared = node_limits(client, "node-c", tmp_path / "limits", clock=lambda: clock[0])
        redis_server.pause()
        try:
            await shared.renew()
        finally:
            redis_server.resume()
        assert "redis away" in caplog.text
        clock[0] += 1.5
        await shared.renew()  # no delivery needed to notice
        assert "redis is back" in caplog.text
        assert await client.zrange("mta:nodes", 0, -1) == [b"node-c"]
        await shared.close()

    asyncio.run(main())


def test_warmup_counts_are_the_fleets_and_come_back_after_an_empty_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    day = "warmup\0new-ip\0gmail\0" + "2026-12-07"
    ask = Ask("new-ip>gmail", warmup=Warmup(day, cap=5, wanted=2))
    spool_counts = {"node-a": {day: 0}, "node-b": {day: 0}}

    def node(name: str) -> SharedLimits:
        return node_limits(
            redis_server, name, tmp_path / name, counts=lambda names=None: dict(spool_counts[name])
        )

    async def deliver(shared: SharedLimits, delivered: int) -> Admitted | Refused:
        admitted = await shared.admit([ask])
        if isinstance(admitted, Admitted):
            assert admitted.reservation is not None
            spool_counts[shared.node][day] += delivered  # the delivery's commit
            shared.settle(admitted.reservation)
            await asyncio.gather(*shared._tasks)
        return admitted

    async def main() -> None:
        client = client_for(redis_server)
        await client.flushdb()
        a, b = node("node-a"), node("node-b")
        assert isinstance(await deliver(a, 2), Admitted)
        assert isinstance(await deliver(b, 2), Admitted)
        # One left of five: b's next delivery of two may send one.
        last = await b.admit([ask])
        assert isinstance(last, Admitted) and last.reservation is not None
        assert last.reservation.recipients == 1 and last.left == 0
        assert await a.admit([ask]) == Refused(None)  # reserved, not yet sent
        spool_counts["node-b"][day] += 1
        b.settle(last.reservation)
        await asyncio.gather(*b._tasks)
        assert await a.admit([ask]) == Refused(None, (0,))  # the day is used up
        await client.flushdb()  # as a restarted Redis without persistence
        # Both nodes write their counts back before Redis decides again.
        await a.renew()
        await b.renew()
        assert await RedisLimits(client, TTL).sent(day) == {"node-a": 2, "node-b": 3}
        assert await a.admit([ask]) == Refused(None, (0,))
        await asyncio.gather(a.close(), b.close(), client.aclose())

    asyncio.run(main())


def test_while_redis_is_away_a_warming_up_source_waits_and_the_others_send(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    warming = Ask("new-ip>gmail", warmup=Warmup("day", cap=100, wanted=1))
    warm = Ask("old-ip>gmail", max_connections=5)

    async def main() -> None:
        shared = node_limits(redis_server, "node-a", tmp_path / "limits")
        redis_server.pause()
        try:
            assert await shared.admit([warming]) == Refused(1.0)
            granted = await shared.admit([warming, warm])
            assert isinstance(granted, Admitted) and granted.index == 1
            assert granted.reservation is None
        finally:
            redis_server.resume()
        await shared.close()

    asyncio.run(main())


def node_limits(
    redis: RedisServer | aioredis.Redis, node: str, directory: Path, **options: Any
) -> SharedLimits:
    """A node's shared limits: its file in ``directory``, and the test's Redis."""
    client = client_for(redis) if isinstance(redis, RedisServer) else redis
    return SharedLimits(
        node, LocalLimits(str(directory), TTL), RedisLimits(client, TTL), timeout=0.5, **options
    )


def client_for(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis.from_url(server.url)


def test_deliveries_at_once_give_back_what_redis_did_not_answer_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def main() -> None:
        shared = node_limits(redis_server, "node-a", tmp_path / "limits")
        shared._unanswered = [(["ip1>gmail"], "late-1"), (["ip2>gmail"], "late-2")]
        # Two deliveries of this process find them at the same moment.
        await asyncio.gather(shared._forget_unanswered(), shared._forget_unanswered())
        assert shared._unanswered == []
        await shared.close()

    asyncio.run(main())


def test_a_node_starting_while_redis_is_away_takes_its_share_of_the_fleet_it_saw(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ask = Ask("ip1>gmail", max_connections=3)
    nodes_file = tmp_path / "fleet-nodes.json"

    def node_b() -> SharedLimits:
        return node_limits(redis_server, "node-b", tmp_path / "limits", nodes_file=nodes_file)

    async def main() -> None:
        await client_for(redis_server).flushdb()
        for name in ("node-a", "node-c"):
            await RedisLimits(client_for(redis_server), TTL).heartbeat(name, 30.0)
        shared = node_b()
        await shared.renew()  # sees node-a and node-c alive, and remembers them
        await shared.close()
        LocalLimits.clear(str(tmp_path / "limits"))  # a restart
        redis_server.pause()
        try:
            restarted = node_b()
            # Rank 1 of 3 nodes: a share of 1 of the 3 connections, not all 3.
            assert isinstance(await restarted.admit([ask]), Admitted)
            assert await restarted.admit([ask]) == Refused(None)
        finally:
            redis_server.resume()
        await restarted.close()

    asyncio.run(main())
