"""Outbound TLS levels over real sockets and real handshakes.

The receivers (tests/harness/tls_peer.py) present a certificate the test CA
issued to their MX host name, one it issued to another name, a self-signed
one, or offer no STARTTLS at all (what a man in the middle who strips it
leaves). Each listens on its own loopback address, all on one port, as MX
hosts listen on port 25.

First our SMTP client alone (mta.outbound.smtp_client), for what a daemon
does not show: the pool, DANE, MTA-STS and the ``on_tls`` reports. Then a
real `mta serve` that finds the receivers by their MX records (NSD) and
trusts the test CA (``[delivery] ca_file``), under each configured level.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.outbound.routes import MxHost, Route
from mta.outbound.smtp_client import (
    OPPORTUNISTIC,
    SAID,
    ClientSettings,
    Deliverer,
    Delivery,
    Slot,
)
from mta.policy.tls import Failure, Level, Tlsa, TlsPolicy
from tests.harness.ca import CertificateAuthority, self_signed
from tests.harness.client import message, send, unique
from tests.harness.dns_server import DnsServer
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.sink import free_port
from tests.harness.tls_peer import TlsPeer

pytestmark = pytest.mark.integration

T = TypeVar("T")
BOUND = 10.0  # seconds any one test's client work may take
# Each destination domain, its one MX host, and that host's address.
MX = {
    "valid.test": ("mx.valid.test", "127.0.0.41"),
    "wrongname.test": ("mx.wrongname.test", "127.0.0.42"),  # certificate for mx.elsewhere.test
    "selfsigned.test": ("mx.selfsigned.test", "127.0.0.43"),
    "stripped.test": ("mx.stripped.test", "127.0.0.44"),  # no STARTTLS
}
RCPT = "user@valid.test"
MESSAGE = b"From: app@example.test\r\nSubject: tls\r\n\r\nHello\r\n"


class Receivers:
    """A receiver per destination domain, and the CA that issued their certificates."""

    def __init__(self, root: Path) -> None:
        self.ca = CertificateAuthority()
        self.ca_file = self.ca.write(root / "ca.pem")
        self.credentials = {
            "valid.test": self.ca.issue("mx.valid.test"),
            "wrongname.test": self.ca.issue("mx.elsewhere.test"),
            "selfsigned.test": self_signed("mx.selfsigned.test"),
        }
        self.port = free_port(MX["valid.test"][1])
        self.peers = {
            domain: TlsPeer(address, self._server_context(domain, root), self.port)
            for domain, (_, address) in MX.items()
        }
        self.reports: list[tuple[TlsPolicy, str, Failure | None]] = []  # what on_tls heard
        self.dns = DnsServer(
            mx={domain: [(10, host)] for domain, (host, _) in MX.items()},
            a=dict(MX.values()),
        )

    def _server_context(self, domain: str, root: Path) -> ssl.SSLContext | None:
        credential = self.credentials.get(domain)
        return credential.server_context(root) if credential else None

    def route(self, *domains: str) -> Route:
        """A route over the MX hosts of ``domains``, in order, for the first domain."""
        hosts = tuple(
            MxHost(MX[domain][0], 10 * n, (MX[domain][1],), self.port)
            for n, domain in enumerate(domains)
        )
        return Route(domains[0], hosts)

    def deliverer(self, **settings: Any) -> Deliverer:
        client = ClientSettings(
            helo="client.test", command_timeout=3.0, ca_file=str(self.ca_file), **settings
        )
        return Deliverer(client, on_tls=lambda *report: self.reports.append(report))


@pytest.fixture(scope="module")
def receivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receivers]:
    world = Receivers(tmp_path_factory.mktemp("receivers"))
    with contextlib.ExitStack() as stack:
        for peer in world.peers.values():
            stack.enter_context(peer)
        stack.enter_context(world.dns)
        yield world


@pytest.fixture
def peers(receivers: Receivers) -> Receivers:
    """The receivers, with this test's reports of ``on_tls``."""
    receivers.reports = []
    return receivers


def run(coroutine: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, BOUND)

    return asyncio.run(bounded())


async def deliver_each(
    deliverer: Deliverer, route: Route, *policies: TlsPolicy, slot: Slot | None = None
) -> list[Delivery]:
    """One message per policy, in order, over ``route``; then the deliverer closes."""
    try:
        return [
            await deliverer.deliver(route, "app@example.test", [RCPT], MESSAGE, slot=slot, tls=p)
            for p in policies
        ]
    finally:
        await deliverer.close()


def status(delivery: Delivery) -> str:
    reply = delivery.replies[RCPT]
    return f"{reply.code} {reply.status}"


# --- the client ---


