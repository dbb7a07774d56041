"""The MX routing rules and the resolver's caches, on a fake DNS and a fake clock."""

from __future__ import annotations

import asyncio
import pickle
import random
from collections.abc import Awaitable, Callable, Generator
from typing import TypeVar

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.mail.address import parse_ip
from mta.outbound.routes import (
    MAX_MX_HOSTS,
    MAX_TTL,
    TEMPORARY_TTL,
    Answer,
    LookupFailed,
    MxHost,
    NoSuchDomain,
    ResolveError,
    Resolver,
    Route,
    answer_from_dnspython,
    domain_key,
    ipv4_first,
    is_null_mx,
    is_public,
    order_mx,
)

T = TypeVar("T")

# Globally routable addresses (no packet is ever sent: the DNS here is fake).
PUBLIC1, PUBLIC2, PUBLIC3 = "1.2.3.4", "5.6.7.8", "9.9.9.9"
PUBLIC6 = "2606:4700::1111"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDns:
    """Answers from a table; counts the queries. Unknown names are NXDOMAIN,
    known names without the asked type are NODATA."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], Answer | Exception] = {}
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None  # when set, queries wait for it

    def mx(
        self,
        name: str,
        records: list[tuple[int, str]],
        ttl: float = 300,
        additional: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.table[(name, "MX")] = Answer(ttl=ttl, mx=tuple(records), additional=additional)

    def a(self, name: str, *addresses: str, ttl: float = 300) -> None:
        self.table[(name, "A")] = Answer(ttl=ttl, addresses=addresses)

    def aaaa(self, name: str, *addresses: str, ttl: float = 300) -> None:
        self.table[(name, "AAAA")] = Answer(ttl=ttl, addresses=addresses)

    def fail(self, name: str, rdtype: str, error: Exception) -> None:
        self.table[(name, rdtype)] = error

    def count(self, name: str, rdtype: str) -> int:
        return self.calls.count((name, rdtype))

    async def __call__(self, name: str, rdtype: str) -> Answer:
        self.calls.append((name, rdtype))
        if self.gate is not None:
            await self.gate.wait()
        result = self.table.get((name, rdtype))
        if isinstance(result, Exception):
            raise result
        if result is not None:
            return result
        if any(known == name for known, _ in self.table):
            return Answer(ttl=30)  # NODATA, negative TTL from the SOA
        raise NoSuchDomain(ttl=30)


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


def make(fake: FakeDns, clock: Clock | None = None, **options: object) -> Resolver:
    return Resolver(
        lookup=fake,
        clock=clock or Clock(),
        rng=random.Random(1),
        **options,  # type: ignore[arg-type]
    )


def route_error(resolver: Resolver, domain: str) -> ResolveError:
    with pytest.raises(ResolveError) as caught:
        run(resolver.route(domain))
    return caught.value


# --- ordering, null MX, addresses: the pure rules ---


def test_mx_records_are_ordered_by_preference() -> None:
    records = [(30, "c.test"), (10, "a.test"), (20, "b.test")]
    assert order_mx(records, random.Random(0)) == [(10, "a.test"), (20, "b.test"), (30, "c.test")]


def test_equal_preferences_are_shuffled_by_the_given_rng() -> None:
    records = [(10, "a.test"), (10, "b.test"), (10, "c.test"), (5, "first.test")]
    orders = {tuple(order_mx(records, random.Random(seed))) for seed in range(40)}
    assert len(orders) > 1  # some seeds give another order
    for order in orders:
        assert order[0] == (5, "first.test")
        assert sorted(order[1:]) == [(10, "a.test"), (10, "b.test"), (10, "c.test")]
    # The same seed gives the same order, whatever order the records came in.
    assert order_mx(records, random.Random(7)) == order_mx(records[::-1], random.Random(7))


def test_a_host_listed_twice_keeps_its_best_preference_and_root_targets_are_dropped() -> None:
    records = [(20, "a.test"), (10, "a.test"), (5, "."), (30, "b.test")]
    assert order_mx(records, random.Random(0)) == [(10, "a.test"), (30, "b.test")]


def test_at_most_max_mx_hosts_are_kept() -> None:
    records = [(n, f"mx{n}.test") for n in range(MAX_MX_HOSTS + 5)]
    assert len(order_mx(records, random.Random(0))) == MAX_MX_HOSTS


@given(st.lists(st.tuples(st.integers(0, 65535), st.sampled_from("abcdefgh")), max_size=8))
def test_ordering_keeps_every_host_once_in_preference_order(
    records: list[tuple[int, str]],
) -> None:
    ordered = order_mx(records, random.Random(0))
    assert [preference for preference, _ in ordered] == sorted(p for p, _ in ordered)
    assert {host for _, host in ordered} == {host for _, host in records}
    assert len(ordered) == len({host for _, host in ordered})


def test_null_mx_is_a_lone_root_target() -> None:
    assert is_null_mx([(0, ".")])
    assert not is_null_mx([(0, "."), (10, "mx.test")])
    assert not is_null_mx([(0, "mx.test")])
    assert not is_null_mx([])


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "not an address",
    ],
)
def test_private_loopback_and_reserved_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", [PUBLIC1, "8.8.8.8", PUBLIC6, "::ffff:1.2.3.4"])
def test_global_addresses_are_public(address: str) -> None:
    assert is_public(address)


def test_ipv4_addresses_come_first_without_duplicates() -> None:
    addresses = ["2001:db8::1", "1.2.3.4", "2001:db8::2", "5.6.7.8", "1.2.3.4"]
    assert ipv4_first(addresses) == ("1.2.3.4", "5.6.7.8", "2001:db8::1", "2001:db8::2")


@pytest.mark.parametrize(
    ("text", "ip"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("[10.0.0.1]", "10.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("relay.test", None),
        ("[relay.test]", None),
        ("10.0.0", None),
    ],
)
def test_ip_literals_are_recognised(text: str, ip: str | None) -> None:
    assert parse_ip(text) == ip


def test_domains_are_normalised_to_what_dns_knows() -> None:
    assert domain_key("Example.TEST.") == "example.test"
    assert domain_key("bücher.test") == "xn--bcher-kva.test"


@pytest.mark.parametrize("domain", ["", ".", "bad..test", "-bad.test", "bad-.test", "a b.test"])
def test_invalid_domains_are_refused_for_good(domain: str) -> None:
    error = route_error(make(FakeDns()), domain)
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert "is not a valid domain name" in str(error)


def test_an_over_long_label_is_invalid() -> None:
    with pytest.raises(ResolveError):
        domain_key("a" * 64 + ".test")


# --- routes from MX records ---


def test_route_tries_mx_hosts_by_preference_with_ipv4_first() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(20, "mx2.example.net"), (10, "mx1.example.net")])
    fake.a("mx1.example.net", PUBLIC1)
    fake.aaaa("mx1.example.net", PUBLIC6)
    fake.a("mx2.example.net", PUBLIC2)
    route = run(make(fake, smtp_port=2525).route("Example.NET."))
    assert route == Route(
        "example.net",
        (
            MxHost("mx1.example.net", 10, (PUBLIC1, PUBLIC6), 2525),
            MxHost("mx2.example.net", 20, (PUBLIC2,), 2525),
        ),
    )


def test_the_additional_section_saves_the_address_queries() -> None:
    fake = FakeDns()
    additional = (("mx1.example.net", PUBLIC6), ("mx1.example.net", PUBLIC1))
    fake.mx(
        "example.net", [(10, "mx1.example.net"), (20, "mx2.example.net")], additional=additional
    )
    fake.a("mx2.example.net", PUBLIC2)
    route = run(make(fake).route("example.net"))
    assert [host.addresses for host in route.hosts] == [(PUBLIC1, PUBLIC6), (PUBLIC2,)]
    assert fake.count("mx1.example.net", "A") == fake.count("mx1.example.net", "AAAA") == 0
    assert fake.count("mx2.example.net", "A") == 1


def test_hosts_without_addresses_are_skipped() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "gone.example.net"), (20, "mx.example.net")])
    fake.a("mx.example.net", PUBLIC1)
    route = run(make(fake).route("example.net"))
    assert [host.name for host in route.hosts] == ["mx.example.net"]


def test_a_host_whose_lookup_failed_is_skipped_when_another_works() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "broken.example.net"), (20, "mx.example.net")])
    fake.fail("broken.example.net", "A", LookupFailed("SERVFAIL"))
    fake.fail("broken.example.net", "AAAA", LookupFailed("SERVFAIL"))
    fake.a("mx.example.net", PUBLIC1)
    route = run(make(fake).route("example.net"))
    assert [host.name for host in route.hosts] == ["mx.example.net"]


def test_a_failed_ipv6_lookup_keeps_the_ipv4_addresses() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "mx.example.net")])
    fake.a("mx.example.net", PUBLIC1)
    fake.fail("mx.example.net", "AAAA", LookupFailed("timed out"))
    assert run(make(fake).route("example.net")).hosts[0].addresses == (PUBLIC1,)


def test_mx_hosts_without_any_address_are_a_permanent_failure() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "gone1.example.net"), (20, "gone2.example.net")])
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert str(error) == "MX hosts of example.net have no addresses"


def test_mx_hosts_whose_lookups_failed_are_a_temporary_failure() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "broken.example.net"), (20, "gone.example.net")])
    fake.fail("broken.example.net", "A", LookupFailed("SERVFAIL"))
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert "broken.example.net: SERVFAIL" in str(error)


def test_null_mx_refuses_mail_for_good() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(0, ".")])
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("5.1.10", True)
    assert str(error) == "example.net does not accept mail (null MX, RFC 7505)"
    assert fake.calls == [("example.net", "MX")]


def test_no_mx_records_means_the_domain_itself_is_the_mx() -> None:
    fake = FakeDns()
    fake.a("example.net", PUBLIC1)  # the name exists: its MX query is NODATA
    route = run(make(fake).route("example.net"))
    assert route == Route("example.net", (MxHost("example.net", 0, (PUBLIC1,), 25),), implicit=True)


def test_no_mx_and_no_address_is_a_permanent_failure() -> None:
    fake = FakeDns()
    fake.table[("example.net", "TXT")] = Answer(ttl=300)  # the name exists, with neither
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert str(error) == "domain example.net has no MX and no address records"


def test_a_domain_that_does_not_exist_is_a_permanent_failure() -> None:
    error = route_error(make(FakeDns()), "example.invalid")
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert str(error) == "domain example.invalid does not exist"


def test_a_failed_mx_lookup_is_a_temporary_failure() -> None:
    fake = FakeDns()
    fake.fail("example.net", "MX", LookupFailed("127.0.0.1@53 answered SERVFAIL"))
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert str(error) == (
        "cannot look up the MX records of example.net: 127.0.0.1@53 answered SERVFAIL"
    )


# --- private addresses ---


def test_private_mx_addresses_are_dropped() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "inside.example.net"), (20, "mx.example.net")])
    fake.a("inside.example.net", "10.0.0.5", "127.0.0.1")
    fake.a("mx.example.net", "192.168.1.1", PUBLIC1)
    fake.aaaa("mx.example.net", "fd00::1", PUBLIC6)
    route = run(make(fake).route("example.net"))
    assert route.hosts == (MxHost("mx.example.net", 20, (PUBLIC1, PUBLIC6), 25),)


def test_mx_hosts_with_only_private_addresses_are_a_temporary_failure() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "mx.example.net")])
    fake.a("mx.example.net", "127.0.0.1")
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("4.4.4", False)
    assert "resolve only to private or loopback addresses" in str(error)
    assert "[delivery] allow_private_mx" in str(error)


def test_allow_private_keeps_private_addresses() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "mx.example.net")])
    fake.a("mx.example.net", "127.0.0.1")
    route = run(make(fake, allow_private=True).route("example.net"))
    assert route.hosts[0].addresses == ("127.0.0.1",)


def test_an_implicit_mx_with_only_private_addresses_is_a_temporary_failure() -> None:
    fake = FakeDns()
    fake.a("example.net", "10.0.0.1")
    error = route_error(make(fake), "example.net")
    assert (error.status, error.permanent) == ("4.4.4", False)
    assert "[delivery] allow_private_mx" in str(error)


def test_an_address_literal_is_routed_to_that_address_if_public() -> None:
    resolver = make(FakeDns(), smtp_port=2525)
    route = run(resolver.route("[1.2.3.4]"))
    assert route == Route("[1.2.3.4]", (MxHost(PUBLIC1, 0, (PUBLIC1,), 2525),))
    error = route_error(resolver, "[127.0.0.1]")
    assert (error.status, error.permanent) == ("4.4.4", False)
    route = run(make(FakeDns(), allow_private=True).route("[ipv6:::1]"))
    assert route.hosts[0].addresses == ("::1",)


# --- static routes ---


def test_an_exact_static_route_wins_over_the_wildcard() -> None:
    routes = {"example.net": ("10.0.0.1", 2525), "*": ("[10.0.0.2]", 25)}
    fake = FakeDns()
    resolver = make(fake, routes=routes)
    assert run(resolver.route("EXAMPLE.net")) == Route(
        "example.net", (MxHost("10.0.0.1", 0, ("10.0.0.1",), 2525),), static=True
    )
    other = run(resolver.route("other.net"))
    assert other.hosts == (MxHost("10.0.0.2", 0, ("10.0.0.2",), 25),) and other.static
    assert fake.calls == []


def test_a_static_route_to_a_name_uses_its_addresses_private_or_not() -> None:
    fake = FakeDns()
    fake.a("relay.internal.test", "10.1.1.1")
    fake.aaaa("relay.internal.test", "fd00::1")
    resolver = make(fake, routes={"*": ("Relay.Internal.Test.", 587)})
    route = run(resolver.route("example.net"))
    host = MxHost("relay.internal.test", 0, ("10.1.1.1", "fd00::1"), 587)
    assert route == Route("example.net", (host,), static=True)
    # no MX lookup, and one address lookup shared by every domain
    assert run(resolver.route("example.org")).hosts == (host,)
    assert sorted(set(fake.calls)) == [
        ("relay.internal.test", "A"),
        ("relay.internal.test", "AAAA"),
    ]
    assert len(fake.calls) == 2


def test_a_static_route_host_that_does_not_resolve_is_only_a_temporary_failure() -> None:
    resolver = make(FakeDns(), routes={"*": ("relay.invalid", 25)})
    error = route_error(resolver, "example.net")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert str(error) == "the static route host relay.invalid has no addresses"


def test_a_static_route_to_an_impossible_host_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="neither an IP address nor a host name"):
        make(FakeDns(), routes={"*": ("bad host", 25)})


# --- caching ---


def test_a_route_is_cached_for_the_smallest_ttl_involved() -> None:
    fake, clock = FakeDns(), Clock()
    fake.mx("example.net", [(10, "mx.example.net")], ttl=300)
    fake.a("mx.example.net", PUBLIC1, ttl=60)
    fake.aaaa("mx.example.net", PUBLIC6, ttl=120)
    resolver = make(fake, clock)
    run(resolver.route("example.net"))
    clock.now += 59
    run(resolver.route("example.net"))
    assert fake.count("example.net", "MX") == 1 and fake.count("mx.example.net", "A") == 1
    clock.now += 2
    run(resolver.route("example.net"))
    assert fake.count("example.net", "MX") == 2 and fake.count("mx.example.net", "A") == 2


def test_cache_lifetimes_are_at_least_a_second_and_at_most_a_day() -> None:
    fake, clock = FakeDns(), Clock()
    fake.mx("zero.test", [(10, "mx.zero.test")], ttl=0)
    fake.a("mx.zero.test", PUBLIC1, ttl=0)
    fake.mx("huge.test", [(10, "mx.huge.test")], ttl=10**8)
    fake.a("mx.huge.test", PUBLIC1, ttl=10**8)
    fake.aaaa("mx.huge.test", PUBLIC6, ttl=10**8)
    resolver = make(fake, clock)
    run(resolver.route("zero.test"))
    run(resolver.route("huge.test"))
    clock.now += 0.9
    run(resolver.route("zero.test"))
    assert fake.count("zero.test", "MX") == 1
    clock.now += 0.2
    run(resolver.route("zero.test"))
    assert fake.count("zero.test", "MX") == 2
    clock.now += MAX_TTL - 2
    run(resolver.route("huge.test"))
    assert fake.count("huge.test", "MX") == 1
    clock.now += 2
    run(resolver.route("huge.test"))
    assert fake.count("huge.test", "MX") == 2


def test_a_permanent_failure_is_cached_for_negative_ttl_or_the_soa_ttl_if_shorter() -> None:
    fake, clock = FakeDns(), Clock()
    fake.fail("gone.test", "MX", NoSuchDomain(ttl=None))
    fake.fail("short.test", "MX", NoSuchDomain(ttl=10))
    resolver = make(fake, clock, negative_ttl=60)
    for domain in ("gone.test", "short.test"):
        route_error(resolver, domain)
    clock.now += 11
    for domain in ("gone.test", "short.test"):
        route_error(resolver, domain)
    assert fake.count("gone.test", "MX") == 1 and fake.count("short.test", "MX") == 2
    clock.now += 50
    route_error(resolver, "gone.test")
    assert fake.count("gone.test", "MX") == 2


def test_a_temporary_failure_is_cached_only_briefly() -> None:
    fake, clock = FakeDns(), Clock()
    fake.fail("example.net", "MX", LookupFailed("SERVFAIL"))
    resolver = make(fake, clock, negative_ttl=600)
    route_error(resolver, "example.net")
    clock.now += TEMPORARY_TTL - 0.5
    route_error(resolver, "example.net")
    assert fake.count("example.net", "MX") == 1
    clock.now += 1
    fake.mx("example.net", [(10, "mx.example.net")])  # the DNS recovered
    fake.a("mx.example.net", PUBLIC1)
    assert run(resolver.route("example.net")).hosts[0].addresses == (PUBLIC1,)


def test_a_route_missing_a_host_for_now_is_kept_at_most_negative_ttl() -> None:
    fake, clock = FakeDns(), Clock()
    fake.mx("example.net", [(10, "broken.example.net"), (20, "mx.example.net")], ttl=3600)
    fake.fail("broken.example.net", "A", LookupFailed("SERVFAIL"))
    fake.a("mx.example.net", PUBLIC1, ttl=3600)
    fake.aaaa("mx.example.net", PUBLIC6, ttl=3600)
    resolver = make(fake, clock, negative_ttl=60)
    run(resolver.route("example.net"))
    clock.now += 59
    run(resolver.route("example.net"))
    assert fake.count("example.net", "MX") == 1
    clock.now += 2
    run(resolver.route("example.net"))
    assert fake.count("example.net", "MX") == 2


def test_domains_on_the_same_mx_hosts_share_the_address_lookups() -> None:
    fake = FakeDns()
    for domain in ("one.test", "two.test", "three.test"):
        fake.mx(domain, [(10, "mx.provider.test")])
    fake.a("mx.provider.test", PUBLIC1)
    resolver = make(fake)
    for domain in ("one.test", "two.test", "three.test"):
        assert run(resolver.route(domain)).hosts[0].addresses == (PUBLIC1,)
    assert fake.count("mx.provider.test", "A") == 1


def test_a_resolve_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ResolveError("4.4.3", "no answer", permanent=False)))
    assert (error.status, str(error), error.permanent) == ("4.4.3", "no answer", False)


def test_a_cached_failure_is_raised_as_a_fresh_exception() -> None:
    resolver = make(FakeDns())
    first, second = route_error(resolver, "gone.test"), route_error(resolver, "gone.test")
    assert first is not second
    assert repr(first) == repr(second)


def test_expired_entries_are_swept_out() -> None:
    fake, clock = FakeDns(), Clock()
    resolver = make(fake, clock, negative_ttl=10)
    for n in range(20):
        route_error(resolver, f"gone{n}.test")
    clock.now += 3600
    route_error(resolver, "last.test")
    assert len(resolver._routes) == 1


# --- one lookup for concurrent callers ---


def test_concurrent_routes_for_one_domain_share_one_lookup() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "mx.example.net")])
    fake.a("mx.example.net", PUBLIC1)
    resolver = make(fake)

    async def main() -> list[Route]:
        fake.gate = asyncio.Event()
        waiting = [asyncio.create_task(resolver.route("example.net")) for _ in range(20)]
        await _until(lambda: len(fake.calls) >= 1)
        fake.gate.set()
        return await asyncio.gather(*waiting)

    routes = asyncio.run(main())
    assert all(route == routes[0] for route in routes)
    assert fake.count("example.net", "MX") == 1 and fake.count("mx.example.net", "A") == 1


def test_concurrent_failures_are_shared_too() -> None:
    fake = FakeDns()
    fake.fail("example.net", "MX", LookupFailed("SERVFAIL"))
    resolver = make(fake)

    async def main() -> list[BaseException | Route]:
        fake.gate = asyncio.Event()
        waiting = [asyncio.create_task(resolver.route("example.net")) for _ in range(5)]
        await _until(lambda: len(fake.calls) >= 1)
        fake.gate.set()
        return await asyncio.gather(*waiting, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(result, ResolveError) for result in results)
    assert fake.count("example.net", "MX") == 1


def test_a_cancelled_caller_does_not_cancel_the_shared_lookup() -> None:
    fake = FakeDns()
    fake.mx("example.net", [(10, "mx.example.net")])
    fake.a("mx.example.net", PUBLIC1)
    resolver = make(fake)

    async def main() -> Route:
        fake.gate = asyncio.Event()
        impatient = asyncio.create_task(resolver.route("example.net"))
        patient = asyncio.create_task(resolver.route("example.net"))
        await _until(lambda: len(fake.calls) >= 1)
        impatient.cancel()
        await asyncio.gather(impatient, return_exceptions=True)
        fake.gate.set()
        return await patient

    assert asyncio.run(main()).hosts[0].addresses == (PUBLIC1,)
    assert fake.count("example.net", "MX") == 1


class _Turn:
    """Awaiting it gives the other tasks one turn of the event loop; no timer."""

    def __await__(self) -> Generator[None, None, None]:
        yield


async def _until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (bounded)."""
    for _ in range(1000):
        if condition():
            return
        await _Turn()
    raise AssertionError("condition never became true")


