"""MTA-STS policies fetched for real: NSD serves the ``_mta-sts`` TXT records and
the policy host's address, an HTTPS server on loopback the policy file, with
a certificate from a test CA; the cache is a real spool."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mta.outbound.mta_sts import MAX_POLICY_BYTES, STATE_PREFIX, MtaSts, StsResult
from mta.policy.mta_sts import Mode, StsPolicy
from mta.policy.tls import Failure
from mta.spool.store import Spool
from tests.harness.dns_server import DnsServer
from tests.harness.https_policy_server import CaFiles, HttpsServer

pytestmark = pytest.mark.integration

DOMAIN = "example.test"
HOST = f"mta-sts.{DOMAIN}"
ADDRESS = "127.0.0.80"
PATH = "/.well-known/mta-sts.txt"
POLICY = StsPolicy(Mode.ENFORCE, ("mx1.example.test", "*.mx.example.test"), 86400)
NEW_POLICY = StsPolicy(Mode.TESTING, ("mx2.example.test",), 604800)


def announcing(record_id: str) -> DnsServer:
    """The DNS of a domain whose TXT record announces the policy ``record_id``."""
    return DnsServer(txt={f"_mta-sts.{DOMAIN}": f"v=STSv1; id={record_id};"}, a={HOST: ADDRESS})


@pytest.fixture(scope="module")
def dns_one() -> Iterator[DnsServer]:
    with announcing("one") as server:
        yield server


@pytest.fixture(scope="module")
def dns_two() -> Iterator[DnsServer]:
    with announcing("two") as server:
        yield server


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaFiles:
    return CaFiles(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def https(ca: CaFiles) -> Iterator[HttpsServer]:
    with HttpsServer(ADDRESS, ca.issue([HOST])) as server:
        server.serve(PATH, POLICY.policy_file())
        yield server


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_path: Path) -> Iterator[Spool]:
    opened = Spool(spool_path, max_size=2**26)
    yield opened
    opened.close()


MakeSts = Callable[..., MtaSts]


@pytest.fixture
def make_sts(ca: CaFiles, https: HttpsServer) -> MakeSts:
    """An MtaSts on the test's DNS server, HTTPS server and CA."""

    def make(spool: Spool, dns: DnsServer, **options: object) -> MtaSts:
        settings: dict[str, object] = {
            "nameservers": [("127.0.0.1", dns.port)],
            "dns_timeout": 2.0,
            "allow_private": True,
            "port": https.port,
            "ca_file": str(ca.ca_file),
            "fetch_timeout": 10.0,
        }
        return MtaSts(spool, **{**settings, **options})  # type: ignore[arg-type]

    return make


def policy(sts: MtaSts, domain: str = DOMAIN) -> StsResult:
    return asyncio.run(sts.policy(domain))


def cached_id(spool: Spool) -> str | None:
    with spool.read() as txn:
        raw = spool.state(txn, STATE_PREFIX + DOMAIN)
    return None if raw is None else str(json.loads(raw)["id"])


def test_a_policy_is_fetched_once_and_kept_in_the_spool(
    make_sts: MakeSts, spool: Spool, spool_path: Path, dns_one: DnsServer, https: HttpsServer
) -> None:
    assert policy(make_sts(spool, dns_one)) == StsResult(POLICY)
    assert https.requests == [PATH]
    assert cached_id(spool) == "one"

    spool.close()  # a restart: a new process opens the spool and asks again
    reopened = Spool(spool_path, max_size=2**26)
    try:
        assert policy(make_sts(reopened, dns_one)) == StsResult(POLICY)
    finally:
        reopened.close()
    assert https.requests == [PATH]


def test_concurrent_lookups_of_a_domain_share_one_fetch(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, https: HttpsServer
) -> None:
    sts = make_sts(spool, dns_one)

    async def many() -> list[StsResult]:
        return await asyncio.gather(*(sts.policy(DOMAIN) for _ in range(10)))

    assert asyncio.run(many()) == [StsResult(POLICY)] * 10
    assert https.requests == [PATH]


def test_a_new_txt_id_fetches_the_new_policy(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, dns_two: DnsServer, https: HttpsServer
) -> None:
    assert policy(make_sts(spool, dns_one)) == StsResult(POLICY)
    https.serve(PATH, NEW_POLICY.policy_file())
    assert policy(make_sts(spool, dns_one)) == StsResult(POLICY)  # the same id: not fetched
    assert https.requests == [PATH]

    assert policy(make_sts(spool, dns_two)) == StsResult(NEW_POLICY)
    assert https.requests == [PATH, PATH]
    assert cached_id(spool) == "two"


