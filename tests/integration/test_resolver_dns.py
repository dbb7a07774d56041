"""The resolver against a real authoritative DNS server (NSD) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator

import pytest

from mta.outbound.routes import MxHost, ResolveError, Resolver, Route
from tests.harness.dns_server import DnsServer

pytestmark = pytest.mark.integration

RECORDS = {
    "mx": {
        "example.test": [
            (20, "mx2.example.test"),
            (10, "mx1.example.test"),
            (20, "mx3.example.test"),
        ],
        # NSD sends no additional addresses for a host in another zone: asked for.
        "offzone.test": [(10, "mx.offzone.invalid")],
        "cnamed.test": [(10, "alias.cnamed.test")],
        "nullmx.test": [(0, ".")],
        "noaddr.test": [(10, "gone.noaddr.test")],
        "halfbroken.test": [(10, "mx.broken.test"), (20, "mx2.example.test")],
        "allbroken.test": [(10, "mx.broken.test")],
        "public.test": [(10, "mx.public.test")],
    },
    "a": {
        "mx1.example.test": "127.0.0.10",
        "mx2.example.test": "127.0.0.11",
        "mx3.example.test": "127.0.0.12",
        "mx.offzone.invalid": "127.0.0.13",
        "real.cnamed.test": "127.0.0.14",
        "implicit.test": ["127.0.0.20", "127.0.0.21"],
        "relay.test": "127.0.0.30",
        "mx.public.test": ["127.0.0.40", "1.2.3.4"],
    },
    "aaaa": {"mx1.example.test": "::1"},
    "cname": {"alias.cnamed.test": "real.cnamed.test"},
    "servfail": ["broken.test"],
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(**RECORDS) as running:  # type: ignore[arg-type]
        yield running


def resolver(server: DnsServer, **options: object) -> Resolver:
    settings: dict[str, object] = {
        "nameservers": [("127.0.0.1", server.port)],
        "allow_private": True,
        "timeout": 2.0,
        "rng": random.Random(1),
    }
    settings.update(options)
    return Resolver(**settings)  # type: ignore[arg-type]


def route(resolver: Resolver, domain: str) -> Route:
    return asyncio.run(resolver.route(domain))


def route_error(resolver: Resolver, domain: str) -> ResolveError:
    with pytest.raises(ResolveError) as caught:
        route(resolver, domain)
    return caught.value


def test_mx_hosts_come_in_preference_order(server: DnsServer) -> None:
    result = route(resolver(server, smtp_port=2525), "example.test")
    assert not result.implicit and not result.static
    assert result.hosts[0] == MxHost("mx1.example.test", 10, ("127.0.0.10", "::1"), 2525)
    assert {host.name for host in result.hosts[1:]} == {"mx2.example.test", "mx3.example.test"}
    assert [host.preference for host in result.hosts] == [10, 20, 20]
    assert {host.addresses for host in result.hosts[1:]} == {("127.0.0.11",), ("127.0.0.12",)}


def test_equal_preferences_are_tried_in_either_order(server: DnsServer) -> None:
    seconds = {
        route(resolver(server, rng=random.Random(seed)), "example.test").hosts[1].name
        for seed in range(20)
    }
    assert seconds == {"mx2.example.test", "mx3.example.test"}


def test_mx_hosts_outside_the_answer_are_looked_up(server: DnsServer) -> None:
    assert route(resolver(server), "offzone.test").hosts == (
        MxHost("mx.offzone.invalid", 10, ("127.0.0.13",), 25),
    )


def test_an_mx_host_behind_a_cname_is_followed(server: DnsServer) -> None:
    assert route(resolver(server), "cnamed.test").hosts[0].addresses == ("127.0.0.14",)


def test_no_mx_means_the_domain_itself(server: DnsServer) -> None:
    result = route(resolver(server), "implicit.test")
    assert result == Route(
        "implicit.test",
        (MxHost("implicit.test", 0, ("127.0.0.20", "127.0.0.21"), 25),),
        implicit=True,
    )


def test_null_mx_is_a_permanent_failure(server: DnsServer) -> None:
    error = route_error(resolver(server), "nullmx.test")
    assert (error.status, error.permanent) == ("5.1.10", True)
    assert str(error) == "nullmx.test does not accept mail (null MX, RFC 7505)"


@pytest.mark.parametrize("domain", ["nope.test", "example.invalid"])
def test_a_domain_that_does_not_exist_is_a_permanent_failure(
    server: DnsServer, domain: str
) -> None:
    error = route_error(resolver(server), domain)
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert str(error) == f"domain {domain} does not exist"


def test_mx_hosts_that_do_not_exist_are_a_permanent_failure(server: DnsServer) -> None:
    error = route_error(resolver(server), "noaddr.test")
    assert (error.status, error.permanent) == ("5.1.2", True)


def test_servfail_is_a_temporary_failure(server: DnsServer) -> None:
    error = route_error(resolver(server), "broken.test")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert f"127.0.0.1@{server.port} answered SERVFAIL" in str(error)


def test_an_mx_host_that_fails_is_skipped_if_another_works(server: DnsServer) -> None:
    result = route(resolver(server), "halfbroken.test")
    assert [host.name for host in result.hosts] == ["mx2.example.test"]
    error = route_error(resolver(server), "allbroken.test")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert "mx.broken.test" in str(error)


def test_a_name_server_that_never_answers_is_a_temporary_failure() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        slow = Resolver(nameservers=[("127.0.0.1", port)], timeout=0.5)
        error = route_error(slow, "example.test")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert str(error) == "cannot look up the MX records of example.test: no answer within 0.5 s"


def test_loopback_mx_hosts_need_allow_private(server: DnsServer) -> None:
    strict = resolver(server, allow_private=False)
    error = route_error(strict, "example.test")
    assert (error.status, error.permanent) == ("4.4.4", False)
    assert "[delivery] allow_private_mx" in str(error)
    # a host with a public address keeps only that one
    assert route(strict, "public.test").hosts[0].addresses == ("1.2.3.4",)


def test_static_routes_to_a_name_and_to_an_ip(server: DnsServer) -> None:
    routes = {"example.test": ("relay.test", 2525), "*": ("[127.0.0.99]", 25)}
    static = resolver(server, allow_private=False, routes=routes)
    assert route(static, "example.test") == Route(
        "example.test", (MxHost("relay.test", 0, ("127.0.0.30",), 2525),), static=True
    )
    assert route(static, "nullmx.test") == Route(
        "nullmx.test", (MxHost("127.0.0.99", 0, ("127.0.0.99",), 25),), static=True
    )
    missing = resolver(server, routes={"*": ("relay.nope.test", 25)})
    error = route_error(missing, "example.test")
    assert (error.status, error.permanent) == ("4.4.3", False)


def test_a_cached_route_outlives_the_dns_server_until_its_ttl() -> None:
    now = [0.0]
    server = DnsServer(
        mx={"cached.test": [(10, "mx.cached.test")]},
        a={"mx.cached.test": "127.0.0.50"},
        aaaa={"mx.cached.test": "::1"},
        ttl=300,
    )
    with server:
        cached = resolver(server, timeout=0.5, clock=lambda: now[0])
        first = route(cached, "cached.test")
    now[0] = 299.0
    assert route(cached, "cached.test") == first
    # the server is really gone: anything not cached fails now
    assert route_error(cached, "other.test").status == "4.4.3"
    now[0] = 301.0
    error = route_error(cached, "cached.test")
    assert (error.status, error.permanent) == ("4.4.3", False)
