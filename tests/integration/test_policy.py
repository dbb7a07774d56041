"""Traffic policy against real sockets: connection limits, rates, warmup
spill-over to another source address, and a throttling reply suspending a
site until it resumes by itself.

The receiving server is tests/harness/counting_peer.py (it sees the
client's address and counts open connections); mail reaches it through a
static route, so the site is the recipient domain. Sources are loopback
addresses 127.0.0.2 and 127.0.0.3, as the issue suggests.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import pytest

from tests.harness.client import message, send, unique
from tests.harness.counting_peer import CountingPeer
from tests.harness.dns_server import DnsServer
from tests.harness.fake_clock import FakeClock
from tests.harness.mta import Mta
from tests.harness.poll import eventually

pytestmark = pytest.mark.integration

PEER = "127.0.0.20"
TODAY = datetime.datetime.now(datetime.UTC).date().isoformat()


def route_to(mta: Mta, peer: CountingPeer, *domains: str) -> None:
    mta.park_mail = False
    mta.routes = {domain: f"{PEER}:{peer.port}" for domain in domains}
    mta.delivery |= {"retry_first": 1, "retry_max": 1}


def add_policy(mta: Mta, text: str) -> None:
    """Append TOML the fixture does not write itself ([egress], [policy])."""
    mta.extra_config += text


def wait_for_messages(peer: CountingPeer, count: int, timeout: float = 20.0) -> None:
    eventually(
        lambda: len(peer.snapshot().clients) >= count,
        timeout,
        lambda: f"peer saw {peer.snapshot()}",
    )


def most_in_one_second(times: list[float]) -> int:
    """The largest number of ``times`` that fall within one second of each other."""
    return max(sum(1 for later in times if start <= later < start + 1.0) for start in times)


def test_a_site_never_gets_more_connections_than_its_limit(mta: Mta) -> None:
    with CountingPeer(PEER, data_delay=0.3) as peer:
        route_to(mta, peer, "limited.test")
        add_policy(mta, '[policy.domain."limited.test"]\nmax_connections = 2\n')
        mta.start()
        for number in range(10):
            send(mta, message(f"limit {number}"), [f"u{number}@limited.test"])
        wait_for_messages(peer, 10)
        mta.wait_for_empty_spool()
        # Ten jobs were due at once; without the limit the peer sees up to ten.
        assert peer.snapshot().most_open == 2
    assert mta.stop() == 0


def test_a_rate_limit_spaces_messages_evenly(mta: Mta) -> None:
    with CountingPeer(PEER) as peer:
        route_to(mta, peer, "slow.test")
        add_policy(mta, '[policy.domain."slow.test"]\nmax_rate = "5/s"\n')
        mta.start()
        for number in range(8):
            send(mta, message(f"rate {number}"), [f"u{number}@slow.test"])
        wait_for_messages(peer, 8)
        times = peer.snapshot().mail_times
    # 5/s is one message every 0.2 s, smooth (burst 1): any second holds at most
    # 1 + 5 of them (mta/policy/admission.py), never a burst of back-to-back sends.
    assert most_in_one_second(times) <= 6, times
    assert mta.stop() == 0


EGRESS = f"""
[[egress.source]]
name = "new-ip"
address = "127.0.0.2"
warmup = {{ start = "{TODAY}", schedule = [48] }}  # 2 an hour
[[egress.source]]
name = "old-ip"
address = "127.0.0.3"
[[egress.pool]]
name = "default"
sources = ["new-ip", "old-ip"]
weights = [1000, 1]
"""


def from_hour_start(*nodes: Mta) -> datetime.datetime:
    """Run the daemons from the start of this hour (libfaketime), so that a test's hourly
    warmup share cannot roll over into the next hour's; that next hour."""
    hour = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)
    for mta in nodes:
        clock = FakeClock(mta.root)
        clock.move_to(hour)
        mta.env = clock.env()
    return hour + datetime.timedelta(hours=1)