def test_verify_never_reuses_a_less_verified_connection(peers: Receivers) -> None:
    peer = peers.peers["valid.test"]
    connections, arrived = peer.connections, len(peer.arrived)
    may, verify = OPPORTUNISTIC, TlsPolicy(Level.VERIFY, "config")
    deliveries = run(deliver_each(peers.deliverer(), peers.route("valid.test"), may, verify, may))
    assert [status(d) for d in deliveries] == ["250 2.0.0"] * 3
    # The unverified connection stayed in the pool; the verified one served may too.
    assert peer.connections - connections == 2
    assert [message.tls for message in peer.arrived[arrived:]] == [True] * 3


@pytest.mark.parametrize("with_slot", [False, True], ids=["pooled", "slot"])
def test_a_required_level_never_reuses_a_plaintext_connection(
    peers: Receivers, with_slot: bool
) -> None:
    peer = peers.peers["stripped.test"]
    arrived = len(peer.arrived)
    deliverer, route = peers.deliverer(), peers.route("stripped.test")

    async def scenario() -> list[Delivery]:
        slot = Slot("path") if with_slot else None
        plain = await deliverer.deliver(route, "app@example.test", [RCPT], MESSAGE, slot=slot)
        if slot is not None:
            deliverer.give_back(slot)  # its connection waits in the path's pool
            slot = deliverer.take_idle("path", "stripped.test")  # as egress takes it
            assert slot is not None and slot.connection is not None
        encrypt = TlsPolicy(Level.ENCRYPT, "config")
        return [plain, *await deliver_each(deliverer, route, encrypt, slot=slot)]

    plain, required = run(scenario())
    assert status(plain) == "250 2.0.0" and status(required) == "451 4.7.4"
    assert "TLS is required, but was not offered by host mx.stripped.test" in str(
        required.replies[RCPT]
    )
    assert len(peer.arrived) == arrived + 1 and not peer.arrived[-1].tls


def spki_sha256(certificate: bytes) -> bytes:
    key = x509.load_der_x509_certificate(certificate).public_key()
    return hashlib.sha256(
        key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ).digest()


@pytest.mark.parametrize(
    ("domain", "record", "failure"),
    [
        ("valid.test", lambda der: Tlsa(3, 1, 1, spki_sha256(der[0])), None),
        ("valid.test", lambda der: Tlsa(2, 0, 1, hashlib.sha256(der[1]).digest()), None),
        ("valid.test", lambda der: Tlsa(3, 1, 1, bytes(32)), Failure.TLSA_INVALID),
        # DANE-EE checks no name; DANE-TA does.
        ("wrongname.test", lambda der: Tlsa(3, 1, 1, spki_sha256(der[0])), None),
        (
            "wrongname.test",
            lambda der: Tlsa(2, 1, 1, spki_sha256(der[1])),
            Failure.CERTIFICATE_HOST_MISMATCH,
        ),
    ],
    ids=["ee", "ta", "mismatch", "ee-other-name", "ta-other-name"],
)
def test_dane(peers: Receivers, domain: str, record: Any, failure: Failure | None) -> None:
    peer = peers.peers[domain]
    arrived = len(peer.arrived)
    host = MX[domain][0]
    tlsa = {host: (record(peers.credentials[domain].der),)}
    policy = TlsPolicy(Level.DANE, "dane", tlsa=tlsa, policy_domain=domain)
    [delivery] = run(deliver_each(peers.deliverer(), peers.route(domain), policy))
    assert peers.reports == [(policy, host, failure)]
    if failure is None:
        assert status(delivery) == "250 2.0.0" and peer.arrived[-1].tls
    else:
        assert status(delivery) == "451 4.7.5" and SAID[failure] in delivery.replies[RCPT].text
        assert len(peer.arrived) == arrived


def test_mta_sts_enforce_tries_only_the_hosts_it_names(peers: Receivers) -> None:
    stripped, valid = peers.peers["stripped.test"], peers.peers["valid.test"]
    before = stripped.connections, valid.connections
    route = peers.route("stripped.test", "valid.test")  # the one that strips TLS first
    named = TlsPolicy(Level.VERIFY, "mta-sts", ("mx.valid.test",), policy_domain="stripped.test")
    nothing = TlsPolicy(Level.VERIFY, "mta-sts", ("*.other.test",), policy_domain="stripped.test")
    delivered, refused = run(deliver_each(peers.deliverer(), route, named, nothing))
    assert status(delivered) == "250 2.0.0" and delivered.relay.startswith("mx.valid.test")
    assert status(refused) == "451 4.4.4"
    assert "no MX host of stripped.test matches its MTA-STS policy (mx: *.other.test)" in str(
        refused.replies[RCPT]
    )
    assert (stripped.connections, valid.connections) == (before[0], before[1] + 1)
    assert peers.reports == [
        (named, "mx.valid.test", None),
        (nothing, "mx.stripped.test", Failure.VALIDATION_FAILURE),
    ]


