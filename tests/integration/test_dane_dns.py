"""DANE lookups through a real validating resolver (unbound) over signed zones served by NSD."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import dns.flags
import dns.rcode
import pytest

from mta.outbound.dane import Dane, DaneResult, HostDane, HostStatus, dane_policy
from mta.outbound.routes import ResolveError, Resolver
from mta.policy.tls import Level, Tlsa
from tests.harness.validating_resolver import Security, ValidatingResolver, Zone

pytestmark = pytest.mark.integration

EE = Tlsa(3, 1, 1, bytes(range(32)))
TA = Tlsa(2, 0, 2, bytes(range(64)))
PKIX_EE = Tlsa(1, 1, 1, bytes(range(32)))


def tlsa(record: Tlsa) -> str:
    return f"{record.usage} {record.selector} {record.matching_type} {record.data.hex()}"


SIGNED = Zone(
    "dane.test",
    (
        "@ MX 10 mx",
        "mx A 127.0.0.1",
        f"_25._tcp.mx TLSA {tlsa(EE)}",
        f"_25._tcp.mx TLSA {tlsa(TA)}",
        f"_25._tcp.mx TLSA {tlsa(PKIX_EE)}",
        "notlsa MX 10 mx2",
        "mx2 A 127.0.0.2",
        "unusable MX 10 mx3",
        "mx3 A 127.0.0.3",
        f"_25._tcp.mx3 TLSA {tlsa(PKIX_EE)}",
        "aliased MX 10 alias",
        "alias CNAME mx",
        "mixed MX 10 mx",
        "mixed MX 20 mx.plain.test.",
        "mixed MX 30 mx.expired.test.",
        "implicit A 127.0.0.4",
        f"_25._tcp.implicit TLSA {tlsa(EE)}",
    ),
)
UNSIGNED = Zone(
    "plain.test",
    ("@ MX 10 mx", "mx A 127.0.0.5", f"_25._tcp.mx TLSA {tlsa(EE)}"),
    Security.UNSIGNED,
)
EXPIRED = Zone(
    "expired.test",
    ("@ MX 10 mx", "mx A 127.0.0.6", f"_25._tcp.mx TLSA {tlsa(EE)}"),
    Security.EXPIRED,
)


@pytest.fixture(scope="module")
def resolver() -> Iterator[ValidatingResolver]:
    with ValidatingResolver([SIGNED, UNSIGNED, EXPIRED]) as running:
        yield running


def lookup(resolver: ValidatingResolver, domain: str, **options: object) -> DaneResult:
    """Route the domain as delivery does, then look up DANE for the route's hosts."""
    routes = Resolver(nameservers=[resolver.address], allow_private=True, timeout=2.0)
    dane = Dane([resolver.address], timeout=2.0, **options)  # type: ignore[arg-type]

    async def both() -> DaneResult:
        route = await routes.route(domain)
        return await dane.tlsa(route.domain, [host.name for host in route.hosts])

    return asyncio.run(both())


def status(result: DaneResult) -> dict[str, HostStatus]:
    return {host: dane.status for host, dane in result.hosts.items()}


def test_validated_mx_and_tlsa_give_the_usable_records(resolver: ValidatingResolver) -> None:
    result = lookup(resolver, "dane.test")
    assert result.mx_validated
    assert result.hosts["mx.dane.test"].status is HostStatus.DANE
    assert set(result.hosts["mx.dane.test"].records) == {EE, TA}  # not the PKIX one
    policy = dane_policy(result)
    assert policy is not None and policy.level is Level.DANE
    assert set(policy.tlsa) == {"mx.dane.test"}


def test_validated_mx_without_tlsa_means_no_dane(resolver: ValidatingResolver) -> None:
    result = lookup(resolver, "notlsa.dane.test")
    assert result.mx_validated
    assert status(result) == {"mx2.dane.test": HostStatus.NONE}
    assert dane_policy(result) is None


def test_only_unusable_records_still_require_tls(resolver: ValidatingResolver) -> None:
    result = lookup(resolver, "unusable.dane.test")
    assert status(result) == {"mx3.dane.test": HostStatus.DANE}
    assert "TLS without authentication" in result.hosts["mx3.dane.test"].reason


def test_a_cname_mx_host_finds_the_records_where_it_leads(resolver: ValidatingResolver) -> None:
    result = lookup(resolver, "aliased.dane.test")
    assert result.hosts["alias.dane.test"].status is HostStatus.DANE


def test_a_domain_without_mx_is_its_own_dane_host(resolver: ValidatingResolver) -> None:
    result = lookup(resolver, "implicit.dane.test")
    assert result.hosts == {"implicit.dane.test": HostDane(HostStatus.DANE, (EE,))}


def test_an_unsigned_zone_gets_no_dane_even_with_tlsa_records(
    resolver: ValidatingResolver,
) -> None:
    answer = resolver.query("_25._tcp.mx.plain.test.", "TLSA")
    assert answer.answer and not answer.flags & dns.flags.AD  # there, but insecure
    result = lookup(resolver, "plain.test")
    assert not result.mx_validated
    assert status(result) == {"mx.plain.test": HostStatus.NONE}
    assert dane_policy(result) is None


def test_a_bogus_zone_fails_and_its_delivery_waits(resolver: ValidatingResolver) -> None:
    assert resolver.query("expired.test.", "MX").rcode() == dns.rcode.SERVFAIL
    with pytest.raises(ResolveError) as caught:  # routing it through unbound fails too
        lookup(resolver, "expired.test")
    assert not caught.value.permanent
    # Had the route come from a resolver that does not validate, its host would wait.
    dane = Dane([resolver.address], timeout=2.0)
    result = asyncio.run(dane.tlsa("expired.test", ["mx.expired.test"]))
    assert status(result) == {"mx.expired.test": HostStatus.FAILED}
    assert "SERVFAIL" in result.failed["mx.expired.test"]


def test_each_host_of_a_validated_mx_gets_its_own_verdict(resolver: ValidatingResolver) -> None:
    result = asyncio.run(
        Dane([resolver.address], timeout=2.0).tlsa(
            "mixed.dane.test", ["mx.dane.test", "mx.plain.test", "mx.expired.test"]
        )
    )
    assert result.mx_validated
    assert status(result) == {
        "mx.dane.test": HostStatus.DANE,
        "mx.plain.test": HostStatus.NONE,  # its addresses are insecure
        "mx.expired.test": HostStatus.FAILED,  # its addresses are bogus
    }
    policy = dane_policy(result)
    assert policy is not None and set(policy.tlsa) == {"mx.dane.test"}
    assert set(result.failed) == {"mx.expired.test"}


@pytest.mark.parametrize("validating", [False, [("127.0.0.1", 1)]])
def test_the_ad_bit_of_a_resolver_not_listed_as_validating_is_ignored(
    resolver: ValidatingResolver, validating: object
) -> None:
    assert resolver.query("dane.test.", "MX").flags & dns.flags.AD  # it did validate
    result = lookup(resolver, "dane.test", validating=validating)
    assert not result.mx_validated
    assert status(result) == {"mx.dane.test": HostStatus.NONE}
