"""DANE lookups (RFC 7672 2.2): turning DNS answers into per-host verdicts, on a fake DNS."""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rrset
import pytest

from mta.outbound.dane import (
    Dane,
    DaneResult,
    DnssecLookup,
    HostDane,
    HostStatus,
    LookupFailed,
    Reply,
    dane_policy,
    is_usable,
    reply_from,
)
from mta.policy.tls import Level, Tlsa

SHA256 = bytes(range(32))
SHA512 = bytes(range(64))
EE = Tlsa(3, 1, 1, SHA256)  # DANE-EE, public key, SHA-256
TA = Tlsa(2, 0, 2, SHA512)  # DANE-TA, certificate, SHA-512
PKIX_EE = Tlsa(1, 1, 1, SHA256)  # unusable for SMTP


def tlsa_text(record: Tlsa) -> str:
    return f"{record.usage} {record.selector} {record.matching_type} {record.data.hex()}"


class FakeDns:
    """Answers from a table; what is not in it is a validated NXDOMAIN."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], Reply | LookupFailed] = {}
        self.calls: list[tuple[str, str]] = []

    def answer(
        self, name: str, rdtype: str, *records: str, secure: bool = True, owner: str = ""
    ) -> None:
        rdata = tuple(dns.rdata.from_text("IN", rdtype, text) for text in records)
        self.table[(name, rdtype)] = Reply(secure, owner or name, rdata)

    def fail(self, name: str, rdtype: str) -> None:
        self.table[(name, rdtype)] = LookupFailed(
            f"{name} {rdtype}: 127.0.0.1@53 answered SERVFAIL"
        )

    def secure_host(self, host: str, *tlsa: Tlsa) -> None:
        self.answer(host, "A", "192.0.2.1")
        if tlsa:
            self.answer(f"_25._tcp.{host}", "TLSA", *map(tlsa_text, tlsa))

    async def __call__(self, name: str, rdtype: str) -> Reply:
        self.calls.append((name, rdtype))
        result = self.table.get((name, rdtype), Reply(True, name))
        if isinstance(result, LookupFailed):
            raise result
        return result


def lookup(fake: FakeDns, domain: str, *hosts: str) -> DaneResult:
    return asyncio.run(Dane([], ask=fake).tlsa(domain, hosts))


def status(result: DaneResult) -> dict[str, HostStatus]:
    return {host: dane.status for host, dane in result.hosts.items()}


# --- the verdicts ---


def test_validated_mx_and_tlsa_require_dane_with_the_usable_records_only() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.secure_host("mx.d.test", EE, PKIX_EE, TA)
    result = lookup(fake, "d.test", "mx.d.test")
    assert result.mx_validated
    assert result.hosts["mx.d.test"] == HostDane(HostStatus.DANE, (EE, TA))
    assert result.failed == {}


def test_validated_mx_without_tlsa_means_no_dane() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.secure_host("mx.d.test")
    result = lookup(fake, "d.test", "mx.d.test")
    assert result.mx_validated
    assert status(result) == {"mx.d.test": HostStatus.NONE}
    assert "no DNSSEC-validated TLSA records at _25._tcp.mx.d.test" in (
        result.hosts["mx.d.test"].reason
    )


def test_an_mx_answer_that_is_not_validated_turns_dane_off_without_further_lookups() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.", secure=False)
    fake.secure_host("mx.d.test", EE)
    result = lookup(fake, "d.test", "mx.d.test")
    assert not result.mx_validated
    assert status(result) == {"mx.d.test": HostStatus.NONE}
    assert fake.calls == [("d.test", "MX")]


def test_a_failed_mx_lookup_makes_every_host_wait() -> None:
    fake = FakeDns()
    fake.fail("d.test", "MX")
    result = lookup(fake, "d.test", "mx1.d.test", "mx2.d.test")
    assert not result.mx_validated
    assert set(result.failed) == {"mx1.d.test", "mx2.d.test"}
    assert "SERVFAIL" in result.failed["mx1.d.test"]


def test_hosts_whose_addresses_are_not_validated_have_no_dane() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.", "20 mx.other.test.")
    fake.secure_host("mx.d.test", EE)
    fake.answer("mx.other.test", "A", "192.0.2.2", secure=False)
    fake.answer("_25._tcp.mx.other.test", "TLSA", tlsa_text(EE))
    result = lookup(fake, "d.test", "mx.d.test", "mx.other.test")
    assert status(result) == {"mx.d.test": HostStatus.DANE, "mx.other.test": HostStatus.NONE}
    assert ("_25._tcp.mx.other.test", "TLSA") not in fake.calls


@pytest.mark.parametrize("rdtype", ["A", "TLSA"])
def test_a_failed_address_or_tlsa_lookup_makes_that_host_wait(rdtype: str) -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.", "20 mx2.d.test.")
    fake.secure_host("mx.d.test", EE)
    fake.secure_host("mx2.d.test", EE)
    fake.fail("mx.d.test" if rdtype == "A" else "_25._tcp.mx.d.test", rdtype)
    result = lookup(fake, "d.test", "mx.d.test", "mx2.d.test")
    assert status(result) == {"mx.d.test": HostStatus.FAILED, "mx2.d.test": HostStatus.DANE}
    assert "SERVFAIL" in result.failed["mx.d.test"]


def test_tlsa_records_that_are_not_validated_are_ignored() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.secure_host("mx.d.test")
    fake.answer("_25._tcp.mx.d.test", "TLSA", tlsa_text(EE), secure=False)
    assert status(lookup(fake, "d.test", "mx.d.test")) == {"mx.d.test": HostStatus.NONE}


def test_only_unusable_records_still_require_tls_without_authentication() -> None:
    """RFC 7672 2.2: the records say TLS, though none can authenticate the server."""
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.secure_host("mx.d.test", PKIX_EE, Tlsa(3, 1, 4, SHA256))
    result = lookup(fake, "d.test", "mx.d.test")
    assert status(result) == {"mx.d.test": HostStatus.DANE}
    assert not any(is_usable(record) for record in result.hosts["mx.d.test"].records)
    assert "TLS without authentication" in result.hosts["mx.d.test"].reason


def test_a_host_the_validated_mx_answer_does_not_name_must_wait() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.secure_host("mx.d.test", EE)
    fake.secure_host("evil.test", EE)
    result = lookup(fake, "d.test", "mx.d.test", "evil.test")
    assert status(result) == {"mx.d.test": HostStatus.DANE, "evil.test": HostStatus.FAILED}
    assert "not among the DNSSEC-validated MX hosts" in result.failed["evil.test"]


def test_a_validated_no_mx_makes_the_domain_its_own_host() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX")  # NODATA
    fake.secure_host("d.test", EE)
    result = lookup(fake, "d.test", "d.test")
    assert result.mx_validated
    assert result.hosts["d.test"] == HostDane(HostStatus.DANE, (EE,))


def test_cname_expanded_name_is_tried_first_then_the_host_name() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.answer("mx.d.test", "A", "192.0.2.1", owner="real.d.test")
    fake.answer("_25._tcp.mx.d.test", "TLSA", tlsa_text(EE))
    result = lookup(fake, "d.test", "mx.d.test")
    assert result.hosts["mx.d.test"] == HostDane(HostStatus.DANE, (EE,))
    tlsa_calls = [name for name, rdtype in fake.calls if rdtype == "TLSA"]
    assert tlsa_calls == ["_25._tcp.real.d.test", "_25._tcp.mx.d.test"]


def test_host_names_are_compared_without_case_or_final_dot() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 MX.D.Test.")
    fake.secure_host("mx.d.test", EE)
    result = lookup(fake, "D.test.", "Mx.D.test.")
    assert status(result) == {"mx.d.test": HostStatus.DANE}


def test_the_tlsa_name_carries_the_port_we_connect_to() -> None:
    fake = FakeDns()
    fake.answer("d.test", "MX", "10 mx.d.test.")
    fake.secure_host("mx.d.test")
    fake.answer("_2525._tcp.mx.d.test", "TLSA", tlsa_text(EE))
    result = asyncio.run(Dane([], smtp_port=2525, ask=fake).tlsa("d.test", ["mx.d.test"]))
    assert status(result) == {"mx.d.test": HostStatus.DANE}


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (EE, True),
        (TA, True),
        (Tlsa(3, 0, 0, b"a whole certificate"), True),
        (Tlsa(0, 0, 1, SHA256), False),  # PKIX-TA
        (PKIX_EE, False),
        (Tlsa(3, 2, 1, SHA256), False),  # no such selector
        (Tlsa(3, 1, 3, SHA256), False),  # no such matching type
        (Tlsa(3, 1, 1, SHA512), False),  # a SHA-256 digest of the wrong size
        (Tlsa(2, 1, 2, SHA256), False),  # a SHA-512 digest of the wrong size
        (Tlsa(3, 1, 0, b""), False),
    ],
)
def test_usable_records(record: Tlsa, usable: bool) -> None:
    assert is_usable(record) is usable


# --- the policy ---


def test_a_policy_only_when_some_host_has_dane() -> None:
    hosts = {
        "mx1.d.test": HostDane(HostStatus.DANE, (EE,)),
        "mx2.d.test": HostDane(HostStatus.NONE, reason="no TLSA"),
        "mx3.d.test": HostDane(HostStatus.FAILED, reason="SERVFAIL"),
    }
    policy = dane_policy(DaneResult("d.test", True, hosts))
    assert policy is not None
    assert (policy.level, policy.source, policy.policy_domain) == (Level.DANE, "dane", "d.test")
    assert policy.tlsa == {"mx1.d.test": (EE,)}
    without = {host: dane for host, dane in hosts.items() if dane.status is not HostStatus.DANE}
    assert dane_policy(DaneResult("d.test", True, without)) is None


# --- reducing DNS responses ---


def response(
    name: str,
    rdtype: str,
    *records: str,
    ad: bool = True,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    if ad:
        reply.flags |= dns.flags.AD
    for text in records:
        owner, ttl, record_type, data = text.split(maxsplit=3)
        reply.answer.append(dns.rrset.from_text(owner, int(ttl), "IN", record_type, data))
    return dns.message.from_wire(reply.to_wire())  # as a resolver's answer arrives


def test_the_ad_bit_counts_only_from_a_trusted_resolver() -> None:
    answer = response("d.test.", "MX", "d.test. 300 MX 10 mx.d.test.")
    trusted = reply_from(answer, trusted=True)
    assert trusted.secure and trusted.name == "d.test"
    assert [record.to_text() for record in trusted.records] == ["10 mx.d.test."]
    assert not reply_from(answer, trusted=False).secure
    assert not reply_from(response("d.test.", "MX", ad=False), trusted=True).secure


def test_nxdomain_and_nodata_have_no_records() -> None:
    nxdomain = reply_from(response("x.d.test.", "A", rcode=dns.rcode.NXDOMAIN), trusted=True)
    assert nxdomain == Reply(True, "x.d.test")
    assert reply_from(response("d.test.", "TLSA"), trusted=True) == Reply(True, "d.test")


def test_cnames_are_followed_to_the_records_owner() -> None:
    answer = response(
        "Mx.D.test.", "A", "mx.d.test. 300 CNAME real.d.test.", "real.d.test. 300 A 192.0.2.1"
    )
    reply = reply_from(answer, trusted=True)
    assert reply.name == "real.d.test"
    assert [record.to_text() for record in reply.records] == ["192.0.2.1"]


# --- asking several resolvers ---

TRUSTED, OTHER = ("127.0.0.1", 5353), ("192.0.2.53", 53)


def resolvers(
    monkeypatch: pytest.MonkeyPatch,
    answers: dict[tuple[str, int], dns.message.Message | LookupFailed],
) -> DnssecLookup:
    """A DnssecLookup whose resolvers answer from ``answers``, in that order."""
    lookup = DnssecLookup(list(answers), validating=[TRUSTED], timeout=1.0)

    async def query(_: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
        answer = answers[server]
        if isinstance(answer, LookupFailed):
            raise answer
        return answer

    monkeypatch.setattr(lookup, "_query", query)
    return lookup


def test_the_next_resolver_is_asked_when_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = response("d.test.", "MX", "d.test. 300 MX 10 mx.d.test.")
    lookup = resolvers(monkeypatch, {OTHER: LookupFailed("timeout"), TRUSTED: answer})
    assert asyncio.run(lookup("d.test", "MX")).secure


def test_after_a_trusted_resolver_failed_an_untrusted_one_is_not_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer = response("d.test.", "MX", "d.test. 300 MX 10 mx.d.test.", ad=False)
    failure = LookupFailed("127.0.0.1@5353 answered SERVFAIL")
    lookup = resolvers(monkeypatch, {TRUSTED: failure, OTHER: answer})
    with pytest.raises(LookupFailed, match="d.test MX: 127.0.0.1@5353 answered SERVFAIL$"):
        asyncio.run(lookup("d.test", "MX"))


def test_dane_needs_a_name_server() -> None:
    with pytest.raises(ValueError, match="at least one name server"):
        Dane([])
