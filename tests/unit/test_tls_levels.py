"""Outbound TLS levels without sockets: which policy a domain gets from the
configuration (mta.outbound.tls_policies), what it demands of each MX host and
which pooled connections it accepts (mta.outbound.smtp_client.Demand), and
the DANE matcher (mta.policy.dane) on certificates made by ``cryptography``.

The handshakes themselves, over real sockets, are in
tests/integration/test_outbound_tls.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from mta import config
from mta.outbound.routes import MxHost, Route
from mta.outbound.smtp_client import Assurance, Demand
from mta.outbound.tls_policies import TlsPolicies
from mta.policy import dane
from mta.policy.tls import REQUIRED, Failure, Level, Tlsa, TlsPolicy
from tests.harness.ca import CertificateAuthority, Credential, self_signed

HOST = "mx.example.test"
CONFIGURABLE = ["none", "may", "encrypt", "verify"]


def policy_for(domain: str, delivery: Mapping[str, object]) -> TlsPolicy:
    # MTA-STS off: the configuration alone decides (no DNS here).
    settings = config.parse({"delivery": {**delivery, "mta_sts": False}})
    policies = TlsPolicies(settings, None)  # type: ignore[arg-type]
    route = Route(domain, (MxHost(HOST, 10, ("192.0.2.1",), 25),))
    return asyncio.run(policies.for_route(route))[0]


# --- the level a domain gets ---


@pytest.mark.parametrize(
    ("delivery", "level", "source"),
    [
        ({}, Level.MAY, "default"),
        ({"tls_level": "verify"}, Level.VERIFY, "default"),
        ({"require_tls": ["bank.example"]}, Level.ENCRYPT, "config"),
        ({"tls_policy": {"bank.example": "verify"}}, Level.VERIFY, "config"),
        # tls_policy wins over the deprecated list, and over the default level.
        (
            {"require_tls": ["bank.example"], "tls_policy": {"bank.example": "none"}},
            Level.NONE,
            "config",
        ),
        (
            {"tls_level": "encrypt", "tls_policy": {"other.example": "none"}},
            Level.ENCRYPT,
            "default",
        ),
    ],
)
def test_a_domain_gets_its_configured_level(
    delivery: dict[str, object], level: Level, source: str
) -> None:
    policy = policy_for("bank.example", delivery)
    assert (policy.level, policy.source) == (level, source)
    assert not policy.policy_domain  # nothing to report to the domain (TLS-RPT)


@given(
    st.dictionaries(st.sampled_from(["a.test", "b.test", "c.test"]), st.sampled_from(CONFIGURABLE)),
    st.sets(st.sampled_from(["a.test", "b.test", "c.test"])),
    st.sampled_from(CONFIGURABLE),
    st.sampled_from(["a.test", "b.test", "c.test"]),
)
def test_the_domains_entry_then_require_tls_then_the_default(
    table: dict[str, str], required: set[str], default: str, domain: str
) -> None:
    delivery = {"tls_policy": table, "require_tls": sorted(required), "tls_level": default}
    expected = table.get(domain) or ("encrypt" if domain in required else default)
    assert policy_for(domain, delivery).level == expected


def test_reload_takes_the_new_levels() -> None:
    policies = TlsPolicies(config.parse({"delivery": {"mta_sts": False}}), None)  # type: ignore[arg-type]
    policies.reload(config.parse({"delivery": {"tls_policy": {"bank.example": "verify"}}}))
    route = Route("bank.example", (MxHost(HOST, 10, ("192.0.2.1",), 25),))
    assert asyncio.run(policies.for_route(route))[0].level is Level.VERIFY


@pytest.mark.parametrize(
    ("delivery", "error"),
    [
        ({"tls_level": "dane"}, "[delivery] tls_level: expected one of none, may, encrypt, verify"),
        ({"tls_policy": {"x.test": "dane"}}, "[delivery] tls_policy.x.test: expected one of"),
        ({"ca_file": "/nonexistent/ca.pem"}, "[delivery] ca_file: cannot load /nonexistent"),
    ],
)
def test_bad_tls_settings_are_refused(delivery: dict[str, object], error: str) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.parse({"delivery": delivery})
    assert str(refused.value).startswith(error)


def test_ca_file_must_hold_certificates(tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(config.ConfigError, match="ca_file: cannot load"):
        config.parse({"delivery": {"ca_file": str(tmp_path / "empty.pem")}})
    ca = CertificateAuthority().write(tmp_path / "ca.pem")
    assert config.parse({"delivery": {"ca_file": str(ca)}}).delivery.ca_file == str(ca)


# --- what a policy demands of one MX host, and which connections it accepts ---

EE = Tlsa(3, 1, 1, bytes(32))
PKIX = Tlsa(1, 1, 1, bytes(32))  # unusable in SMTP


@pytest.mark.parametrize(
    ("records", "level", "usable"),
    [
        (None, Level.MAY, ()),  # no TLSA records: DANE does not apply to the host
        ((PKIX,), Level.ENCRYPT, ()),  # records, none usable: TLS still required
        ((PKIX, EE), Level.DANE, (EE,)),
    ],
)
def test_dane_demand_depends_on_the_hosts_records(
    records: tuple[Tlsa, ...] | None, level: Level, usable: tuple[Tlsa, ...]
) -> None:
    tlsa = {} if records is None else {HOST: records}
    demand = Demand.of(TlsPolicy(Level.DANE, "dane", tlsa=tlsa), HOST)
    assert (demand.level, demand.tlsa) == (level, usable)


PLAINTEXT, ENCRYPTED = Assurance(), Assurance(Level.ENCRYPT)
VERIFIED, VERIFIED_ELSEWHERE = Assurance(Level.VERIFY, HOST), Assurance(Level.VERIFY, "mx2.test")
MATCHED, MATCHED_OTHERS = Assurance(Level.DANE, HOST, (EE,)), Assurance(Level.DANE, HOST, (PKIX,))
SEEN = [PLAINTEXT, ENCRYPTED, VERIFIED, VERIFIED_ELSEWHERE, MATCHED, MATCHED_OTHERS]


@pytest.mark.parametrize(
    ("policy", "accepted"),
    [
        (TlsPolicy(Level.NONE), SEEN),
        (TlsPolicy(Level.MAY), SEEN),
        (TlsPolicy(Level.ENCRYPT), SEEN[1:]),
        (TlsPolicy(Level.VERIFY), [VERIFIED]),
        (TlsPolicy(Level.DANE, tlsa={HOST: (EE,)}), [MATCHED]),
        (TlsPolicy(Level.VERIFY, "mta-sts", testing=True), SEEN),
    ],
    ids=["none", "may", "encrypt", "verify", "dane", "mta-sts-testing"],
)
def test_a_stricter_policy_does_not_take_a_weaker_connection(
    policy: TlsPolicy, accepted: list[Assurance]
) -> None:
    demand = Demand.of(policy, HOST)
    assert [demand.accepts(assurance) for assurance in SEEN] == [a in accepted for a in SEEN]


levels = st.sampled_from(list(Level))
tlsa_sets = st.lists(
    st.builds(Tlsa, st.integers(0, 4), st.integers(0, 2), st.integers(0, 3), st.binary(max_size=4)),
    max_size=3,
).map(tuple)


@given(levels, tlsa_sets, st.booleans())
def test_a_connection_serves_the_demand_it_was_opened_for(
    level: Level, records: tuple[Tlsa, ...], testing: bool
) -> None:
    demand = Demand.of(TlsPolicy(level, tlsa={HOST: records}, testing=testing), HOST)
    assert demand.accepts(demand.proven())
    # Enforced, it never accepts plaintext; MTA-STS testing accepts anything.
    assert demand.accepts(PLAINTEXT) == (not demand.enforced)
    assert demand.enforced == (demand.level in REQUIRED and not testing)


@given(levels, st.booleans())
def test_an_unenforced_demand_falls_back_to_plaintext_in_steps(level: Level, testing: bool) -> None:
    demand = Demand.of(TlsPolicy(level, testing=testing), HOST)
    if demand.enforced:
        return
    steps = [demand.level]
    while steps[-1] is not Level.NONE:
        demand = demand.fallback()
        assert not demand.policy.policy_domain  # the failure was reported already
        steps.append(demand.level)
    assert len(steps) <= 3 and all(step not in REQUIRED for step in steps[1:])


# --- the DANE matcher ---

ROOT = CertificateAuthority("Test Root")
ISSUER = CertificateAuthority("Test Issuer", parent=ROOT)
SERVER = ISSUER.issue(HOST, "*.wild.example.test")
DIGESTS: dict[int, Callable[[bytes], bytes]] = {
    0: lambda data: data,
    1: lambda data: hashlib.sha256(data).digest(),
    2: lambda data: hashlib.sha512(data).digest(),
}


def record(usage: int, selector: int, matching: int, der: bytes) -> Tlsa:
    """The TLSA record that names the certificate ``der`` so."""
    key = x509.load_der_x509_certificate(der).public_key()
    selected = (
        der if selector == 0 else key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return Tlsa(usage, selector, matching, DIGESTS[matching](selected))


selectors, matchings = st.sampled_from([0, 1]), st.sampled_from([0, 1, 2])


@given(selectors, matchings, st.sampled_from([HOST, "elsewhere.test"]), st.booleans())
def test_dane_ee_matches_the_leaf_whatever_its_name_or_dates(
    selector: int, matching: int, host: str, expired: bool
) -> None:
    server = self_signed("other.test") if not expired else ISSUER.issue("x.test", expired=True)
    assert dane.check(server.der, [record(3, selector, matching, server.der[0])], host) is None


@given(selectors, matchings, st.integers(0, 2**16))
def test_dane_ee_refuses_other_data(selector: int, matching: int, flip: int) -> None:
    good = record(3, selector, matching, SERVER.der[0])
    data = bytearray(good.data)
    data[flip % len(data)] ^= 0x01
    bad = Tlsa(3, selector, matching, bytes(data))
    assert dane.check(SERVER.der, [bad], HOST) is Failure.TLSA_INVALID


def test_dane_ee_of_a_ca_is_no_match() -> None:
    assert dane.check(SERVER.der, [record(3, 1, 1, SERVER.der[1])], HOST) is Failure.TLSA_INVALID


@pytest.mark.parametrize("anchor", [1, 2], ids=["issuer", "root"])
@given(selector=selectors, matching=matchings)
def test_dane_ta_matches_a_ca_the_leaf_chains_to(anchor: int, selector: int, matching: int) -> None:
    ta = record(2, selector, matching, SERVER.der[anchor])
    assert dane.check(SERVER.der, [ta], HOST) is None
    assert dane.check(SERVER.der, [ta], "a.wild.example.test") is None  # one label for "*"


@pytest.mark.parametrize(
    "host", ["other.example.test", "a.b.wild.example.test", "wild.example.test"]
)
def test_dane_ta_needs_the_leaf_issued_to_the_host(host: str) -> None:
    ta = record(2, 1, 1, SERVER.der[1])
    assert dane.check(SERVER.der, [ta], host) is Failure.CERTIFICATE_HOST_MISMATCH


def test_dane_ta_reads_the_common_name_when_there_is_no_dns_name() -> None:
    server = ISSUER.issue(HOST, san=False)
    ta = record(2, 0, 1, server.der[1])
    assert dane.check(server.der, [ta], HOST) is None
    assert dane.check(server.der, [ta], "other.test") is Failure.CERTIFICATE_HOST_MISMATCH


def test_dane_ta_never_matches_the_leaf() -> None:
    assert dane.check(SERVER.der, [record(2, 0, 1, SERVER.der[0])], HOST) is Failure.TLSA_INVALID


def test_dane_ta_needs_the_leaf_to_chain_to_the_anchor() -> None:
    stranger = CertificateAuthority("Stranger")
    # The stranger's certificate is sent, and named by the record, but signed nothing here.
    chain = Credential((SERVER.chain[0], stranger.certificate), SERVER.key).der
    assert dane.check(chain, [record(2, 0, 1, chain[1])], HOST) is Failure.TLSA_INVALID


@pytest.mark.parametrize("usage", [0, 1])
def test_pkix_usages_are_ignored(usage: int) -> None:
    records = [record(usage, 0, 1, SERVER.der[0]), record(usage, 0, 1, SERVER.der[1])]
    assert dane.usable(records) == ()
    assert dane.check(SERVER.der, records, HOST) is Failure.TLSA_INVALID


@given(st.integers(0, 255), st.integers(0, 255))
def test_unknown_selectors_and_matching_types_are_ignored(selector: int, matching: int) -> None:
    known = selector in (0, 1) and matching in (0, 1, 2)
    exact = Tlsa(3, selector, matching, SERVER.der[0])
    assert (dane.usable([exact]) == (exact,)) == known
    if not known:
        assert dane.check(SERVER.der, [exact], HOST) is Failure.TLSA_INVALID


def test_nothing_matches_an_empty_or_garbled_chain() -> None:
    assert dane.check([], [record(3, 0, 0, SERVER.der[0])], HOST) is Failure.TLSA_INVALID
    garbage = b"\x30\x03not a certificate"
    assert dane.check([garbage], [Tlsa(3, 1, 0, garbage)], HOST) is Failure.TLSA_INVALID
    assert dane.check([garbage], [Tlsa(3, 0, 0, garbage)], HOST) is None  # bytes, as sent