@pytest.mark.parametrize(
    ("domain", "tls", "failure"),
    [
        ("valid.test", True, None),
        ("selfsigned.test", True, Failure.CERTIFICATE_NOT_TRUSTED),
        ("stripped.test", False, Failure.STARTTLS_NOT_SUPPORTED),
    ],
)
def test_mta_sts_testing_delivers_as_may_and_reports_what_enforce_would_refuse(
    peers: Receivers, domain: str, tls: bool, failure: Failure | None
) -> None:
    host = MX[domain][0]
    testing = TlsPolicy(Level.VERIFY, "mta-sts", (host,), testing=True, policy_domain=domain)
    [delivery] = run(deliver_each(peers.deliverer(), peers.route(domain), testing))
    assert status(delivery) == "250 2.0.0"
    assert peers.peers[domain].arrived[-1].tls == tls
    assert peers.reports == [(testing, host, failure)]  # once, not again for the fallback


def test_success_is_reported_once_per_connection_failure_once_per_attempt(
    peers: Receivers,
) -> None:
    verify = TlsPolicy(Level.VERIFY, "config", policy_domain="valid.test")
    run(deliver_each(peers.deliverer(), peers.route("valid.test"), verify, verify))
    assert peers.reports == [(verify, "mx.valid.test", None)]
    peers.reports.clear()
    verify = TlsPolicy(Level.VERIFY, "config")
    failed = run(deliver_each(peers.deliverer(), peers.route("selfsigned.test"), verify, verify))
    assert [status(d) for d in failed] == ["451 4.7.5"] * 2
    assert peers.reports == [(verify, "mx.selfsigned.test", Failure.CERTIFICATE_NOT_TRUSTED)] * 2


def test_none_never_starts_tls(peers: Receivers) -> None:
    [delivery] = run(
        deliver_each(peers.deliverer(), peers.route("valid.test"), TlsPolicy(Level.NONE))
    )
    assert status(delivery) == "250 2.0.0"
    assert not peers.peers["valid.test"].arrived[-1].tls


# --- a daemon, under each configured level ---

WAITS_NOT_OFFERED = ("4.7.4", "TLS is required, but was not offered by host mx.stripped.test")
WAITS_WRONG_NAME = ("4.7.5", "failed: certificate host name mismatch (Hostname mismatch")
WAITS_SELF_SIGNED = ("4.7.5", "failed: certificate not trusted (self-signed certificate)")
LEVELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "verify": (
        {"tls_level": "verify"},
        {
            "valid.test": "tls",
            "wrongname.test": WAITS_WRONG_NAME,
            "selfsigned.test": WAITS_SELF_SIGNED,
            "stripped.test": WAITS_NOT_OFFERED,
        },
    ),
    "encrypt": (
        {"tls_level": "encrypt"},
        {
            "valid.test": "tls",
            "wrongname.test": "tls",
            "selfsigned.test": "tls",
            "stripped.test": WAITS_NOT_OFFERED,
        },
    ),
    "may": (
        {},
        {
            "valid.test": "tls",
            "wrongname.test": "tls",
            "selfsigned.test": "tls",
            "stripped.test": "plaintext",
        },
    ),
    "per-domain": (
        # A dotted key: the harness writes [delivery] keys one per line.
        {'tls_policy."selfsigned.test"': "verify", "require_tls": ["stripped.test"]},
        {
            "valid.test": "tls",
            "wrongname.test": "tls",
            "selfsigned.test": WAITS_SELF_SIGNED,
            "stripped.test": WAITS_NOT_OFFERED,
        },
    ),
}


def deferred(mta: Mta, queue_id: str) -> str:
    """The last reply of the job, once it has been attempted."""

    def last_reply() -> str | None:
        rows = [row for row in mta.queue_list() if row["id"] == queue_id and row["attempts"]]
        return str(rows[0]["last_reply"]) if rows else None

    return eventually(last_reply, 15, f"{queue_id} to be attempted", interval=0.1)


@pytest.mark.parametrize("level", list(LEVELS))
def test_each_level_end_to_end(mta: Mta, receivers: Receivers, level: str) -> None:
    settings, expected = LEVELS[level]
    mta.park_mail = False
    mta.delivery |= {
        "nameservers": [f"127.0.0.1:{receivers.dns.port}"],
        "smtp_port": receivers.port,
        "allow_private_mx": True,
        "ca_file": str(receivers.ca_file),
        **settings,
    }
    mta.start()
    subjects = {domain: unique() for domain in expected}
    queued = {
        domain: send(mta, message(subjects[domain]), [f"user@{domain}"]) for domain in expected
    }
    for domain, outcome in expected.items():
        peer = receivers.peers[domain]
        if isinstance(outcome, str):
            assert peer.wait_for(subjects[domain]).tls == (outcome == "tls"), domain
        else:
            code, words = outcome
            reply = deferred(mta, queued[domain])
            assert reply.startswith(f"451 {code} ") and words in reply, reply
            assert peer.copies(subjects[domain]) == [], f"{domain} got mail it should not"
    if level == "verify":
        assert "result=certificate-host-mismatch" in mta.log()
    assert mta.stop() == 0, mta.log()
