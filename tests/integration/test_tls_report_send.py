"""TLS-RPT reports counted in a real spool and sent for real: NSD serves the
``_smtp._tls`` TXT records and the report host's address, an aiohttp HTTPS
server on loopback (a certificate from a test CA) takes the POSTs, and the
``mailto:`` reports land in a list standing for our queue."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mta.outbound.tls_report import KEEP_DAYS, PREFIX, TlsReports
from mta.policy.tls import Failure, Level, TlsPolicy
from mta.policy.tls_report import MEDIA_TYPE, Reporter
from mta.spool.store import Spool
from tests.harness.dns_server import DnsServer
from tests.harness.https_policy_server import CaFiles
from tests.harness.service import Service

pytestmark = pytest.mark.integration

REPORT_HOST = "tlsrpt.example.test"
REPORT_ADDRESS = "127.0.0.81"
PATH = "/v1/tlsrpt"
WEB, MAIL, BOTH, SILENT, BROKEN = (
    f"{name}.example.test" for name in ("web", "mail", "both", "silent", "broken")
)
REPORTER = Reporter("Sender Test Org", "tlsrpt-admin@sender.test", "mta.sender.test")
SENDER = "tlsrpt@sender.test"
TODAY = datetime.date(2027, 1, 15)
NOW = datetime.datetime(2027, 1, 15, 12, tzinfo=datetime.UTC).timestamp()


def at(day: datetime.date) -> float:
    """Noon of ``day``."""
    return NOW + (day - TODAY).days * 86400.0


def days_ago(days: int) -> datetime.date:
    return TODAY - datetime.timedelta(days=days)


def sts(domain: str) -> TlsPolicy:
    return TlsPolicy(Level.VERIFY, "mta-sts", mx_patterns=(f"mx.{domain}",), policy_domain=domain)


# --- the HTTPS report receiver ---


@dataclass
class Post:
    path: str
    content_type: str
    body: bytes


@dataclass
class ReportReceiver(Service):
    """aiohttp's web server with TLS on its own loop in a thread: notes every POST and
    answers with the next of ``statuses``, then 201."""

    host: str
    certificate: Path
    port: int = 0
    posts: list[Post] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> ReportReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self.certificate)
        app = web.Application()
        app.router.add_post("/{path:.*}", self._take)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=tls).start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _take(self, request: web.Request) -> web.Response:
        self.posts.append(Post(request.path, request.content_type, await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 201)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaFiles:
    return CaFiles(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def receiver_module(ca: CaFiles) -> Iterator[ReportReceiver]:
    with ReportReceiver(REPORT_ADDRESS, ca.issue([REPORT_HOST])) as server:
        yield server


@pytest.fixture
def receiver(receiver_module: ReportReceiver) -> ReportReceiver:
    receiver_module.posts.clear()
    receiver_module.statuses.clear()
    return receiver_module


@pytest.fixture(scope="module")
def dns(receiver_module: ReportReceiver) -> Iterator[DnsServer]:
    url = f"https://{REPORT_HOST}:{receiver_module.port}{PATH}"
    records = {
        f"_smtp._tls.{WEB}": f"v=TLSRPTv1; rua={url}",
        f"_smtp._tls.{MAIL}": f"v=TLSRPTv1; rua=mailto:tlsrpt@{MAIL}",
        f"_smtp._tls.{BOTH}": f"v=TLSRPTv1; rua=mailto:tlsrpt@{BOTH},{url}",
    }
    with DnsServer(txt=records, a={REPORT_HOST: REPORT_ADDRESS}, servfail=[BROKEN]) as server:
        yield server


# --- the queue, the spool, the reporter ---


@dataclass
class Queue:
    """What ``enqueue`` was given; raises ``failure`` instead while it is set."""

    queued: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    failure: Exception | None = None

    async def enqueue(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        self.queued.append((sender, list(recipients), message))


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool", max_size=2**26)
    yield opened
    opened.close()


@pytest.fixture
def queue() -> Queue:
    return Queue()


def reports(
    spool: Spool,
    queue: Queue,
    dns: DnsServer,
    ca: CaFiles,
    allow_private: bool = True,
) -> TlsReports:
    return TlsReports(
        spool,
        REPORTER,
        SENDER,
        queue.enqueue,
        nameservers=[("127.0.0.1", dns.port)],
        dns_timeout=2.0,
        allow_private=allow_private,
        ca_file=str(ca.ca_file),
        post_timeout=10.0,
    )


def stored(spool: Spool, day: datetime.date, domain: str) -> dict[str, Any] | None:
    with spool.read() as txn:
        raw = spool.state(txn, f"{PREFIX}{day.isoformat()}\0{domain}")
    return None if raw is None else json.loads(raw)


def unzipped(body: bytes) -> Any:
    return json.loads(gzip.decompress(body))


def summaries(report: dict[str, Any]) -> list[tuple[int, int]]:
    return [
        (
            entry["summary"]["total-successful-session-count"],
            entry["summary"]["total-failure-session-count"],
        )
        for entry in report["policies"]
    ]


def attachment(message: bytes) -> tuple[EmailMessage, Any]:
    """The parsed mail, and the report its attachment gunzips to."""
    parsed = message_from_bytes(message, policy=default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    parts = [part for part in parsed.iter_attachments() if part.get_content_type() == MEDIA_TYPE]
    assert len(parts) == 1
    return parsed, unzipped(parts[0].get_content())


# --- counting ---


def test_counts_wait_in_memory_until_a_flush_adds_them_up(
    spool: Spool, queue: Queue, dns: DnsServer, ca: CaFiles
) -> None:
    # Two workers on one spool: each flush adds its own counts to the record.
    first, second = reports(spool, queue, dns, ca), reports(spool, queue, dns, ca)
    for worker in (first, second):
        worker.count(sts(WEB), f"mx.{WEB}", "192.0.2.1", None, NOW)
        worker.count(sts(WEB), f"mx.{WEB}", "192.0.2.1", Failure.CERTIFICATE_EXPIRED, NOW)
    first.count(TlsPolicy(Level.ENCRYPT, "config"), "mx.other.test", "192.0.2.1", None, NOW)
    assert stored(spool, TODAY, WEB) is None

    asyncio.run(first.flush())
    asyncio.run(second.flush())
    asyncio.run(second.flush())  # nothing new: nothing added

    record = stored(spool, TODAY, WEB)
    assert record is not None
    assert [(detail, sessions) for _, detail, sessions in record["sessions"]] == [
        (None, 2),
        (
            {
                "result-type": "certificate-expired",
                "sending-mta-ip": "192.0.2.1",
                "receiving-mx-hostname": f"mx.{WEB}",
            },
            2,
        ),
    ]
    assert stored(spool, TODAY, "") is None  # a policy naming no domain is not counted


def test_run_flushes_once_more_when_cancelled(
    spool: Spool, queue: Queue, dns: DnsServer, ca: CaFiles
) -> None:
    worker = reports(spool, queue, dns, ca)

    async def run_then_stop() -> None:
        running = asyncio.create_task(worker.run(interval=3600))
        await asyncio.sleep(0)  # let it start waiting for its first flush
        worker.count(sts(WEB), f"mx.{WEB}", "192.0.2.1", None, NOW)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(run_then_stop())
    assert stored(spool, TODAY, WEB) is not None


# --- sending ---


def test_each_finished_day_goes_to_its_domains_destinations(
    spool: Spool,
    queue: Queue,
    dns: DnsServer,
    ca: CaFiles,
    receiver: ReportReceiver,
) -> None:
    worker = reports(spool, queue, dns, ca)
    for day, successes in ((days_ago(2), 3), (days_ago(1), 5), (TODAY, 7)):
        for _ in range(successes):
            worker.count(sts(WEB), f"mx.{WEB}", "192.0.2.1", None, at(day))
    worker.count(
        sts(WEB),
        f"mx.{WEB}",
        "192.0.2.9",
        Failure.STARTTLS_NOT_SUPPORTED,
        at(days_ago(1)),
        receiving_ip="198.51.100.25",
    )
    worker.count(
        sts(MAIL), f"mx.{MAIL}", "192.0.2.1", Failure.CERTIFICATE_NOT_TRUSTED, at(days_ago(1))
    )

    asyncio.run(worker.send_due(NOW))

    assert [(post.path, post.content_type) for post in receiver.posts] == [(PATH, MEDIA_TYPE)] * 2
    posted = sorted((unzipped(post.body) for post in receiver.posts), key=start)
    assert [start(report) for report in posted] == ["2027-01-13T00:00:00Z", "2027-01-14T00:00:00Z"]
    assert [summaries(report) for report in posted] == [[(3, 0)], [(5, 1)]]
    assert posted[1]["policies"][0]["failure-details"] == [
        {
            "result-type": "starttls-not-supported",
            "sending-mta-ip": "192.0.2.9",
            "receiving-mx-hostname": f"mx.{WEB}",
            "receiving-ip": "198.51.100.25",
            "failed-session-count": 1,
        }
    ]
    assert posted[0]["policies"][0]["policy"] == {
        "policy-type": "sts",
        "policy-string": ["version: STSv1", "mode: enforce", f"mx: mx.{WEB}"],
        "policy-domain": WEB,
        "mx-host": [f"mx.{WEB}"],
    }

    [(sender, recipients, message)] = queue.queued
    assert (sender, recipients) == (SENDER, [f"tlsrpt@{MAIL}"])
    mail, report = attachment(message)
    assert mail["TLS-Report-Domain"] == MAIL
    assert mail["TLS-Report-Submitter"] == REPORTER.submitter
    assert mail["Subject"] == (
        f"Report Domain: {MAIL} Submitter: {REPORTER.submitter} Report-ID: <{report['report-id']}>"
    )
    assert summaries(report) == [(0, 1)]
    assert report["organization-name"] == REPORTER.organization

    # Sent days are forgotten; today's counts wait for today to end.
    assert stored(spool, days_ago(2), WEB) is None
    assert stored(spool, days_ago(1), WEB) is None
    assert stored(spool, days_ago(1), MAIL) is None
    assert stored(spool, TODAY, WEB) is not None


def start(report: dict[str, Any]) -> str:
    return str(report["date-range"]["start-datetime"])


def test_a_destination_that_failed_gets_the_same_report_later_and_only_it(
    spool: Spool,
    queue: Queue,
    dns: DnsServer,
    ca: CaFiles,
    receiver: ReportReceiver,
) -> None:
    worker = reports(spool, queue, dns, ca)
    worker.count(sts(BOTH), f"mx.{BOTH}", "192.0.2.1", None, at(days_ago(1)))
    receiver.statuses.append(503)

    asyncio.run(worker.send_due(NOW))
    assert len(queue.queued) == 1
    assert len(receiver.posts) == 1
    record = stored(spool, days_ago(1), BOTH)
    assert record is not None and record["done"] == [f"mailto:tlsrpt@{BOTH}"]

    worker.count(sts(BOTH), f"mx.{BOTH}", "192.0.2.1", None, at(days_ago(1)))  # a late flush
    asyncio.run(worker.send_due(NOW + 3600))
    assert len(queue.queued) == 1  # the mail is not sent twice
    assert len(receiver.posts) == 2
    retried = unzipped(receiver.posts[1].body)
    _, mailed = attachment(queue.queued[0][2])
    assert retried["report-id"] == mailed["report-id"]
    assert summaries(retried) == [(2, 0)]
    assert stored(spool, days_ago(1), BOTH) is None


@pytest.mark.parametrize(("status", "kept"), [(400, False), (429, True), (500, True)])
def test_a_refusal_is_final_and_a_busy_receiver_is_tried_again(
    spool: Spool,
    queue: Queue,
    dns: DnsServer,
    ca: CaFiles,
    receiver: ReportReceiver,
    status: int,
    kept: bool,
) -> None:
    worker = reports(spool, queue, dns, ca)
    worker.count(sts(WEB), f"mx.{WEB}", "192.0.2.1", None, at(days_ago(1)))
    receiver.statuses.append(status)

    asyncio.run(worker.send_due(NOW))
    assert len(receiver.posts) == 1
    assert (stored(spool, days_ago(1), WEB) is not None) == kept


def test_a_mail_the_queue_could_not_take_is_tried_again(
    spool: Spool, queue: Queue, dns: DnsServer, ca: CaFiles
) -> None:
    worker = reports(spool, queue, dns, ca)
    worker.count(sts(MAIL), f"mx.{MAIL}", "192.0.2.1", None, at(days_ago(1)))
    queue.failure = OSError("spool full")

    asyncio.run(worker.send_due(NOW))
    assert stored(spool, days_ago(1), MAIL) is not None

    queue.failure = None
    asyncio.run(worker.send_due(NOW))
    assert len(queue.queued) == 1
    assert stored(spool, days_ago(1), MAIL) is None


def test_a_report_host_on_a_private_address_is_not_posted_to(
    spool: Spool,
    queue: Queue,
    dns: DnsServer,
    ca: CaFiles,
    receiver: ReportReceiver,
) -> None:
    worker = reports(spool, queue, dns, ca, allow_private=False)
    worker.count(sts(WEB), f"mx.{WEB}", "192.0.2.1", None, at(days_ago(1)))

    asyncio.run(worker.send_due(NOW))
    assert receiver.posts == []
    assert stored(spool, days_ago(1), WEB) is not None  # tried again, until given up


def test_a_domain_asking_for_no_reports_is_forgotten_and_a_failing_dns_tried_again(
    spool: Spool, queue: Queue, dns: DnsServer, ca: CaFiles
) -> None:
    worker = reports(spool, queue, dns, ca)
    for domain in (SILENT, BROKEN):
        worker.count(sts(domain), f"mx.{domain}", "192.0.2.1", None, at(days_ago(1)))

    asyncio.run(worker.send_due(NOW))
    assert stored(spool, days_ago(1), SILENT) is None
    assert stored(spool, days_ago(1), BROKEN) is not None

    asyncio.run(worker.send_due(at(days_ago(-KEEP_DAYS))))  # given up after KEEP_DAYS
    assert stored(spool, days_ago(1), BROKEN) is None
    assert queue.queued == []


def test_a_day_just_ended_waits_for_every_worker_to_flush(
    spool: Spool, queue: Queue, dns: DnsServer, ca: CaFiles
) -> None:
    worker = reports(spool, queue, dns, ca)
    worker.count(sts(MAIL), f"mx.{MAIL}", "192.0.2.1", None, at(days_ago(1)))
    midnight = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC).timestamp()

    asyncio.run(worker.send_due(midnight + 1))
    assert queue.queued == []
    asyncio.run(worker.send_due(midnight + 3600))
    assert len(queue.queued) == 1