# --- reading dnspython's answers (parsed from text: no sockets) ---

MX_RESPONSE = """\
id 1
opcode QUERY
rcode NOERROR
flags QR AA RD
;QUESTION
example.test. IN MX
;ANSWER
example.test. 300 IN MX 10 MX1.example.test.
example.test. 300 IN MX 20 mx2.example.test.
;AUTHORITY
example.test. 300 IN NS ns.example.test.
;ADDITIONAL
mx1.example.test. 120 IN A 127.0.0.10
mx1.example.test. 240 IN AAAA ::1
ns.example.test. 5 IN A 127.0.0.53
"""

NODATA_RESPONSE = """\
id 1
opcode QUERY
rcode NOERROR
flags QR AA RD
;QUESTION
example.test. IN MX
;ANSWER
;AUTHORITY
test. 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 30
"""

NULL_MX_RESPONSE = """\
id 1
opcode QUERY
rcode NOERROR
flags QR AA RD
;QUESTION
nullmx.test. IN MX
;ANSWER
nullmx.test. 300 IN MX 0 .
"""


def dnspython_answer(text: str, name: str, rdtype: str) -> dns.resolver.Answer:
    response = dns.message.from_text(text)
    assert isinstance(response, dns.message.QueryMessage)
    return dns.resolver.Answer(
        dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, response
    )


