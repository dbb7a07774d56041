"""Nothing accepted is lost: kill -9 under load, a full spool, a clean SIGTERM."""

from __future__ import annotations

import signal
import threading
import urllib.error
import urllib.request
from functools import partial

import lmdb
import pytest

from tests.harness.client import MESSAGE, RawSmtp, load, send
from tests.harness.mta import Mta
from tests.harness.poll import eventually

pytestmark = pytest.mark.integration


def test_kill_9_under_load_loses_no_accepted_message(mta: Mta) -> None:
    accepted: list[str] = []

    def loaded(count: int) -> bool:
        return len(accepted) >= count

    for _round in range(3):
        mta.start()
        stop = threading.Event()
        senders = [threading.Thread(target=load, args=(mta, accepted, stop, 400)) for _ in range(8)]
        before = len(accepted)
        for sender in senders:
            sender.start()
        eventually(partial(loaded, before + 150), 20, "the load did not get going", 0.01)
        assert mta.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        for sender in senders:
            sender.join(timeout=30)

    mta.start()
    listed = {row["id"] for row in mta.queue_list()}
    assert set(accepted) <= listed, f"lost: {sorted(set(accepted) - listed)[:5]}"
    assert mta.stop() == 0
    # The spool opens clean with plain LMDB, outside our code.
    environment = lmdb.open(mta.spool["path"], max_dbs=8, readonly=True, lock=False)
    with environment.begin() as txn:
        messages = environment.open_db(b"messages", txn=txn, create=False)
        assert txn.stat(messages)["entries"] == len(listed)
    environment.close()


def test_full_spool_answers_452_and_recovers(mta: Mta) -> None:
    mta.spool["max_size"] = 6000
    mta.start()
    accepted, refusal = [], ""
    for _ in range(20):
        try:
            accepted.append(send(mta))
        except AssertionError as error:
            refusal = str(error)
            break
    assert accepted, "nothing fitted at all"
    assert "452" in refusal and "4.3.1" in refusal, refusal
    assert {row["id"] for row in mta.queue_list()} == set(accepted)

    removed = mta.cli("queue", "delete", "--domain", "example.net")
    assert removed.returncode == 0, removed.stderr
    assert mta.queue_list() == []
    send(mta)  # room again, without a restart
    assert mta.stop() == 0


def test_nearly_full_disk_answers_452_at_mail(mta: Mta) -> None:
    mta.spool["min_free_disk"] = 2**60  # more than any disk here has free
    mta.start()
    client = RawSmtp(mta.port)
    client.hello()
    assert client.command("MAIL FROM:<app@example.test>") == (
        "452 4.3.1 Insufficient system storage"
    )
    client.close()
    assert 'mta_messages_rejected_total{reason="spool_full"} 1.0' in mta.metrics()
    # A load balancer asking /readyz sends new mail elsewhere; /healthz: still alive.
    base = f"http://127.0.0.1:{mta.metrics_port}"
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"{base}/readyz", timeout=5)
    assert not_ready.value.code == 503 and not_ready.value.read() == b"disk nearly full\n"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as healthy:
        assert healthy.status == 200
    assert mta.stop() == 0


def test_sigterm_finishes_open_transaction_then_exits_0(running_mta: Mta) -> None:
    busy = RawSmtp(running_mta.port)
    busy.hello("busy.test")
    busy.command("MAIL FROM:<app@example.test>")
    busy.command("RCPT TO:<user@example.net>")
    assert busy.command("DATA").startswith("354")
    busy.send(MESSAGE[:40])
    idle = RawSmtp(running_mta.port)
    idle.hello("idle.test")

    assert running_mta.process is not None
    running_mta.process.send_signal(signal.SIGTERM)
    assert idle.reply().startswith("421 4.3.2")  # idle sessions are closed at once
    busy.send(MESSAGE[40:] + b".\r\n")
    assert busy.reply().startswith("250 2.0.0 Ok: queued as")
    assert busy.reply().startswith("421 4.3.2")
    assert running_mta.stop() == 0

    running_mta.start()
    assert len(running_mta.queue_list()) == 1
