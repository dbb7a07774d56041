"""Full spool, full disk: backpressure (452 4.3.1), never a 250 we cannot keep.

- The spool's size limit: concurrent senders fill it; new mail gets 452,
  everything that got 250 is in the spool and is delivered once the receiver
  is there, after which mail is accepted again without a restart.
- A nearly full filesystem: the spool on a small tmpfs mounted for the test
  (falling back to ``min_free_disk`` just above the real free space when the
  sandbox refuses mount): 452 at MAIL, recovery when the space returns.
- A really full filesystem (tmpfs only): a file fills it to ENOSPC while the
  daemon runs, so LMDB commits fail (ENOSPC, or EIO for a short write);
  every reply is 250 (stored), 452 or 451, nothing that got 250 is lost, and
  the spool opens clean afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import smtplib
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.sink import Sink
from tests.reliability.conftest import Scenario, scaled

pytestmark = pytest.mark.integration

TMPFS_SIZE = 16 * 2**20
_MESSAGE_ID = re.compile(rb"^Message-ID: <([a-z]+-[0-9]+)@full\.test>\r$", re.MULTILINE)


def message(name: str, lines: int = 30) -> bytes:
    return (
        "From: App <app@example.test>\r\nTo: user@dest.test\r\n"
        f"Subject: {name}\r\nMessage-ID: <{name}@full.test>\r\n\r\n"
        + "A line of text; thirty of them make this message two kilobytes.\r\n"
        * lines
    ).encode()


def submit(mta: Mta, name: str, lines: int = 30) -> str:
    """One message over a new connection: its final reply, "250 ..." or the refusal."""
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
        client.ehlo("full.test")
        code, reply = client.mail("app@example.test")
        if code != 250:
            return f"{code} {reply.decode()} (at MAIL)"
        code, reply = client.rcpt("user@dest.test")
        assert code == 250, reply
        code, reply = client.data(message(name, lines))
        return f"{code} {reply.decode()}"


def queued_as(reply: str) -> str | None:
    found = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]{22})", reply)
    return found.group(1) if found else None


def is_backpressure(reply: str) -> bool:
    return reply.startswith("452 4.3.1")


def delivered(sink: Sink) -> Counter[str]:
    copies: Counter[str] = Counter()
    for dumped in sink.messages():
        found = _MESSAGE_ID.search(dumped.data)
        copies[found.group(1).decode() if found else "<unknown>"] += 1
    return copies


def wait_delivered(sink: Sink, names: set[str], timeout: float = 20.0) -> Counter[str]:
    """The sink's copies, once every one of ``names`` arrived."""

    def arrived() -> Counter[str] | None:
        copies = delivered(sink)
        return copies if names <= set(copies) else None

    return eventually(arrived, timeout, lambda: f"lost: {sorted(names - set(delivered(sink)))[:5]}")


def deliver_to(mta: Mta, sink: Sink) -> None:
    """Mail goes to ``sink`` (which may not be listening yet), retried every second."""
    mta.park_mail = False
    mta.routes = {"*": f"{sink.host}:{sink.port}"}
    mta.delivery |= {"allow_private_mx": True, "retry_first": 1, "retry_max": 1}


def spool_opens_clean(path: str) -> int:
    """Open the spool read-only with plain LMDB; the number of messages in it."""
    environment = lmdb.open(path, max_dbs=8, readonly=True, lock=False)
    try:
        with environment.begin() as txn:
            messages = environment.open_db(b"messages", txn=txn, create=False)
            jobs = environment.open_db(b"jobs", txn=txn, create=False)
            count = int(txn.stat(messages)["entries"])
            assert txn.stat(jobs)["entries"] == count  # one recipient domain per message
            return count
    finally:
        environment.close()


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@pytest.fixture
def small_disk(mta: Mta, tmp_path: Path) -> Iterator[Path | None]:
    """A 16 MiB tmpfs for the spool, or None when mounting is not allowed here."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if mounted.returncode != 0 or shutil.which("mount") is None:
        yield None
        return
    try:
        yield mountpoint
    finally:
        if mta.process is not None:  # the daemon maps the spool: it must go first
            mta.process.kill()
            mta.process.wait()
            mta.process = None
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(path: Path, leave: int) -> int:
    """Write ``path`` until the filesystem has at most ``leave`` bytes free; bytes written."""
    chunk = b"\0" * 65536
    written = 0
    with path.open("wb") as filler, contextlib.suppress(OSError):
        while free_bytes(path.parent) > leave:
            size = min(len(chunk), free_bytes(path.parent) - leave)
            filler.write(chunk[: max(size, 4096)])
            filler.flush()
            written += max(size, 4096)
    return written


def fill_to_enospc(path: Path) -> None:
    """Write ``path`` until the filesystem refuses with ENOSPC."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as filler:
        while True:
            try:
                filler.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
        while True:  # the tail that a whole chunk no longer fits in
            try:
                filler.write(b"\0" * 4096)
            except OSError:
                return