def test_an_mx_answer_keeps_the_mx_hosts_addresses_from_the_additional_section() -> None:
    raw = dnspython_answer(MX_RESPONSE, "example.test", "MX")
    now = raw.expiration - 300
    answer = answer_from_dnspython(raw, now)
    assert answer.mx == ((10, "mx1.example.test"), (20, "mx2.example.test"))
    # the name server's address is not an MX host's: neither kept nor counted
    assert answer.additional == (("mx1.example.test", "127.0.0.10"), ("mx1.example.test", "::1"))
    assert answer.ttl == pytest.approx(120)


def test_ttls_count_down_from_when_the_answer_was_received() -> None:
    raw = dnspython_answer(MX_RESPONSE, "example.test", "MX")
    received = raw.expiration - 300
    assert answer_from_dnspython(raw, received + 100).ttl == pytest.approx(20)


def test_an_empty_answer_lives_for_the_soa_negative_ttl() -> None:
    raw = dnspython_answer(NODATA_RESPONSE, "example.test", "MX")
    answer = answer_from_dnspython(raw, raw.expiration - 30)
    assert answer.mx == () and answer.addresses == ()
    assert answer.ttl == pytest.approx(30)


def test_a_null_mx_target_reads_as_the_root() -> None:
    raw = dnspython_answer(NULL_MX_RESPONSE, "nullmx.test", "MX")
    assert answer_from_dnspython(raw, raw.expiration).mx == ((0, "."),)