def test_warmup_cap_spills_traffic_to_the_pools_other_source(mta: Mta) -> None:
    from_hour_start(mta)
    with CountingPeer(PEER) as peer:
        route_to(mta, peer, "warm.test")
        add_policy(mta, EGRESS)
        mta.start()
        for number in range(6):
            send(mta, message(f"warm {number}"), [f"u{number}@warm.test"])
        wait_for_messages(peer, 6)
        clients = peer.snapshot().clients
    # The new address is preferred 1000:1, but may send only 2 this hour.
    assert clients.count("127.0.0.2") == 2, clients
    assert clients.count("127.0.0.3") == 4, clients
    mta.wait_for_empty_spool()
    assert mta.stop() == 0
    mta.start()  # the day's count survives a restart
    shown = json.loads(mta.cli("policy", "show", "--json").stdout)
    [new_ip] = [row for row in shown["sources"] if row["source"] == "new-ip"]
    other = new_ip["warmup"]["providers"]["other"]
    assert (other["cap_today"], other["this_hour"], other["sent_today"]) == (48, 2, 2)


def test_when_every_source_is_capped_mail_waits_instead_of_bouncing(mta: Mta) -> None:
    from_hour_start(mta)
    with CountingPeer(PEER) as peer:
        route_to(mta, peer, "warm.test")
        add_policy(
            mta, EGRESS.replace('"new-ip", "old-ip"', '"new-ip"').replace("weights = [1000, 1]", "")
        )
        mta.start()
        for number in range(3):
            send(mta, message(f"capped {number}"), [f"c{number}@warm.test"])
        wait_for_messages(peer, 2)
        eventually(lambda: "reached its warmup cap" in mta.log(), 10, mta.log, 0.1)
        [waiting] = mta.queue_list()
    assert waiting["attempts"] == 0 and "warmup cap" in waiting["last_reply"]
    assert len(peer.snapshot().clients) == 2
    assert "status=bounced" not in mta.log()
    assert mta.stop() == 0


def waiting_until(mta: Mta, hour: datetime.datetime) -> list[dict[str, Any]] | None:
    """The queue, once every job in it waits for ``hour`` (the next warmup share)."""
    queued = mta.queue_list()
    start = hour.isoformat().replace("+00:00", "")
    return queued if all(str(job["next_attempt"]) >= start for job in queued) else None


def test_a_warmup_cap_counts_recipients_across_workers(mta: Mta) -> None:
    next_hour = from_hour_start(mta)
    domains = [f"w{number}.test" for number in range(6)]
    with CountingPeer(PEER) as peer:
        route_to(mta, peer, *domains)
        mta.server["workers"] = 2  # the domains hash to both
        add_policy(
            mta,
            EGRESS.replace("schedule = [48]", "schedule = [120]")
            .replace('"new-ip", "old-ip"', '"new-ip"')
            .replace("weights = [1000, 1]", ""),
        )
        mta.start()
        for number, domain in enumerate(domains):
            send(mta, message(f"two {number}"), [f"a@{domain}", f"b@{domain}"])
        queued = eventually(
            lambda: waiting_until(mta, next_hour), 30, lambda: str(mta.queue_list())
        )
    # 12 recipients, 5 an hour: a job of two went with one, and the rest waits.
    assert peer.snapshot().recipients == 5, peer.snapshot()
    assert sum(len(job["recipients"]) for job in queued) == 7
    assert "status=bounced" not in mta.log()
    assert mta.stop() == 0


