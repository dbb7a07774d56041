"""One node's TSS04 stops that source on every node; a resume on any node frees all.

Two nodes share a real redis-server. Node A delivers until the receiver
answers Yahoo's ``421 4.7.0 [TSS04]``; the suspension A's rule decides must
reach node B, which then sends nothing to the site and keeps its mail
waiting. `mta policy resume` on B must then free the mail waiting on both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.client import message, send
from tests.harness.dns_server import DnsServer
from tests.harness.mta import Mta, start_together
from tests.harness.poll import eventually
from tests.harness.redis_server import RedisServer
from tests.integration.test_suspension import DOMAINS, PEER, POLICY, DefersOnce, bigmail_dns

pytestmark = pytest.mark.integration


def node(root: Path, name: str, redis: RedisServer, dns: DnsServer, peer: DefersOnce) -> Mta:
    mta = Mta(root)
    mta.park_mail = False
    mta.delivery |= {
        "nameservers": [f"127.0.0.1:{dns.port}"],
        "smtp_port": peer.port,
        "allow_private_mx": True,
        "retry_first": 1,
    }
    mta.extra_config += POLICY + f'[cluster]\nnode = "{name}"\nredis = "{redis.url}"\n'
    return mta


def waiting_for_the_suspension(mta: Mta, count: int) -> bool:
    queued = mta.queue_list()
    return len(queued) == count and all(
        "suspended (test-tss04)" in str(job["last_reply"]) for job in queued
    )


def test_a_suspension_on_one_node_holds_on_the_other_and_a_resume_frees_both(
    tmp_path: Path,
) -> None:
    dns = bigmail_dns().start()
    try:
        with RedisServer(tmp_path / "redis") as redis, DefersOnce(PEER, after=5) as peer:
            a = node(tmp_path / "a", "a", redis, dns, peer)
            b = node(tmp_path / "b", "b", redis, dns, peer)
            start_together(a, b)
            for number in range(10):
                send(a, message(f"on a {number}"), [f"a{number}@{DOMAINS[number]}"])
            eventually(lambda: peer.accepted_before is not None, 30, "no TSS04 yet")
            held_on_a = eventually(
                lambda: (q := a.queue_list()) and waiting_for_the_suspension(a, len(q)) and q,
                30,
                lambda: str(a.queue_list()),
            )
            assert "suspend default to bigmail for 1800s after test-tss04" in a.log()
            # B learns it from the fleet, not from a reply of its own.
            eventually(
                lambda: "test-tss04" in b.cli("policy", "show").stdout,
                10,
                lambda: b.cli("policy", "show").stdout,
            )
            before = len(peer.snapshot().clients)
            for number in range(10):
                send(b, message(f"on b {number}"), [f"b{number}@{DOMAINS[number]}"])
            eventually(lambda: waiting_for_the_suspension(b, 10), 30, lambda: str(b.queue_list()))
            assert len(peer.snapshot().clients) == before  # B sent nothing to the site
            assert "suspend default to bigmail" not in b.log()  # no rule acted on B itself

            resumed = b.cli("policy", "resume", "--site", "bigmail")
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            assert "told the other nodes" in resumed.stdout
            total = before + len(held_on_a) + 10
            eventually(
                lambda: len(peer.snapshot().clients) >= total,
                30,
                lambda: f"peer got {len(peer.snapshot().clients)} of {total}",
            )
            a.wait_for_empty_spool()
            b.wait_for_empty_spool()
            assert len(peer.snapshot().clients) == total  # each message once
            assert a.stop() == 0, a.log()
            assert b.stop() == 0, b.log()
    finally:
        dns.stop()