def test_a_policy_past_its_max_age_is_fetched_again(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, https: HttpsServer
) -> None:
    now = [1_800_000_000.0]
    sts = make_sts(spool, dns_one, clock=lambda: now[0])
    assert policy(sts) == StsResult(POLICY)
    now[0] += POLICY.max_age - 1
    https.serve(PATH, NEW_POLICY.policy_file())
    assert policy(sts) == StsResult(POLICY)
    assert https.requests == [PATH]

    now[0] += 1
    assert policy(sts) == StsResult(NEW_POLICY)
    assert https.requests == [PATH, PATH]


@pytest.mark.parametrize("server_fails", ["503", "stopped"])
def test_a_failing_fetch_keeps_the_cached_policy(
    make_sts: MakeSts,
    spool: Spool,
    dns_one: DnsServer,
    dns_two: DnsServer,
    https: HttpsServer,
    server_fails: str,
) -> None:
    assert policy(make_sts(spool, dns_one)) == StsResult(POLICY)
    if server_fails == "503":
        https.serve(PATH, b"busy\n", status=503)
    else:
        https.stop()

    result = policy(make_sts(spool, dns_two))
    assert (result.policy, result.failure) == (POLICY, Failure.STS_POLICY_FETCH_ERROR)
    assert cached_id(spool) == "one"


@pytest.mark.parametrize("issuer", ["another CA", "the CA, for another name"])
def test_a_certificate_that_does_not_verify_gives_no_policy(
    make_sts: MakeSts,
    spool: Spool,
    dns_one: DnsServer,
    ca: CaFiles,
    tmp_path: Path,
    issuer: str,
) -> None:
    if issuer == "another CA":
        certificate = CaFiles(tmp_path, "Another CA").issue([HOST])
    else:
        certificate = ca.issue(["mta-sts.example.invalid"])
    with HttpsServer(ADDRESS, certificate) as impostor:
        impostor.serve(PATH, POLICY.policy_file())
        result = policy(make_sts(spool, dns_one, port=impostor.port))
    assert (result.policy, result.failure) == (None, Failure.STS_WEBPKI_INVALID)
    assert impostor.requests == []
    assert cached_id(spool) is None


def test_a_server_that_never_answers_is_a_fetch_error(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer
) -> None:
    with socket.create_server((ADDRESS, 0)) as silent:  # connections wait in its backlog
        sts = make_sts(spool, dns_one, port=silent.getsockname()[1], fetch_timeout=0.2)
        result = policy(sts)
    assert result == StsResult(None, Failure.STS_POLICY_FETCH_ERROR, "no answer within 0.2 s")


def test_a_redirect_is_not_followed(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, https: HttpsServer
) -> None:
    https.redirect(PATH, f"https://{HOST}:{https.port}/elsewhere.txt")
    https.serve("/elsewhere.txt", POLICY.policy_file())
    result = policy(make_sts(spool, dns_one))
    assert (result.policy, result.failure) == (None, Failure.STS_POLICY_FETCH_ERROR)
    assert result.detail == "HTTP status 302"
    assert https.requests == [PATH]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (POLICY.policy_file(), "text/html"),
        (POLICY.policy_file() + b"x" * MAX_POLICY_BYTES, "text/plain"),
        (b"version: STSv1\nmode: enforce\nmax_age: 86400\n", "text/plain"),
    ],
    ids=["not-text-plain", "too-large", "no-mx"],
)
def test_a_policy_that_breaks_the_rules_is_invalid(
    make_sts: MakeSts,
    spool: Spool,
    dns_one: DnsServer,
    https: HttpsServer,
    body: bytes,
    content_type: str,
) -> None:
    https.serve(PATH, body, content_type)
    result = policy(make_sts(spool, dns_one))
    assert (result.policy, result.failure) == (None, Failure.STS_POLICY_INVALID)
    assert cached_id(spool) is None


def test_a_charset_parameter_is_fine(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, https: HttpsServer
) -> None:
    https.serve(PATH, POLICY.policy_file(), "text/plain; charset=utf-8")
    assert policy(make_sts(spool, dns_one)) == StsResult(POLICY)


def test_a_private_policy_host_is_refused_unless_allowed(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, https: HttpsServer
) -> None:
    result = policy(make_sts(spool, dns_one, allow_private=False))
    assert (result.policy, result.failure) == (None, Failure.STS_POLICY_FETCH_ERROR)
    assert "private or loopback" in result.detail
    assert https.requests == []


def test_a_domain_without_a_txt_record_has_no_policy_and_nothing_is_fetched(
    make_sts: MakeSts, spool: Spool, dns_one: DnsServer, https: HttpsServer
) -> None:
    assert policy(make_sts(spool, dns_one), "other.test") == StsResult()
    assert https.requests == []
