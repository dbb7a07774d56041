"""Worker processes (``[server] workers = 2``): a real `mta serve` supervisor,
its workers on one SO_REUSEPORT port and one spool, smtp-sink as the receiver.

What a user checks: every message arrives once and verifies, each domain is
delivered by one worker, /metrics sums the workers, a dead worker comes
back, and a SIGKILL of `mta serve` leaves no worker behind and loses no mail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.client import send, verify
from tests.harness.mta import MTA, Mta, alive
from tests.harness.poll import eventually
from tests.harness.sink import Sink

pytestmark = pytest.mark.integration

DOMAINS = [f"d{n}.test" for n in range(8)]
_SENT = re.compile(r"mta\.delivery\[(\d+)\]: INFO: id=\w+ to=<[^@]+@([^>]+)> .* status=sent")
_RECEIVED = re.compile(r"mta\.smtpd\[(\d+)\]: INFO: id=\w+ .* status=queued")


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with Sink(tmp_path / "sink", "127.0.0.30") as started:
        yield started


@pytest.fixture
def workers(mta: Mta, sink: Sink) -> Iterator[Mta]:
    mta.server["workers"] = 2
    mta.park_mail = False
    mta.routes = {"*": f"{sink.host}:{sink.port}"}
    mta.start()
    eventually(lambda: mta.readyz() == 200, 20, "both workers to be ready")
    yield mta
    if mta.process is not None:
        assert mta.stop() == 0, mta.log()


def message(number: int) -> bytes:
    return (
        f"From: app@example.test\r\nTo: someone\r\nSubject: message {number}\r\n\r\n"
        f"Body of message {number}.\r\n"
    ).encode()


def send_to_every_domain(mta: Mta, count: int) -> None:
    """``count`` messages, one connection each (so the kernel spreads them over
    the workers), round robin over DOMAINS."""
    for number in range(count):
        send(mta, message(number), [f"user{number}@{DOMAINS[number % len(DOMAINS)]}"])


def test_each_message_arrives_once_signed_and_each_domain_has_one_worker(
    workers: Mta, sink: Sink
) -> None:
    assert len(workers.worker_pids()) == 2
    send_to_every_domain(workers, 40)
    dumped = sink.wait_for_messages(40, timeout=30)
    workers.wait_for_empty_spool()
    assert len(dumped) == 40
    subjects = sorted(re.search(rb"Subject: (.*)\r\n", d.data).group(1) for d in dumped)  # type: ignore[union-attr]
    assert subjects == sorted(f"message {n}".encode() for n in range(40))
    assert all(verify(workers, d.data) for d in dumped)

    log = workers.log()
    deliverers: dict[str, set[str]] = defaultdict(set)
    for pid, domain in _SENT.findall(log):
        deliverers[domain].add(pid)
    assert sorted(deliverers) == DOMAINS
    assert all(len(pids) == 1 for pids in deliverers.values()), deliverers
    assert len(set().union(*deliverers.values())) == 2, "both workers deliver"
    assert len(set(_RECEIVED.findall(log))) == 2, "both workers accept"

    assert workers.metric("mta_messages_received_total") == 40
    assert workers.metric("mta_messages_delivered_total") == 40
    assert workers.metric("mta_smtp_sessions_active") == 0


def test_a_killed_worker_starts_again_and_mail_still_flows(workers: Mta, sink: Sink) -> None:
    before = workers.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    eventually(lambda: workers.readyz() == 503, 10, "/readyz to say a worker is down")
    eventually(lambda: workers.readyz() == 200, 20, "the worker to be back")
    after = workers.worker_pids()
    assert len(after) == 2 and before[0] not in after and before[1] in after
    assert f"(pid {before[0]}) exited with signal SIGKILL" in workers.log()
    send_to_every_domain(workers, 16)
    sink.wait_for_messages(16, timeout=30)
    workers.wait_for_empty_spool()


def test_sigkill_of_the_supervisor_takes_the_workers_and_loses_nothing(
    mta: Mta, sink: Sink
) -> None:
    mta.server["workers"] = 2
    mta.start()  # mail parked: it waits in the spool
    send_to_every_domain(mta, 16)
    pids = mta.worker_pids()
    assert mta.stop(signal.SIGKILL) == -signal.SIGKILL  # waits for the workers to go
    assert pids and not any(alive(pid) for pid in pids)
    mta.park_mail = False
    mta.routes = {"*": f"{sink.host}:{sink.port}"}
    mta.delivery["retry_first"] = 1
    mta.start()
    for domain in DOMAINS:
        assert mta.cli("queue", "flush", "--domain", domain).returncode == 0
    assert len(sink.wait_for_messages(16, timeout=30)) == 16
    mta.wait_for_empty_spool()
    assert mta.stop() == 0


def test_a_second_mta_on_the_same_port_is_refused(workers: Mta) -> None:
    result = subprocess.run(
        [MTA, "serve", "--config", str(workers.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{workers.port}" in result.stderr
    assert "address already in use" in result.stderr.lower()


def test_sighup_reloads_every_worker_and_sigterm_stops_them(workers: Mta) -> None:
    assert workers.process is not None
    pids = workers.worker_pids()
    workers.process.send_signal(signal.SIGHUP)
    eventually(lambda: workers.log().count("reloaded ") == 2, 10, "both workers to reload")
    assert workers.stop() == 0
    assert not any(alive(pid) for pid in pids)
