"""`mta queue evacuate`: a stopped node's mail handed to a live node.

Node A (a real `mta serve`) accepts mail it cannot deliver (its route goes to
a closed port) and is stopped; `mta queue evacuate --config A --to B` hands
the mail to node B, another real `mta serve` whose route goes to smtp-sink.
What a user checks: every message reaches the sink once, as A stored it with
only B's own header fields above it, both DKIM signatures verify, and A's
spool is empty; a run that B stops half way is run again without sending
anything twice; a spool in use by a daemon is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.harness.client import message, send, unique
from tests.harness.mta import Mta
from tests.harness.sink import Sink

pytestmark = pytest.mark.integration

RECIPIENTS = ["one@dest.test", "two@other.test"]  # two domains: two jobs per message
KEY = Path("dkim") / "example.test.s1.pem"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with Sink(tmp_path / "sink") as running:
        yield running


class PooledMta(Mta):
    """An MTA with a second egress pool, "bulk", that mail chooses with X-MTA-Pool."""

    def write_config(self) -> None:
        super().write_config()
        with self.config_path.open("a") as config:
            config.write(
                '[[egress.source]]\nname = "main"\naddress = "127.0.0.1"\n'
                '[[egress.pool]]\nname = "default"\nsources = ["main"]\n'
                '[[egress.pool]]\nname = "bulk"\nsources = ["main"]\n'
            )


def node(root: Path, like: Mta, kind: type[Mta] = Mta, **spool: int) -> Mta:
    """Another node of A's fleet: A's DKIM key (one DNS record for the fleet)."""
    root.mkdir()
    other = kind(root, spool=dict(spool))
    shutil.copy(like.root / KEY, other.root / KEY)
    other.txt_record = like.txt_record
    return other


@pytest.fixture
def live(tmp_path: Path, mta: Mta, sink: Sink) -> Iterator[Mta]:
    """Node B, delivering everything to the sink."""
    b = node(tmp_path / "b", mta)
    b.park_mail = False
    b.routes = {"*": f"{sink.host}:{sink.port}"}
    b.start()
    yield b
    assert b.stop() == 0, b.log()


def park(a: Mta, count: int, lines: int = 0) -> dict[str, bytes]:
    """Start A, give it ``count`` messages it cannot deliver, stop it: subject ->
    the bytes A stored (what `mta queue show --raw` prints). ``lines``: 78 bytes
    each, to make them large."""
    a.start()
    stored = {}
    for _ in range(count):
        subject = unique()
        queue_id = send(a, message(subject) + (b"x" * 76 + b"\r\n") * lines, RECIPIENTS)
        stored[subject] = a.raw_message(queue_id)
    return stored


def evacuate(a: Mta, b: Mta) -> tuple[int, str, str]:
    result = a.cli("queue", "evacuate", "--to", f"127.0.0.1:{b.port}")
    return result.returncode, result.stdout, result.stderr


def subject_of(data: bytes) -> str:
    found = re.search(rb"^Subject: (.*)\r$", data, re.MULTILINE)
    assert found, data
    return found.group(1).decode()


def added_fields(data: bytes, stored: bytes) -> list[str]:
    """The names of the header fields above A's bytes (B's additions)."""
    assert data.endswith(stored), "A's bytes did not arrive unchanged"
    added = data[: -len(stored)].decode()
    return [line.split(":", 1)[0] for line in added.split("\r\n") if line and line[0] not in " \t"]


def signatures_verify(b: Mta, data: bytes) -> list[bool]:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return b.txt_record.encode() if name == b"s1._domainkey.example.test." else b""

    count = len(re.findall(rb"^DKIM-Signature:", data, re.MULTILINE | re.IGNORECASE))
    return [bool(dkim.DKIM(data).verify(idx=i, dnsfunc=dns)) for i in range(count)]


def arrivals(sink: Sink, expected: int) -> Counter[tuple[str, str]]:
    """(subject, recipient) of every transaction at the sink, once ``expected`` arrived."""
    return Counter(
        (subject_of(dumped.data), recipient)
        for dumped in sink.wait_for_messages(expected, timeout=15)
        for recipient in dumped.recipients
    )


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_nodes_mail_arrives_byte_for_byte_through_the_live_node(
    mta: Mta, live: Mta, sink: Sink, stop: signal.Signals
) -> None:
    stored = park(mta, 3)
    mta.stop(stop)
    code, out, err = evacuate(mta, live)
    assert code == 0, err
    assert re.search(
        rf"^id=[0-9A-Z]+ to=<one@dest\.test> relay=127\.0\.0\.1\[127\.0\.0\.1\]:{live.port} "
        r"dsn=2\.0\.0 status=sent \(250 2\.0\.0 Ok: queued as [0-9A-Z]+\)$",
        out,
        re.MULTILINE,
    ), out
    assert f"handed over 3 message(s), 6 recipient(s) to 127.0.0.1:{live.port}" in out
    assert "left in the spool: 0 message(s), 0 recipient(s)" in out
    assert mta.queue_list() == []
    # B delivers per domain: one transaction per message and recipient here.
    expected = Counter((subject, rcpt) for subject in stored for rcpt in RECIPIENTS)
    assert arrivals(sink, 6) == expected
    for dumped in sink.messages():
        assert dumped.sender == "app@example.test"
        assert added_fields(dumped.data, stored[subject_of(dumped.data)]) == [
            "DKIM-Signature",
            "Received",
        ]
        assert signatures_verify(live, dumped.data) == [True, True]
    live.wait_for_empty_spool()


def test_a_run_stopped_by_the_live_node_goes_on_where_it_stopped(
    tmp_path: Path, mta: Mta, live: Mta, sink: Sink
) -> None:
    """A first live node keeps its mail and has room for two messages: its 452
    stops the run; run again to B, nothing is sent twice and nothing is lost."""
    stored = park(mta, 4, lines=250)
    mta.stop()
    size = max(len(data) for data in stored.values())
    full = node(tmp_path / "full", mta, max_size=size * 5 // 2)  # two fit, with B's fields
    full.start()
    try:
        code, out, err = evacuate(mta, full)
        kept = {row["id"]: row for row in full.queue_list()}
    finally:
        full.stop()
    assert code == 1
    assert re.search(r"^mta: stopped at [0-9A-Z]+: 452 4\.3\.1 ", err, re.MULTILINE), err
    assert "status=deferred (452 4.3.1 Insufficient system storage)" in out
    assert "handed over 2 message(s), 4 recipient(s)" in out
    assert "left in the spool: 2 message(s), 4 recipient(s)" in out
    assert len(kept) == 2 and len(mta.queue_list()) == 4  # two messages, two jobs each
    first = {}
    for queue_id in kept:
        data = full.raw_message(queue_id)
        first[subject_of(data)] = data
    assert all(data.endswith(stored[subject]) for subject, data in first.items())

    code, out, err = evacuate(mta, live)
    assert code == 0, err
    assert "handed over 2 message(s), 4 recipient(s)" in out
    assert mta.queue_list() == []
    rest = [subject for subject in stored if subject not in first]
    assert arrivals(sink, 4) == Counter((s, rcpt) for s in rest for rcpt in RECIPIENTS)
    live.wait_for_empty_spool()


def test_refused_recipients_stay_in_the_spool(tmp_path: Path, mta: Mta) -> None:
    """A live node that does not list us in relay_networks refuses every
    recipient: nothing leaves the spool and the command says so."""
    park(mta, 1)
    mta.stop()
    closed = node(tmp_path / "closed", mta)
    closed.server["relay_networks"] = ["192.0.2.0/24"]
    closed.start()
    try:
        code, out, err = evacuate(mta, closed)
    finally:
        assert closed.stop() == 0
    assert code == 1
    assert out.count("status=refused (554 5.7.1 ") == 2, out
    assert "left in the spool: 1 message(s), 2 recipient(s)" in out
    assert "2 recipient(s) left in the spool" in err
    assert len(mta.queue_list()) == 2


def test_a_spool_in_use_by_a_running_daemon_is_refused(mta: Mta, live: Mta, sink: Sink) -> None:
    park(mta, 1)
    code, out, err = evacuate(mta, live)
    assert code == 1
    pid = mta.process.pid if mta.process else 0
    assert err == (
        f"mta: the spool at {mta.spool['path']} is in use by process {pid}: "
        "stop `mta serve` on this node before evacuating it\n"
    )
    assert out == ""
    assert len(mta.queue_list()) == 2
    assert sink.counters().messages == 0
    assert mta.stop() == 0


def test_the_pool_a_message_chose_goes_with_it(tmp_path: Path, mta: Mta) -> None:
    """The live node gets the pool as the application gave it (X-MTA-Pool), and
    removes that field again: it stores A's bytes unchanged."""
    a = node(tmp_path / "a", mta, PooledMta)
    b = node(tmp_path / "b", mta, PooledMta)
    a.start()
    queue_id = send(a, b"X-MTA-Pool: bulk\r\n" + message(unique()), RECIPIENTS)
    stored = a.raw_message(queue_id)
    assert a.stop() == 0
    b.start()
    try:
        code, out, err = evacuate(a, b)
        [handed] = {row["id"] for row in b.queue_list()}
        shown = json.loads(b.cli("queue", "show", handed, "--json").stdout)
        received = b.raw_message(handed)
    finally:
        assert b.stop() == 0
    assert code == 0, err
    assert shown["pool"] == "bulk"
    assert added_fields(received, stored) == ["DKIM-Signature", "Received"]
