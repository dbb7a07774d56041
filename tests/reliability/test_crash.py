"""Crashes: kill -9 the daemon under load in both directions, restart, let it drain.

Several SMTP senders (each reusing its connection) submit messages with a
unique Message-ID while the daemon delivers them to Postfix's smtp-sink; the
daemon is killed with SIGKILL at random points (by accepted count) and
restarted. At the end every message that got a 250 must be at the sink at
least once, duplicates are counted (only jobs in flight at a kill may be
delivered twice, so at most kills x max_concurrent), the spool ends empty
and LMDB opens clean outside our code.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lmdb
import pytest

from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.sink import Sink
from tests.reliability.conftest import Scenario, scaled

pytestmark = pytest.mark.integration

DOMAINS = 4  # recipient domains: each has its own per-domain concurrency
MAX_CONCURRENT = 60  # delivery attempts at once: bounds what a kill can repeat
_MESSAGE_ID = re.compile(rb"^Message-ID: <(crash-[0-9]+)@load\.test>\r$", re.MULTILINE)
_TRAILER = re.compile(rb"end of (crash-[0-9]+)\r\n\Z")


def message(number: int) -> bytes:
    return (
        "From: App <app@example.test>\r\n"
        f"To: user{number}@d{number % DOMAINS}.test\r\n"
        f"Subject: crash {number}\r\n"
        f"Message-ID: <crash-{number}@load.test>\r\n"
        "\r\n"
        + "Some text to make the message a realistic size.\r\n" * 40
        + f"end of crash-{number}\r\n"
    ).encode()


@dataclass
class Ledger:
    """What the senders did: every message handed out, and the ones that got 250."""

    limit: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # message name -> queue ID
    refused: list[str] = field(default_factory=list)

    def take(self) -> int | None:
        with self.lock:
            if self.taken >= self.limit:
                return None
            self.taken += 1
            return self.taken - 1

    def settle(self, number: int, code: int, reply: bytes) -> None:
        with self.lock:
            if code == 250:
                self.accepted[f"crash-{number}"] = reply.decode().rsplit(" ", 1)[1]
            else:
                self.refused.append(f"{code} {reply.decode(errors='replace')}")

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)


def sender(mta: Mta, ledger: Ledger, up: threading.Event, deadline: float) -> None:
    """Send until the ledger runs out; reconnect (once the daemon is up) after a kill."""
    while time.monotonic() < deadline:
        up.wait(timeout=1)
        if not up.is_set():
            continue
        try:
            with smtplib.SMTP("127.0.0.1", mta.port, timeout=20) as client:
                client.ehlo("load.test")
                while (number := ledger.take()) is not None:
                    # A message whose transaction breaks here is neither
                    # accepted nor refused: it may or may not have been stored.
                    client.mail("app@example.test")
                    client.rcpt(f"user{number}@d{number % DOMAINS}.test")
                    code, reply = client.data(message(number))
                    ledger.settle(number, code, reply)
            return
        except (OSError, smtplib.SMTPException):
            time.sleep(0.02)  # killed under us: wait for the restart


def delivered(sink: Sink) -> Counter[str]:
    """How many complete copies of each message the sink holds."""
    copies: Counter[str] = Counter()
    for dumped in sink.messages():
        found, ending = _MESSAGE_ID.search(dumped.data), _TRAILER.search(dumped.data)
        if found and ending and found.group(1) == ending.group(1):
            copies[found.group(1).decode()] += 1
        else:
            copies["<unknown or incomplete>"] += 1
    return copies


def all_of(accepted: set[str], copies: Counter[str]) -> Counter[str] | None:
    """``copies`` if every accepted message is among them."""
    return copies if accepted <= set(copies) else None


def drain(mta: Mta, sink: Sink, timeout: float) -> None:
    """Until the spool is empty; fails at once if the sink went away."""

    def empty() -> bool:
        assert sink.process is not None and sink.process.poll() is None, (
            f"smtp-sink exited ({sink.process and sink.process.returncode}) under the test"
        )
        return not mta.queue_list()

    def still_queued() -> str:
        rows = mta.queue_list()
        return f"{len(rows)} jobs still queued: {rows[:3]}"

    eventually(empty, timeout, still_queued, 0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_under_load_in_both_directions(
    mta: Mta, tmp_path: Path, scenario: Scenario, workers: int
) -> None:
    total, kills = scaled(600, 5000), scaled(3, 10)
    seed = int(os.environ.get("MTA_CRASH_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    sink = Sink(tmp_path / "sink").start()
    mta.park_mail = False
    mta.routes = {"*": f"{sink.host}:{sink.port}"}
    mta.server["workers"] = workers
    mta.delivery |= {
        "allow_private_mx": True,
        "retry_first": 1,
        "retry_max": 2,
        "max_concurrent": MAX_CONCURRENT,
        "max_concurrent_per_domain": MAX_CONCURRENT // DOMAINS,
        "connection_idle_timeout": 1,
    }
    ledger = Ledger(total)
    up = threading.Event()
    deadline = time.monotonic() + scaled(120, 900)
    senders = [
        threading.Thread(target=sender, args=(mta, ledger, up, deadline), daemon=True)
        for _ in range(6)
    ]
    # Random points by accepted count, spread over the load.
    points = sorted(rng.randint(total // 10, total * 9 // 10) for _ in range(kills))
    try:
        mta.start()
        up.set()
        for thread in senders:
            thread.start()

        def reached(point: int) -> bool:
            return ledger.count() >= point or not any(t.is_alive() for t in senders)

        for point in points:
            eventually(
                partial(reached, point),
                max(0.0, deadline - time.monotonic()),
                f"seed {seed}: load stalled at {point}",
                0.005,
            )
            up.clear()
            assert mta.stop(signal.SIGKILL) == -signal.SIGKILL  # workers die with it
            mta.start()
            up.set()
        for thread in senders:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in senders), f"seed {seed}: senders still busy"

        drain(mta, sink, timeout=scaled(60, 300))
        accepted = set(ledger.accepted)
        # smtp-sink finishes its dump file just after its 250.
        copies = eventually(
            lambda: all_of(accepted, delivered(sink)),
            10,
            lambda: f"seed {seed}: lost {sorted(accepted - set(delivered(sink)))[:5]}",
        )
        assert mta.stop() == 0, mta.log()[-3000:]
    finally:
        up.set()
        sink.stop()

    lost = sorted(accepted - set(copies))
    duplicated = sum(count - 1 for count in copies.values() if count > 1)
    scenario.checked = (
        f"{kills} kill -9 at random points while 6 senders submit and the daemon "
        f"({workers} worker process{'es' if workers > 1 else ''}) delivers "
        "to smtp-sink; every 250 arrives, duplicates bounded by the jobs in flight, "
        "spool ends empty, LMDB opens clean"
    )
    scenario.sent = ledger.taken
    scenario.accepted = len(accepted)
    scenario.delivered = len(accepted & set(copies))
    scenario.lost = len(lost)
    scenario.duplicated = duplicated

    assert not ledger.refused, f"seed {seed}: refusals {ledger.refused[:3]}"
    assert len(accepted) >= total // 2, f"seed {seed}: only {len(accepted)} of {total} accepted"
    assert not lost, f"seed {seed}: lost {lost[:5]}"
    # Messages whose 250 was lost in a kill may arrive too; nothing else may.
    strangers = set(copies) - {f"crash-{n}" for n in range(ledger.taken)}
    assert not strangers, f"seed {seed}: unexpected at the sink: {sorted(strangers)[:5]}"
    # Only a job in flight at a kill can be delivered again (max_concurrent is per worker).
    assert duplicated <= kills * MAX_CONCURRENT * workers, f"seed {seed}: {duplicated} duplicates"
    assert "delivery attempt crashed" not in mta.log()

    environment = lmdb.open(mta.spool["path"], max_dbs=8, readonly=True, lock=False)
    with environment.begin() as txn:
        for name in (b"messages", b"bodies", b"jobs", b"due"):
            table = environment.open_db(name, txn=txn, create=False)
            assert txn.stat(table)["entries"] == 0, name
        meta = environment.open_db(b"meta", txn=txn, create=False)
        stored = txn.get(b"bytes", db=meta)
        assert stored is None or int.from_bytes(stored, "big", signed=True) == 0
    environment.close()
