"""A domain's own word on TLS, end to end through `mta serve`.

MTA-STS: NSD serves the `_mta-sts` records, an HTTPS server with a test CA
serves the policies, and the domain's MX is a receiver that does not offer
STARTTLS (what a man in the middle who strips it leaves). DANE: unbound
validates zones NSD serves signed, with TLSA records for the MX host's key.
What the user checks: nothing goes out in plaintext or to the wrong key, the
mail waits with the reason in `mta queue list`, `testing` still delivers,
and the metrics count each outcome.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.harness.ca import CertificateAuthority, Credential
from tests.harness.client import message, send
from tests.harness.dns_server import DnsServer
from tests.harness.fake_clock import FakeClock
from tests.harness.https_policy_server import HttpsServer
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.tls_peer import TlsPeer
from tests.harness.validating_resolver import ValidatingResolver, Zone

pytestmark = pytest.mark.integration

STRIPPED = "127.0.0.41"  # the MX behind a man in the middle: no STARTTLS
POLICIES = {"enforced.test": ("127.0.0.42", "enforce"), "trial.test": ("127.0.0.43", "testing")}


def policy(domain: str, mode: str) -> bytes:
    return f"version: STSv1\nmode: {mode}\nmx: mx.{domain}\nmax_age: 86400\n".encode()


def waiting_reason(mta: Mta, recipient: str) -> str | None:
    jobs = [job for job in mta.queue_list() if recipient in job["recipients"]]
    return jobs[0]["last_reply"] if jobs and jobs[0]["last_reply"] else None


def report_of(peer: TlsPeer) -> dict[str, Any] | None:
    """The TLS-RPT report (RFC 8460) a report mail to ``peer`` carries, once one came."""
    for arrived in list(peer.arrived):
        mail = email.message_from_bytes(arrived.data, policy=email.policy.default)
        if mail["TLS-Report-Domain"]:
            [part] = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
            return dict(json.loads(gzip.decompress(part.get_payload(decode=True))))
    return None


def test_mta_sts_enforce_sends_nothing_in_plaintext_and_testing_delivers_and_is_reported(
    mta: Mta, tmp_path: Path
) -> None:
    ca = CertificateAuthority()
    clock = FakeClock(tmp_path)
    mta.env = clock.env()
    with TlsPeer(STRIPPED, None) as stripped, TlsPeer("127.0.0.47", None) as postmaster:
        servers = []
        for domain, (address, mode) in POLICIES.items():
            port = servers[0].port if servers else 0
            certificate = ca.issue(f"mta-sts.{domain}").pem(tmp_path)
            server = HttpsServer(address, certificate, port=port).start()
            server.serve("/.well-known/mta-sts.txt", policy(domain, mode))
            servers.append(server)
        dns = DnsServer(
            mx={domain: [(10, f"mx.{domain}")] for domain in POLICIES},
            a={f"mx.{d}": STRIPPED for d in POLICIES}
            | {f"mta-sts.{d}": address for d, (address, _) in POLICIES.items()},
            txt={f"_mta-sts.{domain}": "v=STSv1; id=1;" for domain in POLICIES}
            | {"_smtp._tls.trial.test": "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"},
        ).start()
        try:
            mta.park_mail = False
            mta.delivery |= {
                "nameservers": [f"127.0.0.1:{dns.port}"],
                "smtp_port": stripped.port,
                "allow_private_mx": True,
                "ca_file": str(ca.write(tmp_path / "ca.pem")),
                "mta_sts_port": servers[0].port,
                "retry_first": 1,
                "retry_max": 1,
            }
            mta.routes = {"reports.test": f"127.0.0.47:{postmaster.port}"}
            mta.write_config = _with_tls_report(mta.write_config)  # type: ignore[method-assign]
            mta.start()
            send(mta, message("enforced"), ["user@enforced.test"])
            send(mta, message("trial"), ["user@trial.test"])
            # testing: delivered as before, in plaintext, and reported.
            assert stripped.wait_for("trial").tls is False
            reason = eventually(lambda: waiting_reason(mta, "user@enforced.test"), 20, mta.log)
            assert reason.startswith("451 4.7.4") and "not offered" in reason, reason
            assert "MTA-STS policy" in reason, reason  # whose word required it
            assert stripped.copies("enforced") == []
            failures = 'mta_tls_sessions_total{level="verify",result="starttls-not-supported",'
            counted = [line for line in mta.metrics().splitlines() if line.startswith(failures)]
            assert any('source="mta-sts"' in line for line in counted), counted
            # The next day, the day's report goes to the address trial.test publishes.
            tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
            clock.move_to(datetime.datetime.combine(tomorrow, datetime.time(0, 30), datetime.UTC))
            report = eventually(lambda: report_of(postmaster), 30, mta.log)
            [reported] = report["policies"]
            assert reported["policy"]["policy-type"] == "sts"
            assert reported["policy"]["policy-domain"] == "trial.test"
            assert reported["summary"]["total-failure-session-count"] >= 1
            results = {detail["result-type"] for detail in reported["failure-details"]}
            assert results == {"starttls-not-supported"}
        finally:
            dns.stop()
            for server in servers:
                server.stop()
    assert mta.stop() == 0


def _with_tls_report(write_config: Callable[[], None]) -> Callable[[], None]:
    def write() -> None:
        write_config()
        with open(write_config.__self__.config_path, "a") as config:  # type: ignore[attr-defined]
            config.write(
                '[tls_report]\nenabled = true\norganization = "Test Org"\n'
                'sender = "tlsrpt@example.test"\n'
            )

    return write


# --- DANE ---

MATCHING, OTHER = "127.0.0.44", "127.0.0.45"


def tlsa_for(credential: Credential) -> str:
    """A DANE-EE record (3 1 1): the SHA-256 of the server's public key."""
    key = (
        credential.chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return f"3 1 1 {hashlib.sha256(key).hexdigest()}"


@pytest.fixture
def dane_peers(tmp_path: Path) -> Iterator[tuple[TlsPeer, TlsPeer, Credential]]:
    """Two receivers on one port, each with its own key from a CA nobody trusts."""
    ca = CertificateAuthority("Nobody's CA")
    ours, theirs = ca.issue("mx.good.dane.test"), ca.issue("mx.bad.dane.test")
    with ExitStack() as stack:
        good = stack.enter_context(TlsPeer(MATCHING, ours.server_context(tmp_path)))
        bad = stack.enter_context(TlsPeer(OTHER, theirs.server_context(tmp_path), port=good.port))
        yield good, bad, ours


def test_dane_delivers_to_the_key_its_tlsa_names_and_holds_mail_for_another(
    mta: Mta, dane_peers: tuple[TlsPeer, TlsPeer, Credential]
) -> None:
    good, bad, ours = dane_peers
    record = tlsa_for(ours)  # both hosts publish our key: the bad one presents another
    zone = Zone(
        "dane.test",
        (
            "good MX 10 mx.good",
            f"mx.good A {MATCHING}",
            f"_{good.port}._tcp.mx.good TLSA {record}",
            "bad MX 10 mx.bad",
            f"mx.bad A {OTHER}",
            f"_{good.port}._tcp.mx.bad TLSA {record}",
        ),
    )
    with ValidatingResolver([zone]) as resolver:
        host, port = resolver.address
        mta.park_mail = False
        mta.delivery |= {
            "nameservers": [f"{host}:{port}"],
            "dnssec_nameservers": [f"{host}:{port}"],
            "smtp_port": good.port,
            "allow_private_mx": True,
            "mta_sts": False,
            "retry_first": 1,
            "retry_max": 1,
        }
        mta.start()
        send(mta, message("to the right key"), ["user@good.dane.test"])
        send(mta, message("to another key"), ["user@bad.dane.test"])
        assert good.wait_for("to the right key").tls is True
        reason = eventually(lambda: waiting_reason(mta, "user@bad.dane.test"), 20, mta.log)
        assert reason.startswith("451 4.7.5") and "DANE TLSA records" in reason, reason
        assert bad.copies("to another key") == []
        assert 'mta_tls_sessions_total{level="dane",result="ok",source="dane"}' in mta.metrics()
    assert mta.stop() == 0
