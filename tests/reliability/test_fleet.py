"""A fleet of three nodes keeps one provider's limits through Redis, and while it is away.

Three `mta serve` on loopback (own spools and ports, two workers each, ``[cluster]
redis`` naming one real redis-server) send to 200 domains that reach one
receiver by static routes and roll up into one provider by its address. The
receiver counts the connections open at once and when each message came, and
keeps each message's Subject. Mail goes out in five phases, each starting
while the last one's mail is still being delivered: Redis up; Redis stopped
(kill -STOP: it answers nothing); Redis continued; Redis killed (kill -9);
Redis started again, empty.

What a user checks: every message arrives exactly once and every spool ends
empty; never more connections at once than the provider's
``max_connections``, Redis or not: while it is away each node takes its
share (limit / nodes last seen alive), and the shares add up to the limit;
no more messages in a second than the rate allows (a burst of one, or one
per node while each sends its share of the rate), apart from the second
after each change, when a node may still decide the old way; each node's
log says when Redis went away and when it came back. (With a Redis of its
own per node, one run saw 12 connections at once and 87 messages in a
second.)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.cluster.limits import RENEW_SECONDS, RETRY_SECONDS
from tests.harness.client import send
from tests.harness.counting_peer import CountingPeer
from tests.harness.mta import Mta, start_together
from tests.harness.poll import eventually
from tests.harness.redis_server import RedisServer
from tests.integration.test_policy import add_policy
from tests.reliability.conftest import Scenario, scaled

pytestmark = pytest.mark.integration

PEER = "127.0.0.21"
NODES = ["n1", "n2", "n3"]
DOMAINS = [f"customer{n}.fleet.test" for n in range(200)]
MAX_CONNECTIONS = 4
RATE = 30  # messages per second, burst 1
# [delivery] connection_idle_timeout (the default is 5): a node's idle connection
# keeps its slot from another worker's mail until it closes.
IDLE_TIMEOUT = 1.0
PER_PHASE = scaled(90, 600)  # messages sent in each phase, spread over the nodes
BODY = "A line of a few kilobytes of fleet mail, to be delivered exactly once.\r\n" * 40
POLICY = f"""
[cluster]
redis = "{{redis}}"
node = "{{node}}"
redis_timeout = 0.2
[[policy.provider]]
name = "bigmail"
mx_suffixes = ["{PEER}"]
max_connections = {MAX_CONNECTIONS}
max_rate = "{RATE}/s"
"""


class FleetPeer(CountingPeer):
    """A CountingPeer that also remembers when each connection opened and closed."""

    def __init__(self, host: str, data_delay: float) -> None:
        super().__init__(host, data_delay=data_delay)
        self.open_changes: list[tuple[float, int]] = []  # (monotonic time, open after it)

    def _count_open(self, delta: int) -> None:
        super()._count_open(delta)
        with self._lock:
            self.open_changes.append((time.monotonic(), self.seen.open_now))

    def most_open(self, start: float, end: float) -> int:
        """The most connections open at once between ``start`` and ``end``."""
        with self._lock:
            changes = list(self.open_changes)
        before = [count for when, count in changes if when < start]
        during = [count for when, count in changes if start <= when < end]
        return max(before[-1:] + during, default=0)


@dataclass
class Phase:
    name: str
    redis_answers: bool  # while it lasts; False: stopped or killed
    start: float
    end: float = float("inf")


def node(root: Path, name: str, redis: RedisServer, peer: FleetPeer) -> Mta:
    mta = Mta(root)
    mta.park_mail = False
    mta.server["workers"] = 2
    mta.routes = dict.fromkeys(DOMAINS, f"{PEER}:{peer.port}")
    mta.delivery |= {"retry_first": 1, "retry_max": 2, "connection_idle_timeout": IDLE_TIMEOUT}
    add_policy(mta, POLICY.format(redis=redis.url, node=name))
    return mta


def fleet_message(subject: str) -> bytes:
    return f"From: App <app@example.test>\r\nSubject: {subject}\r\n\r\n{BODY}".encode()


def most_in_a_second(times: list[float], start: float, end: float) -> int:
    """The most messages in a one-second window that starts (at a message) in [start, end)."""
    ordered = sorted(times)
    return max(
        (
            sum(1 for later in ordered if first <= later < first + 1.0)
            for first in ordered
            if start <= first < end
        ),
        default=0,
    )


def test_three_nodes_keep_one_providers_limits_while_redis_stops_dies_and_restarts(
    tmp_path: Path, scenario: Scenario
) -> None:
    with RedisServer(tmp_path / "redis") as redis, FleetPeer(PEER, data_delay=0.05) as peer:
        nodes = [node(tmp_path / name, name, redis, peer) for name in NODES]
        try:
            deliver_in_phases(nodes, redis, peer, scenario)
        finally:
            for mta in nodes:
                if mta.process is not None:
                    mta.process.kill()
                    mta.process.wait()


def deliver_in_phases(
    nodes: list[Mta], redis: RedisServer, peer: FleetPeer, scenario: Scenario
) -> None:
    sent: list[str] = []
    phases: list[Phase] = []
    start_together(*nodes)
    all_known = time.monotonic() + RENEW_SECONDS + 1  # every worker's heartbeat saw all

    def run_phase(name: str, redis_answers: bool, ready: float = 0.0) -> None:
        """Send a phase's mail, and end the phase once half of it has arrived."""
        if phases:
            phases[-1].end = time.monotonic()
        phases.append(Phase(name, redis_answers, time.monotonic()))
        for number in range(PER_PHASE):
            subject = f"{name} {number}"
            mta = nodes[number % len(nodes)]
            domain = DOMAINS[(len(sent) * 7) % len(DOMAINS)]
            send(mta, fleet_message(subject), [f"u{number}@{domain}"])
            sent.append(subject)
        eventually(
            lambda: (
                len(peer.snapshot().subjects) >= len(sent) - PER_PHASE // 2
                and time.monotonic() >= ready
            ),
            90,
            lambda: f"{name}: the peer has {len(peer.snapshot().subjects)} of {len(sent)}",
            interval=0.05,
        )

    run_phase("up", True, ready=all_known)
    redis.pause()
    try:
        run_phase("stopped", False)
    finally:
        redis.resume()
    run_phase("continued", True)
    redis.kill()
    run_phase("killed", False)
    redis.restart()
    run_phase("restarted", True)
    phases[-1].end = time.monotonic()

    def all_delivered() -> bool:
        return len(peer.snapshot().subjects) >= len(sent) and all(
            not mta.queue_list() for mta in nodes
        )

    eventually(
        all_delivered,
        120,
        lambda: (
            f"the peer has {len(peer.snapshot().subjects)} of {len(sent)}; "
            f"queued: {[len(mta.queue_list()) for mta in nodes]}"
        ),
        interval=0.2,
    )
    seen = peer.snapshot()
    copies = Counter(seen.subjects)
    lost = [subject for subject in sent if subject not in copies]
    duplicated = sum(count - 1 for count in copies.values())
    most = {p.name: peer.most_open(p.start, p.end) for p in phases}
    # Past a change a node may decide the old way for up to RETRY_SECONDS (it
    # tries Redis again that often), so one kind of decider decides alone from
    # then to the end of its phase; the windows around a change mix both.
    alone = {
        p.name: most_in_a_second(seen.mail_times, p.start + RETRY_SECONDS, p.end - 1.0)
        for p in phases
    }
    anywhere = most_in_a_second(seen.mail_times, float("-inf"), float("inf"))
    scenario.checked = (
        f"3 nodes x 2 workers, one provider (max_connections {MAX_CONNECTIONS}, "
        f"{RATE}/s) over 200 domains; redis stopped, continued, killed, restarted "
        f"empty; most open per phase {most}; most messages in a second: {anywhere} "
        f"in all, per phase {alone}"
    )
    scenario.sent = scenario.accepted = len(sent)
    scenario.delivered = len(set(copies) & set(sent))
    scenario.lost, scenario.duplicated = len(lost), duplicated

    assert not lost and not duplicated, (lost, copies.most_common(3))
    assert set(copies) == set(sent)
    for mta in nodes:
        log = mta.log()
        # Each node saw Redis go (stopped, then killed) and come back, and
        # split the limit with the three nodes it had seen alive.
        assert log.count("redis away") >= 2, log
        assert "each limit is shared by 3 nodes" in log, log
        assert log.count("redis is back") >= 2, log
    # Redis's limit whenever it answers (after an empty restart too: nothing is
    # granted until every node has written its leases back).
    assert all(most[p.name] <= MAX_CONNECTIONS for p in phases if p.redis_answers), most
    # While it is away, each node's share (2 + 1 + 1 of 4: they add up to the
    # limit) once the connections a node held above its share when Redis went
    # away have ended: it finishes the deliveries under way, closes the extra
    # connections when they come back to the pool, and idle ones time out.
    # Until then the bound is what the nodes held plus their shares.
    settled = {
        p.name: peer.most_open(p.start + RETRY_SECONDS + IDLE_TIMEOUT + 1.0, p.end)
        for p in phases
        if not p.redis_answers
    }
    assert all(count <= MAX_CONNECTIONS for count in settled.values()), (settled, phases)
    assert all(most[p.name] <= 2 * MAX_CONNECTIONS for p in phases), most
    # A burst of one per decider: Redis, or each node on its share of the rate
    # (RATE / 3 each) while Redis is away.
    for phase in phases:
        bursts = 1 if phase.redis_answers else len(nodes)
        assert alone[phase.name] <= RATE + bursts, (phase, alone)
    assert all(mta.stop() == 0 for mta in nodes)