BIG_LINES = 600
BIG = len(message("full-0", BIG_LINES)) + 1000  # with the signature and trace header


def leave_free(filler: Path, target: int) -> None:
    """Grow or shrink ``filler`` until its filesystem has about ``target`` bytes free."""
    missing = target - free_bytes(filler.parent)
    if missing > 0:
        os.truncate(filler, max(0, filler.stat().st_size - missing))
    elif missing < 0:
        with filler.open("ab") as grow, contextlib.suppress(OSError):
            grow.write(b"\0" * -missing)


def test_spool_size_limit_answers_452_and_delivers_what_it_took(
    mta: Mta, tmp_path: Path, scenario: Scenario
) -> None:
    max_size = scaled(40_000, 400_000)
    sink = Sink(tmp_path / "sink")  # not listening yet: accepted mail waits
    deliver_to(mta, sink)
    mta.spool["max_size"] = max_size
    mta.start()
    lock = threading.Lock()
    replies: dict[str, str] = {}

    def sender(index: int) -> None:
        for number in range(max_size // 1000):
            name = f"limit-{index * 10_000 + number}"
            reply = submit(mta, name)
            with lock:
                replies[name] = reply
            if not queued_as(reply):
                return

    senders = [threading.Thread(target=sender, args=(index,)) for index in range(4)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(timeout=120)
    accepted = {name for name, reply in replies.items() if queued_as(reply)}
    refused = [reply for name, reply in replies.items() if name not in accepted]
    assert accepted, "nothing fitted at all"
    assert len(refused) == 4 and all(map(is_backpressure, refused)), refused
    rows = mta.queue_list()
    assert {row["id"] for row in rows} == {queued_as(replies[name]) for name in accepted}
    assert sum(row["size"] for row in rows) <= max_size  # concurrent commits kept the limit

    sink.start()
    try:
        copies = wait_delivered(sink, accepted)
        mta.wait_for_empty_spool()
        # Room again without a restart: new mail is taken and delivered.
        again = {f"again-{number}" for number in range(3)}
        for name in sorted(again):
            assert queued_as(submit(mta, name)), name
        copies = wait_delivered(sink, accepted | again)
        mta.wait_for_empty_spool()
    finally:
        sink.stop()
    assert mta.stop() == 0
    assert spool_opens_clean(mta.spool["path"]) == 0

    taken = accepted | again
    scenario.checked = (
        "4 concurrent senders fill a small spool limit: 452 4.3.1, stored bytes within the "
        "limit, every 250 delivered once the receiver starts, mail taken again after"
    )
    scenario.sent = len(replies) + len(again)
    scenario.accepted = len(taken)
    scenario.delivered = len(taken & set(copies))
    scenario.lost = len(taken - set(copies))
    scenario.duplicated = sum(count - 1 for count in copies.values() if count > 1)
    assert scenario.lost == 0, sorted(taken - set(copies))
    assert set(copies) <= taken, copies


def test_nearly_full_disk_answers_452_and_recovers(
    mta: Mta, tmp_path: Path, small_disk: Path | None, scenario: Scenario
) -> None:
    sink = Sink(tmp_path / "sink")
    deliver_to(mta, sink)
    threshold = 4 * 2**20
    if small_disk is not None:
        mta.spool["path"] = str(small_disk / "spool")
        mta.spool["min_free_disk"] = threshold
    mta.start()
    sent, accepted = 0, set()
    for number in range(3):
        sent += 1
        name = f"before-{number}"
        assert queued_as(submit(mta, name)), name
        accepted.add(name)

    # The disk fills up (or, without tmpfs, the threshold goes above what is free).
    if small_disk is not None:
        fill(small_disk / "filler", leave=threshold // 2)
        how = f"a {TMPFS_SIZE >> 20} MiB tmpfs filled by a file past min_free_disk"
    else:
        assert mta.stop() == 0
        mta.spool["min_free_disk"] = free_bytes(tmp_path) + 64 * 2**20
        mta.start()
        how = "min_free_disk above the real free space (mount refused here)"
    refusals = []
    for number in range(3):
        sent += 1
        reply = submit(mta, f"refused-{number}")
        refusals.append(reply)
    assert all(reply == "452 4.3.1 Insufficient system storage (at MAIL)" for reply in refusals)
    assert {row["id"] for row in mta.queue_list()}  # what was taken is still there

    # Space returns: the file goes (or the threshold comes down with a restart).
    if small_disk is not None:
        (small_disk / "filler").unlink()
    else:
        assert mta.stop() == 0
        mta.spool["min_free_disk"] = 0
        mta.start()
    for number in range(3):
        sent += 1
        name = f"after-{number}"
        assert queued_as(submit(mta, name)), name
        accepted.add(name)
    sink.start()
    try:
        copies = wait_delivered(sink, accepted)
        mta.wait_for_empty_spool()
    finally:
        sink.stop()
    assert mta.stop() == 0
    assert spool_opens_clean(mta.spool["path"]) == 0

    scenario.checked = (
        f"{how}: 452 4.3.1 at MAIL, taken mail kept and delivered, mail accepted again "
        "when the space returns"
    )
    scenario.sent, scenario.accepted = sent, len(accepted)
    scenario.delivered = len(accepted & set(copies))
    scenario.lost = len(accepted - set(copies))
    scenario.duplicated = sum(count - 1 for count in copies.values() if count > 1)
    assert scenario.lost == 0
    assert set(copies) <= accepted, copies


def test_disk_full_to_enospc_never_answers_250_for_what_it_did_not_store(
    mta: Mta, tmp_path: Path, small_disk: Path | None, scenario: Scenario
) -> None:
    if small_disk is None:
        pytest.skip("mount is not allowed here: no filesystem to fill to ENOSPC")
    sink = Sink(tmp_path / "sink")
    deliver_to(mta, sink)  # deliveries keep failing (and being recorded) meanwhile
    mta.spool["path"] = str(small_disk / "spool")
    mta.spool["min_free_disk"] = 0
    mta.start()
    replies: dict[str, str] = {}
    for number in range(5):
        name = f"early-{number}"
        replies[name] = submit(mta, name)
        assert queued_as(replies[name]), replies[name]

    filler = small_disk / "filler"
    fill_to_enospc(filler)
    for number in range(scaled(80, 200)):
        if number >= scaled(20, 100) and "spool commit failed" in mta.log():
            break
        # Just enough free space for the room check at DATA, too little for
        # LMDB's copy-on-write commit of a 40 KB message unless its free
        # pages suffice: then the commit itself hits ENOSPC.
        leave_free(filler, BIG)
        name = f"full-{number}"
        replies[name] = submit(mta, name, BIG_LINES)
    during = [reply for name, reply in replies.items() if name.startswith("full-")]
    strange = [r for r in during if not (queued_as(r) or is_backpressure(r) or r[:3] == "451")]
    assert not strange, strange
    # The daemon logs each group commit that ENOSPC refused.
    failed_commits = mta.log().count("spool commit failed")
    # A commit that hits ENOSPC says so (452 4.3.1); one whose write came up
    # short on the full disk fails with EIO (451 4.3.0).
    refused_at_commit = mta.log().count("not queued: disk full") + sum(
        reply.startswith("451") for reply in during
    )
    assert failed_commits, f"no LMDB commit hit ENOSPC: {during}"

    accepted = {name for name, reply in replies.items() if queued_as(reply)}
    listed = {row["id"] for row in mta.queue_list()}
    assert {queued_as(replies[name]) for name in accepted} <= listed

    filler.unlink()
    for number in range(3):
        name = f"later-{number}"
        replies[name] = submit(mta, name)
        assert queued_as(replies[name]), replies[name]
        accepted.add(name)
    # A restart forgets the pauses of deliveries whose records failed to commit.
    assert mta.stop() == 0, mta.log()[-3000:]
    assert spool_opens_clean(mta.spool["path"]) == len(accepted)
    sink.start()
    try:
        mta.start()
        copies = wait_delivered(sink, accepted)
        mta.wait_for_empty_spool()
    finally:
        sink.stop()
    assert mta.stop() == 0

    scenario.checked = (
        f"a tmpfs filled to ENOSPC under the running daemon: {failed_commits} LMDB commits "
        f"failed (ENOSPC or EIO; {refused_at_commit} new messages got 451/452 for it); "
        "every 250 stored, nothing lost, "
        "the spool opens clean"
    )
    scenario.sent, scenario.accepted = len(replies), len(accepted)
    scenario.delivered = len(accepted & set(copies))
    scenario.lost = len(accepted - set(copies))
    scenario.duplicated = sum(count - 1 for count in copies.values() if count > 1)
    assert scenario.lost == 0, sorted(accepted - set(copies))
    assert set(copies) <= accepted, copies