def test_a_throttling_reply_suspends_the_site_until_it_resumes_by_itself(mta: Mta) -> None:
    tss04 = "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to user complaints"
    with CountingPeer(PEER, refuse=tss04, refuse_count=1) as peer:
        route_to(mta, peer, "yahoo.test")
        add_policy(
            mta,
            '[[policy.rule]]\nname = "test-tss04"\npattern = "\\\\[TSS04\\\\]"\n'
            'classification = "rate_limited"\naction = "suspend"\nduration = 3\n',
        )
        mta.start()
        first = send(mta, message(unique()), ["a@yahoo.test"])
        eventually(lambda: "after test-tss04" in mta.log(), 10, mta.log)
        shown = json.loads(mta.cli("policy", "show", "--json").stdout)
        assert [(r["site"], r["reason"]) for r in shown["restrictions"]] == [
            ("yahoo.test", "test-tss04")
        ]
        assert "yahoo.test: suspended" in mta.cli("queue", "stats").stdout
        second = send(mta, message(unique()), ["b@yahoo.test"])
        # Nothing goes to the site while it is suspended (3 s): the new message
        # waits for the suspension, and the peer has accepted nothing yet...
        eventually(
            lambda: any(
                row["id"] == second and "suspended (test-tss04)" in str(row["last_reply"])
                for row in mta.queue_list()
            ),
            10,
            lambda: str(mta.queue_list()),
        )
        assert peer.snapshot().clients == []
        # ...then both go, by themselves.
        wait_for_messages(peer, 2, timeout=20)
        mta.wait_for_empty_spool()
        assert 'mta_throttle_events_total{rule="test-tss04"} 1.0' in mta.metrics()
    log = mta.log()
    assert re.search(rf"id={first} to=<a@yahoo\.test> .*class=rate_limited status=deferred", log)
    assert re.search(rf"id={second} to=<b@yahoo\.test> .*status=sent", log)
    assert mta.stop() == 0


def test_operator_suspends_and_resumes_a_site(mta: Mta) -> None:
    with CountingPeer(PEER) as peer:
        route_to(mta, peer, "ops.test")
        # Suspended while the daemon is down: the command works on the spool
        # either way.
        mta.start()
        assert mta.stop() == 0, mta.log()
        suspended = mta.cli("policy", "suspend", "--site", "ops.test", "--for", "1h")
        assert suspended.returncode == 0, suspended.stderr
        mta.start()
        send(mta, message(unique()), ["o@ops.test"])
        eventually(
            lambda: any("suspended (operator)" in row["last_reply"] for row in mta.queue_list()),
            10,
            lambda: str(mta.queue_list()),
            0.1,
        )
        assert peer.snapshot().clients == []
        resumed = mta.cli("policy", "resume", "--site", "ops.test")
        assert resumed.stdout.endswith("; 1 waiting jobs due now\n"), resumed
        wait_for_messages(peer, 1)  # without a flush
        mta.wait_for_empty_spool()
    assert mta.stop() == 0


def test_domains_on_one_providers_mx_share_its_limits(mta: Mta) -> None:
    """MX rollup: two domains hosted on the same provider are one site."""
    with CountingPeer(PEER, data_delay=0.3) as peer:
        dns = DnsServer(
            mx={"one.test": [(10, "mx.bigmail.test")], "two.test": [(10, "mx.bigmail.test")]},
            a={"mx.bigmail.test": PEER},
        ).start()
        try:
            mta.park_mail = False
            mta.delivery |= {
                "nameservers": [f"127.0.0.1:{dns.port}"],
                "smtp_port": peer.port,
                "allow_private_mx": True,
            }
            add_policy(
                mta,
                '[[policy.provider]]\nname = "bigmail"\nmx_suffixes = [".bigmail.test"]\n'
                "max_connections = 1\n",
            )
            mta.start()
            for number in range(3):
                send(mta, message(f"one {number}"), [f"u{number}@one.test"])
                send(mta, message(f"two {number}"), [f"u{number}@two.test"])
            wait_for_messages(peer, 6)
            assert peer.snapshot().most_open == 1  # not one per domain
        finally:
            dns.stop()
    assert mta.stop() == 0


def test_a_recipient_limit_splits_a_job_into_transactions(mta: Mta) -> None:
    with CountingPeer(PEER) as peer:
        route_to(mta, peer, "few.test")
        add_policy(mta, '[policy.domain."few.test"]\nmax_recipients = 2\n')
        mta.start()
        send(mta, message(unique()), [f"r{n}@few.test" for n in range(5)])
        wait_for_messages(peer, 3)
        mta.wait_for_empty_spool()
        assert len(peer.snapshot().clients) == 3  # 2 + 2 + 1 recipients
    assert mta.stop() == 0
