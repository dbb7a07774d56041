"""A provider's limits hold across a node's worker processes.

The domains of one provider hash to different workers (each worker delivers
the domains it owns), so before the limits were shared each worker allowed
the whole limit: with two workers a provider limited to 2 connections saw 4.
The receiver (tests/harness/counting_peer.py) counts the connections open at
once and when each MAIL came; twenty domains reach it by static routes and
roll up into one provider by its address.
"""

from __future__ import annotations

import pytest

from mta.node.ownership import owner
from tests.harness.client import message, send
from tests.harness.counting_peer import CountingPeer
from tests.harness.mta import Mta
from tests.harness.poll import eventually

pytestmark = pytest.mark.integration

PEER = "127.0.0.21"
DOMAINS = [f"shared{n}.test" for n in range(20)]


def one_provider(mta: Mta, peer: CountingPeer, limits: str) -> None:
    mta.park_mail = False
    mta.server["workers"] = 2
    mta.routes = dict.fromkeys(DOMAINS, f"{PEER}:{peer.port}")
    # An idle connection keeps its slot: the other worker waits for it to close.
    mta.delivery |= {"retry_first": 1, "retry_max": 1, "connection_idle_timeout": 1}
    mta.extra_config += f'[[policy.provider]]\nname = "peer"\nmx_suffixes = ["{PEER}"]\n{limits}'


def send_to_every_domain(mta: Mta, rounds: int) -> int:
    assert {owner(domain, 2) for domain in DOMAINS} == {0, 1}  # both workers deliver
    for number in range(rounds):
        for domain in DOMAINS:
            send(mta, message(f"shared {number}"), [f"u{number}@{domain}"])
    return rounds * len(DOMAINS)


def wait_for(peer: CountingPeer, mta: Mta, count: int) -> None:
    eventually(
        lambda: len(peer.snapshot().clients) >= count, 60, lambda: f"peer saw {peer.snapshot()}"
    )
    mta.wait_for_empty_spool()


def test_two_workers_never_open_more_connections_than_the_providers_limit(mta: Mta) -> None:
    with CountingPeer(PEER, data_delay=0.2) as peer:
        one_provider(mta, peer, "max_connections = 2\n")
        mta.start()
        sent = send_to_every_domain(mta, 2)
        wait_for(peer, mta, sent)
        # Forty jobs due at once over both workers; without shared limits up to four.
        assert peer.snapshot().most_open == 2
    assert mta.stop() == 0


def test_two_workers_keep_the_providers_rate(mta: Mta) -> None:
    with CountingPeer(PEER) as peer:
        one_provider(mta, peer, 'max_rate = "10/s"\n')
        mta.start()
        sent = send_to_every_domain(mta, 1)
        wait_for(peer, mta, sent)
        times = sorted(peer.snapshot().mail_times)
    # 10/s, burst 1: any one second holds at most 1 + 10 MAILs, over both workers.
    most = max(sum(1 for later in times if start <= later < start + 1.0) for start in times)
    assert most <= 11, times
    assert mta.stop() == 0
