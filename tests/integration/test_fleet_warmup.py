"""A warmup cap holds for the fleet: two nodes sharing a real redis-server send
one source's day of mail between them, and not one recipient more.

Both nodes name the same source (new-ip, on a plan of 5 recipients a day);
each is handed twice as many recipients as the cap, in messages of two
recipients to domains that hash to both of node A's workers.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.client import message, send
from tests.harness.counting_peer import CountingPeer
from tests.harness.mta import Mta, start_together
from tests.harness.poll import eventually
from tests.harness.redis_server import RedisServer
from tests.integration.test_policy import (
    EGRESS,
    PEER,
    add_policy,
    from_hour_start,
    route_to,
    waiting_until,
)

pytestmark = pytest.mark.integration

DOMAINS = [f"w{number}.test" for number in range(5)]
ONE_SOURCE = (
    EGRESS.replace("schedule = [48]", "schedule = [120]")  # 5 an hour
    .replace('"new-ip", "old-ip"', '"new-ip"')
    .replace("weights = [1000, 1]", "")
)


def node(root: Path, name: str, redis: RedisServer, peer: CountingPeer, workers: int) -> Mta:
    mta = Mta(root)
    route_to(mta, peer, *DOMAINS)
    mta.server["workers"] = workers
    # A loaded test machine can be slower than the default 10 ms, which would
    # count as Redis away and hold the warming-up source back.
    cluster = f'[cluster]\nnode = "{name}"\nredis = "{redis.url}"\nredis_timeout = 0.5\n'
    add_policy(mta, ONE_SOURCE + cluster)
    return mta


@pytest.fixture
def nodes() -> Iterator[list[Mta]]:
    """The nodes a test starts; killed if the test fails before stopping them."""
    started: list[Mta] = []
    yield started
    for mta in started:
        mta.kill()


def all_waiting_until(mta: Mta, hour: datetime.datetime) -> list[dict[str, Any]]:
    return eventually(lambda: waiting_until(mta, hour), 30, lambda: str(mta.queue_list()))


def new_ip_warmup(mta: Mta) -> dict[str, Any]:
    """The new source's plan with sites of no known provider."""
    shown = json.loads(mta.cli("policy", "show", "--json").stdout)
    [new_ip] = [row for row in shown["sources"] if row["source"] == "new-ip"]
    return dict(new_ip["warmup"]["providers"]["other"])


def test_two_nodes_send_one_days_warmup_cap_between_them(tmp_path: Path, nodes: list[Mta]) -> None:
    with RedisServer(tmp_path / "redis") as redis, CountingPeer(PEER) as peer:
        a = node(tmp_path / "a", "a", redis, peer, workers=2)
        b = node(tmp_path / "b", "b", redis, peer, workers=1)
        nodes += [a, b]
        next_hour = from_hour_start(a, b)
        start_together(a, b)
        for number, domain in enumerate(DOMAINS):
            send(a, message(f"on a {number}"), [f"a1@{domain}", f"a2@{domain}"])
            send(b, message(f"on b {number}"), [f"b1@{domain}", f"b2@{domain}"])
        waiting = [all_waiting_until(mta, next_hour) for mta in (a, b)]
        assert peer.snapshot().recipients == 5, peer.snapshot()
        left = sum(len(job["recipients"]) for queue in waiting for job in queue)
        assert left == 20 - 5
        shown = [new_ip_warmup(mta) for mta in (a, b)]
        assert sum(warmup["sent_today"] for warmup in shown) == 5
        assert [warmup["fleet_sent_today"] for warmup in shown] == [5, 5]
        for mta in (a, b):
            assert "status=bounced" not in mta.log()
            assert mta.stop() == 0
