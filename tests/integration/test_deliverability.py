"""Shipped shaping and warmup against real DNS and real sockets.

A local NSD serves 500 domains behind four providers' MX names: Google's,
Yahoo's, Microsoft 365's (each domain its own MX host, as a tenant has)
and a hosting company's (one MX host set, no provider known). Each
provider's MX hosts resolve to a counting receiver of its own on loopback.
Nothing is configured about any provider: what ships must roll the domains
up into four sites and hold each to its limits, and a source on a warmup
plan must keep to its hourly share of the day's cap while the test moves
the daemon's clock (libfaketime) across a day.
"""

from __future__ import annotations

import datetime
import smtplib
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial

import pytest

from mta.policy.providers import DEFAULT_LIMITS, SHIPPED
from tests.harness.client import message
from tests.harness.counting_peer import CountingPeer
from tests.harness.dns_server import DnsServer
from tests.harness.fake_clock import FakeClock
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.integration.test_policy import add_policy

pytestmark = pytest.mark.integration

PEERS = {
    "gmail": "127.0.0.21",
    "yahoo": "127.0.0.22",
    "office365": "127.0.0.23",
    "hoster": "127.0.0.24",
}
DOMAINS_EACH = 125  # 4 x 125 = 500 domains


def domains(provider: str) -> list[str]:
    return [f"{provider}-{number:03d}.test" for number in range(DOMAINS_EACH)]


def mx_hosts(provider: str, domain: str) -> list[tuple[int, str]]:
    tenant = domain.replace(".", "-")
    return {
        "gmail": [(1, "aspmx.l.google.com"), (5, "alt1.aspmx.l.google.com")],
        "yahoo": [(1, "mta5.am0.yahoodns.net"), (1, "mta6.am0.yahoodns.net")],
        "office365": [(0, f"{tenant}.mail.protection.outlook.com")],
        "hoster": [(10, "mx1.hoster.test"), (20, "mx2.hoster.test")],
    }[provider]


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    mx, a = {}, {}
    for provider, address in PEERS.items():
        for domain in domains(provider):
            mx[domain] = mx_hosts(provider, domain)
            a.update((host, address) for _, host in mx[domain])
    server = DnsServer(mx=mx, a=a, zones=["google.com", "yahoodns.net", "outlook.com"])
    with server:
        yield server


@pytest.fixture
def peers() -> Iterator[dict[str, CountingPeer]]:
    """One receiver per provider, all on one port (the resolver's MX port)."""
    with ExitStack() as stack:
        first = stack.enter_context(CountingPeer(PEERS["gmail"], data_delay=0.1))
        found = {"gmail": first}
        for provider, address in PEERS.items():
            if provider != "gmail":
                peer = CountingPeer(address, data_delay=0.1, port=first.port)
                found[provider] = stack.enter_context(peer)
        yield found


def deliver_by_mx(mta: Mta, dns: DnsServer, peers: dict[str, CountingPeer]) -> None:
    mta.park_mail = False
    mta.delivery |= {
        "nameservers": [f"127.0.0.1:{dns.port}"],
        "smtp_port": peers["gmail"].port,
        "allow_private_mx": True,
        "retry_first": 1,
        "retry_max": 1,
    }


def submit(mta: Mta, recipients: list[str]) -> None:
    """One message per recipient, over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        for number, recipient in enumerate(recipients):
            client.sendmail("app@example.test", [recipient], message(f"m{number}"))


def shipped(name: str):  # type: ignore[no-untyped-def]
    return next(provider.limits for provider in SHIPPED if provider.name == name)


def test_shipped_shaping_rolls_500_domains_into_four_sites_within_their_limits(
    mta: Mta, dns: DnsServer, peers: dict[str, CountingPeer]
) -> None:
    deliver_by_mx(mta, dns, peers)
    mta.start()
    submit(mta, [f"user@{d}" for provider in PEERS for d in domains(provider)])
    eventually(
        lambda: sum(len(p.snapshot().subjects) for p in peers.values()) == 500,
        120,
        lambda: f"delivered {[len(p.snapshot().subjects) for p in peers.values()]}",
    )
    limits = {name: shipped(name) for name in ("gmail", "yahoo", "office365")}
    limits["hoster"] = DEFAULT_LIMITS  # one MX host set: one site, the default limits
    for provider, peer in peers.items():
        seen = peer.snapshot()
        assert len(seen.subjects) == DOMAINS_EACH
        # 125 domains, each its own site, would have opened far more at once.
        print(provider, seen.most_open, limits[provider].max_connections)
        assert seen.most_open <= limits[provider].max_connections, provider
    assert mta.stop() == 0


HOUR = datetime.timedelta(hours=1)


def test_a_warming_source_keeps_to_its_hourly_share_across_a_day(
    mta: Mta, dns: DnsServer, peers: dict[str, CountingPeer]
) -> None:
    """48 a day per provider is 2 an hour; the next day's 96 is 4 an hour."""
    clock = FakeClock(mta.root)
    day_one = datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)
    clock.move_to(day_one)
    mta.env = clock.env()
    deliver_by_mx(mta, dns, peers)
    add_policy(
        mta,
        '[[egress.source]]\nname = "new"\naddress = "127.0.0.3"\n'
        'warmup = { start = "2026-12-07", schedule = [48, 96] }\n',
    )
    mta.start()
    submit(mta, [f"user@{d}" for provider in PEERS for d in domains(provider)[:20]])
    # Hours of day one, then the first hour of day two: (the clock, sent by then).
    for moment, sent in (
        (day_one, 2),
        (day_one + 6 * HOUR, 4),
        (day_one + 12 * HOUR, 6),
        (day_one + 23 * HOUR, 8),
        (day_one + 24 * HOUR, 12),
    ):
        clock.move_to(moment + datetime.timedelta(minutes=1))
        eventually(partial(each_received, peers, sent), 30, lambda: str(_counts(peers)))
        assert set(_counts(peers).values()) == {sent}, (moment, _counts(peers))
    shown = mta.cli("policy", "show")
    assert "gmail" in shown.stdout and "day 2, cap 96 today (4 this hour)" in shown.stdout
    assert mta.stop() == 0


def each_received(peers: dict[str, CountingPeer], count: int) -> bool:
    return all(received >= count for received in _counts(peers).values())


def _counts(peers: dict[str, CountingPeer]) -> dict[str, int]:
    return {name: len(peer.snapshot().subjects) for name, peer in peers.items()}
