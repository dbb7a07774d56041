"""The suppression list shared by the nodes that name one Redis (`[cluster] redis`).

Real `mta serve` nodes, each with its own spool, and a real redis-server. What
a user checks: an address suppressed on one node (by `mta suppress add` or by
a hard bounce) is refused at RCPT with 550 5.1.1 on the others, for the
sender domain the entry is scoped to; a removal makes it mailable everywhere;
changes made while Redis answers nothing reach the others once it is back;
when Redis comes back empty every node still refuses what it had listed, and
the list is pushed back into Redis for a node that joins later.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from mta.cluster.suppression_sync import LISTING
from tests.harness.client import send
from tests.harness.mta import Mta, start_together
from tests.harness.poll import eventually
from tests.harness.redis_server import RedisServer
from tests.integration.test_client import PEER, Peer
from tests.integration.test_policy import add_policy
from tests.integration.test_suppression import listed, rcpt, suppress

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds; a change normally reaches the others within one


def node(root: Path, name: str, redis_server: RedisServer) -> Mta:
    mta = Mta(root / name)
    add_policy(mta, f'[cluster]\nredis = "{redis_server.url}"\nnode = "{name}"\n')
    return mta


def refuses(mta: Mta, address: str, sender: str = "app@example.test") -> bool:
    return rcpt(mta, address, sender).startswith("550 5.1.1")


def accepts(mta: Mta, address: str, sender: str = "app@example.test") -> bool:
    return rcpt(mta, address, sender).startswith("250")


def test_additions_bounces_and_removals_reach_the_other_node(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis_server, Peer() as peer:
        a, b = node(tmp_path, "a", redis_server), node(tmp_path, "b", redis_server)
        b.routes = {"partial.test": f"{PEER}:{peer.port}"}  # refuses "bad...": 550 5.1.1
        start_together(a, b)

        suppress(a, "add", "x@example.net", "--reason", "asked us to stop")
        eventually(lambda: refuses(b, "x@example.net"), WAIT, b.log)
        assert "asked us to stop" in rcpt(b, "x@example.net")

        send(b, recipients=["bad@partial.test"])  # a hard bounce on B, from app@example.test
        eventually(lambda: refuses(a, "bad@partial.test"), WAIT, a.log)
        assert accepts(a, "bad@partial.test", sender="news@other.test")  # scoped there too

        suppress(b, "remove", "x@example.net")
        eventually(lambda: accepts(a, "x@example.net"), WAIT, a.log)
        assert refuses(a, "bad@partial.test") and refuses(b, "bad@partial.test")
        assert a.stop() == 0 and b.stop() == 0


def test_entries_for_one_sender_domain_reach_the_other_node(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis_server:
        a, b = node(tmp_path, "a", redis_server), node(tmp_path, "b", redis_server)
        start_together(a, b)
        suppress(a, "add", "y@example.net", "--sender-domain", "shop.test", "--for", "30d")
        eventually(lambda: refuses(b, "y@example.net", sender="news@shop.test"), WAIT, b.log)
        assert accepts(b, "y@example.net") and accepts(b, "y@example.net", sender="")
        [row] = listed(b)
        assert row["sender_domain"] == "shop.test" and row["expires"] == listed(a)[0]["expires"]
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        assert client.hkeys(LISTING) == ["y@example.net shop.test"]
        client.close()

        suppress(b, "remove", "y@example.net", "--sender-domain", "shop.test")
        eventually(lambda: accepts(a, "y@example.net", sender="news@shop.test"), WAIT, a.log)
        assert a.stop() == 0 and b.stop() == 0


def test_changes_made_while_redis_is_away_or_lost_reach_every_node(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis_server:
        a, b = node(tmp_path, "a", redis_server), node(tmp_path, "b", redis_server)
        start_together(a, b)
        suppress(a, "add", "early@example.net")
        eventually(lambda: refuses(b, "early@example.net"), WAIT, b.log)

        redis_server.pause()  # answers nothing
        suppress(a, "add", "away@example.net")
        assert refuses(a, "away@example.net")  # at once: RCPT never asks Redis
        assert accepts(b, "away@example.net")  # B cannot have heard of it
        eventually(lambda: "suppression list changes wait" in a.log(), WAIT, a.log)
        redis_server.resume()
        eventually(lambda: refuses(b, "away@example.net"), WAIT, b.log)

        redis_server.restart()  # back empty
        listed = ["early@example.net", "away@example.net"]
        assert all(refuses(n, address) for n in (a, b) for address in listed)
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        eventually(lambda: set(client.hkeys(LISTING)) == set(listed), WAIT, a.log)
        client.close()

        c = node(tmp_path, "c", redis_server)  # joins after Redis lost everything
        c.start()
        eventually(lambda: all(refuses(c, address) for address in listed), WAIT, c.log)
        suppress(c, "add", "late@example.net")
        eventually(lambda: refuses(a, "late@example.net"), WAIT, a.log)
        assert "shared again" in a.log()
        assert all(n.stop() == 0 for n in (a, b, c))
