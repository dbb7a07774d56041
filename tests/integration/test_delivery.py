"""Delivery end to end: a real `mta serve`, a real DNS server (NSD) and
Postfix's smtp-sink as the receiving MX hosts.

One DNS server and one set of sinks serve the whole module; each test runs
its own MTA and tells its messages apart by a unique subject. Every MX host
listens on the same port (``[delivery] smtp_port``) on its own loopback
address, as real MX hosts listen on port 25 at their own addresses.
"""

from __future__ import annotations

import email
import email.policy
import re
import signal
import socket
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.harness.client import message, send, unique
from tests.harness.dns_server import DnsServer
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.sink import Dumped, Sink, free_port
from tests.integration.test_client import PEER, Peer

pytestmark = pytest.mark.integration

MX1, MX2, DEAD, REJECTS, BOUNCES, FLAKY = (f"127.0.0.{n}" for n in (10, 11, 13, 14, 15, 16))


class World:
    """The DNS and the receiving servers every test of this module shares."""

    def __init__(self, root: Path) -> None:
        self.port = free_port(MX1)
        self.dns = DnsServer(
            mx={
                "dest.test": [(10, "mx1.dest.test"), (20, "mx2.dest.test")],
                "backup.test": [(10, "down.backup.test"), (20, "mx2.dest.test")],
                "reject.test": [(10, "mx.reject.test")],
                "example.test": [(10, "mx.example.test")],  # where bounces go
                "flaky.test": [(10, "mx.flaky.test")],
                "nullmx.test": [(0, ".")],
            },
            a={
                "mx1.dest.test": MX1,
                "mx2.dest.test": MX2,
                "down.backup.test": DEAD,
                "mx.reject.test": REJECTS,
                "mx.example.test": BOUNCES,
                "mx.flaky.test": FLAKY,
                "implicit.test": MX1,
            },
            servfail=["broken.test"],
        )
        self.sinks = {
            MX1: Sink(root / "mx1", MX1, self.port),
            MX2: Sink(root / "mx2", MX2, self.port),
            REJECTS: Sink(root / "rejects", REJECTS, self.port, ["-f", "RCPT"]),
            BOUNCES: Sink(root / "bounces", BOUNCES, self.port),
        }
        self.root = root

    def start(self) -> None:
        self.dns.start()
        for sink in self.sinks.values():
            sink.start()

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.dns.stop()

    def configure(self, mta: Mta) -> None:
        # Bounces come from MAILER-DAEMON@<hostname>: a subdomain of the one
        # domain we have a DKIM key for, so they are signed too.
        mta.server["hostname"] = "mta.example.test"
        mta.park_mail = False
        mta.delivery |= {
            "nameservers": [f"127.0.0.1:{self.dns.port}"],
            "smtp_port": self.port,
            "allow_private_mx": True,
            "connection_idle_timeout": 1,
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    shared = World(tmp_path_factory.mktemp("world"))
    shared.start()
    yield shared
    shared.stop()


@pytest.fixture
def delivering(mta: Mta, world: World) -> Iterator[Mta]:
    world.configure(mta)
    mta.start()
    yield mta
    if mta.process is not None:
        assert mta.stop() == 0, mta.log()


def wait_for(sink: Sink, subject: str, timeout: float = 15.0) -> Dumped:
    def arrived() -> Dumped | None:
        return next((d for d in sink.messages() if f"Subject: {subject}".encode() in d.data), None)

    return eventually(arrived, timeout, f"no message {subject!r} at {sink.host}")


def wait_for_bounce(world: World, subject: str) -> tuple[Dumped, EmailMessage]:
    """The DSN whose returned headers carry ``subject``, parsed."""
    dumped = wait_for(world.sinks[BOUNCES], subject)
    parsed = email.message_from_bytes(dumped.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return dumped, parsed


def report_fields(dsn: EmailMessage) -> str:
    [status] = [part for part in dsn.walk() if part.get_content_type() == "message/delivery-status"]
    return str(status)


def verifies(mta: Mta, data: bytes) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return mta.txt_record.encode() if name == b"s1._domainkey.example.test." else b""

    return bool(dkim.verify(data, dnsfunc=dns))


def test_delivered_byte_for_byte_with_a_verifying_signature(delivering: Mta, world: World) -> None:
    subject = unique()
    original = message(subject)
    queue_id = send(delivering, original, ["a@dest.test", "b@dest.test"])
    dumped = wait_for(world.sinks[MX1], subject)
    assert dumped.sender == "app@example.test"
    assert dumped.recipients == ("a@dest.test", "b@dest.test")  # one transaction
    assert dumped.data.endswith(original.partition(b"\r\n\r\n")[2])
    assert verifies(delivering, dumped.data)
    delivering.wait_for_empty_spool()
    log = delivering.log()
    assert re.search(
        rf"id={queue_id} to=<a@dest\.test> relay=mx1\.dest\.test\[{MX1}\]:{world.port} "
        r"source=default tls=may/default delay=[\d.]+ attempts=1 dsn=2\.0\.0 status=sent \(250 ",
        log,
    ), log
    assert "mta_messages_delivered_total 2.0" in delivering.metrics()


def test_first_mx_down_falls_back_to_the_next(delivering: Mta, world: World) -> None:
    subject = unique()
    send(delivering, message(subject), ["x@backup.test"])
    wait_for(world.sinks[MX2], subject)
    delivering.wait_for_empty_spool()
    assert f"relay=mx2.dest.test[{MX2}]" in delivering.log()


def test_implicit_mx_uses_the_domains_own_address(delivering: Mta, world: World) -> None:
    subject = unique()
    send(delivering, message(subject), ["y@implicit.test"])
    assert wait_for(world.sinks[MX1], subject).recipients == ("y@implicit.test",)
    delivering.wait_for_empty_spool()


@pytest.mark.parametrize(
    ("recipient", "status", "diagnostic"),
    [
        ("n@nullmx.test", "5.1.10", "null MX"),
        ("n@nosuch.test", "5.1.2", "does not exist"),
        ("refused@reject.test", "5.3.0", "500 5.3.0"),
    ],
)
def test_permanent_failures_bounce_with_a_dsn_to_the_sender(
    delivering: Mta, world: World, recipient: str, status: str, diagnostic: str
) -> None:
    subject = unique()
    queue_id = send(delivering, message(subject), [recipient])
    dumped, dsn = wait_for_bounce(world, subject)
    assert dumped.sender == ""  # null envelope sender: a bounce is never bounced
    assert dumped.recipients == ("app@example.test",)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    fields = report_fields(dsn)
    assert f"Final-Recipient: rfc822; {recipient}" in fields
    assert f"Status: {status}" in fields and "Action: failed" in fields
    assert diagnostic in fields
    assert verifies(delivering, dumped.data)  # our DSNs are DKIM-signed too
    delivering.wait_for_empty_spool()
    assert f"id={queue_id} to=<{recipient}>" in delivering.log()
    assert "status=bounced" in delivering.log()


def test_servfail_defers_and_the_job_waits(delivering: Mta) -> None:
    queue_id = send(delivering, message(unique()), ["z@broken.test"])

    def attempted() -> dict[str, Any] | None:
        [row] = [row for row in delivering.queue_list() if row["id"] == queue_id]
        return row if row["attempts"] else None

    row = eventually(attempted, 10, lambda: f"no attempt yet: {delivering.queue_list()}")
    assert row["state"] == "ready" and "4.4.3" in row["last_reply"]
    assert "status=deferred" in delivering.log()


def test_temporary_failure_then_success_after_flush(mta: Mta, world: World, tmp_path: Path) -> None:
    world.configure(mta)
    flaky = Sink(tmp_path / "flaky", FLAKY, world.port, ["-r", "RCPT"]).start()
    mta.start()
    subject = unique()
    queue_id = send(mta, message(subject), ["w@flaky.test"])
    eventually(lambda: any(row["attempts"] for row in mta.queue_list()), 10, "a first attempt")
    [row] = mta.queue_list()
    assert row["last_reply"].startswith("450 4.3.0")
    flaky.stop()
    healthy = Sink(tmp_path / "healthy", FLAKY, world.port).start()
    try:
        assert mta.cli("queue", "flush", queue_id).returncode == 0
        wait_for(healthy, subject, timeout=5)  # the daemon notices a flush within a second
        mta.wait_for_empty_spool()
    finally:
        healthy.stop()
    assert mta.stop() == 0
    assert re.search(rf"id={queue_id} to=<w@flaky\.test> .* attempts=2 .*status=sent", mta.log())


def test_mail_older_than_max_age_expires_with_a_dsn(mta: Mta, world: World) -> None:
    world.configure(mta)
    mta.delivery |= {"max_age": 1.5, "retry_first": 0.5, "retry_max": 0.5}
    mta.start()
    subject = unique()
    send(mta, message(subject), ["late@broken.test"])
    _, dsn = wait_for_bounce(world, subject)
    fields = report_fields(dsn)
    assert "Final-Recipient: rfc822; late@broken.test" in fields
    assert "Status: 4.4.3" in fields and "delivery time expired" in fields
    mta.wait_for_empty_spool()
    assert mta.stop() == 0


def test_one_recipient_refused_others_delivered(mta: Mta, world: World) -> None:
    world.configure(mta)
    with Peer() as peer:
        mta.routes = {"partial.test": f"{PEER}:{peer.port}"}  # a static route (smarthost)
        mta.start()
        subject = unique()
        send(
            mta, message(subject), ["good1@partial.test", "bad@partial.test", "good2@partial.test"]
        )
        _, dsn = wait_for_bounce(world, subject)
        fields = report_fields(dsn)
        assert "Final-Recipient: rfc822; bad@partial.test" in fields
        assert "good1" not in fields and "Status: 5.1.1" in fields
        mta.wait_for_empty_spool()
        [received] = peer.handler.messages
        assert received.recipients == ["good1@partial.test", "good2@partial.test"]
    assert mta.stop() == 0


def test_connections_are_reused_across_messages(delivering: Mta, world: World) -> None:
    sink = world.sinks[MX2]
    before = sink.counters()
    subjects = [unique() for _ in range(5)]
    for subject in subjects:
        send(delivering, message(subject), ["r@backup.test"])
    for subject in subjects:
        wait_for(sink, subject)
    delivering.wait_for_empty_spool()
    # Idle pooled connections are closed after connection_idle_timeout (1 s).
    sink.wait_for_counters(lambda now: now.messages >= before.messages + 5)
    sink.wait_for_counters(lambda now: now.sessions > before.sessions, timeout=10)
    assert sink.counters().sessions - before.sessions < 5


def test_a_delivery_in_flight_at_kill_9_is_retried_after_restart(mta: Mta, world: World) -> None:
    """The job was leased to a server that never answered; SIGKILL; after the
    restart the lease is gone and the message is delivered."""
    world.configure(mta)
    with socket.create_server((PEER, 0)) as black_hole:
        mta.routes = {"lease.test": f"{PEER}:{black_hole.getsockname()[1]}"}
        mta.start()
        subject = unique()
        queue_id = send(mta, message(subject), ["l@lease.test"])
        black_hole.settimeout(10)
        connection, _ = black_hole.accept()  # the attempt is in flight now
        assert mta.stop(signal.SIGKILL) == -signal.SIGKILL
        connection.close()
    mta.routes = {"lease.test": f"{MX1}:{world.port}"}
    mta.start()
    wait_for(world.sinks[MX1], subject)
    mta.wait_for_empty_spool()
    assert mta.stop() == 0
    assert f"id={queue_id} to=<l@lease.test>" in mta.log()
