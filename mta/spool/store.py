"""The spool on disk: one LMDB environment holding messages and their jobs.

Named databases inside the environment:

    messages  queue ID -> Message (envelope, arrival, size) as JSON
    bodies    queue ID -> the signed message bytes
    jobs      queue ID NUL domain -> Job as JSON
    due       ms of next attempt + job key -> b"" (ready jobs only, in time order)
    ready     domain NUL ms of next attempt + job key -> b"" (the same, by domain)
    ready_first  the same entries, of the ready jobs of priority ``FIRST``
              ("transactional") only: the scheduler finds a domain's due ones
              by a seek, before its other due jobs (mta.spool.scheduled_queue)
    meta      b"bytes" -> total size of stored bodies (8 bytes, big-endian);
              b"untried-counted" once the "u" count below has been built
    policy    traffic-policy state that must survive restarts: warmup counters
              (8-byte integers) and suspensions (JSON), by name
    events    sequence number (8 bytes, big-endian) -> an event (JSON) waiting
              for the webhook; written in the commit that made the event happen
    suppress  address or "@domain", for every sender, or address SP sender domain,
              for mail from that domain only (lower case) -> why it is
              suppressed, and until when (JSON; mta.spool.suppression)
    suppress_sync  what sharing that list through Redis keeps (mta.spool.suppression)
    counts    "d" NUL domain NUL state -> jobs and recipients (2 x 8 bytes), and
              "c" NUL class -> jobs whose last reply was of that class: what
              `mta queue stats` prints, without reading a million jobs; and
              "u" -> the ready jobs delivery has not looked at yet (no
              attempt, no reply): the backlog of new mail inflow control
              watches (mta.policy.inflow)

Every change to a job goes through ``put_job``/``delete_job``, which keep the
``due``, ``ready`` and ``ready_first`` indexes and the byte counter right in
the same transaction; nothing else writes those. A spool written before
``ready_first`` existed gets it built at its first opening (one pass, once),
so its transactional jobs keep their place. Writes take a transaction from
the caller, so one commit can carry many messages (group commit,
mta.spool.commit) and the admin tool can change several jobs at once.
``write`` returns only once its commit is on disk, which is what makes "250"
mean durable. LMDB allows one writer at a time across processes, so the
daemon and ``mta queue`` can both write; readers never block.

Durable, and the writer lock held for one fdatasync rather than two: with
metasync on, LMDB's commit syncs the data pages, writes the meta page that
makes them current, and syncs again, all under the lock that every worker's
commits queue on. The environment is opened with metasync off, so the commit
syncs the data pages only (the meta page is written, not synced; LMDB keeps
the database intact, a crash could only undo that last commit), and ``write``
then syncs the file itself, after the lock is released: the next writer
commits while this one waits for its meta page to reach the disk. The caller
hears of the commit only after that sync, as before.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from mta.config import PRIORITIES
from mta.spool.records import (
    Job,
    JobState,
    Message,
    domain_due_key,
    domain_prefix,
    due_key,
    due_time,
    job_prefix,
    jobs_for,
)

_BYTES = b"bytes"
_UNTRIED_COUNTED = b"untried-counted"
_UNTRIED = "u"
_READY_FIRST = b"ready_first"
FIRST = PRIORITIES[0]  # the priority whose ready jobs have an index of their own
log = logging.getLogger("mta.spool")

# LMDB reserves address space, not disk: a map twice the spool limit leaves
# room for its B-trees and free pages before MapFullError could ever hit.
_MAP_HEADROOM = 2**30


class SpoolMissing(Exception):
    """There is no spool where the config says."""


class SpoolFull(Exception):
    """No room for a new message; str() is the reason, for the 452 reply and the log."""


@dataclass
class DomainStats:
    jobs: int = 0
    recipients: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


@dataclass
class SpoolStats:
    messages: int = 0
    bytes: int = 0
    jobs: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_domain: dict[str, DomainStats] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)  # waiting jobs by last reply


def _keep_private(path: Path) -> None:
    """The spool directory 0700 and its files 0600, even if an older version or a
    hand-made directory left them readable by others."""
    for item, mode in ((path, 0o700), (path / "data.mdb", 0o600), (path / "lock.mdb", 0o600)):
        if item.exists() and item.stat().st_mode & 0o077:
            log.warning("%s was open to other users: now %o", item, mode)
            item.chmod(mode)


class Spool:
    def __init__(
        self, path: str | Path, max_size: int, min_free_disk: int = 0, create: bool = True
    ) -> None:
        """Open (or with ``create``, make) the spool at ``path``; SpoolMissing if absent."""
        self.path = Path(path)
        self.max_size = max_size
        self.min_free_disk = min_free_disk
        if create:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            _keep_private(self.path)
        elif not (self.path / "data.mdb").exists():
            raise SpoolMissing(f"no spool at {self.path} (has mta serve run with this config?)")
        self.env = lmdb.open(
            str(self.path),
            map_size=2 * max_size + _MAP_HEADROOM,
            max_dbs=16,  # room for the databases later work adds
            sync=True,
            metasync=False,  # write() syncs the meta page, outside the writer lock
            mode=0o600,  # queued mail is nobody else's business, whatever the umask
        )
        # A process killed with SIGKILL leaves its reader slots behind.
        self.env.reader_check()
        self._messages = self.env.open_db(b"messages")
        self._bodies = self.env.open_db(b"bodies")
        self._jobs = self.env.open_db(b"jobs")
        self._due = self.env.open_db(b"due")
        self._ready = self.env.open_db(b"ready")
        self._ready_first = self._open_ready_first()
        self._meta = self.env.open_db(b"meta")
        self._policy = self.env.open_db(b"policy")
        self._events = self.env.open_db(b"events")
        self._suppress = self.env.open_db(b"suppress")
        self.suppress_sync = self.env.open_db(b"suppress_sync")
        self._counts = self.env.open_db(b"counts")
        self._count_existing_jobs()
        self._count_untried_jobs()

    def close(self) -> None:
        self.env.close()

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed (durably) on leaving the block."""
        with self.env.begin(write=True) as txn:
            yield txn
        self.env.sync(True)  # the commit's meta page: on disk before anyone hears of it

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.begin() as txn:
            yield txn

    # --- room ---

    def room_problem(self, txn: lmdb.Transaction, size: int = 0) -> str | None:
        """Why a message of ``size`` bytes cannot be taken now, or None."""
        if self.stored_bytes(txn) + size > self.max_size:
            return "spool size limit reached"
        if self.free_disk() < self.min_free_disk + size:
            return "disk nearly full"
        return None

    def free_disk(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def stored_bytes(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_BYTES, db=self._meta)
        return struct.unpack(">q", raw)[0] if raw else 0

    def message_count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self._messages)["entries"])

    def _add_bytes(self, txn: lmdb.Transaction, delta: int) -> None:
        txn.put(_BYTES, struct.pack(">q", self.stored_bytes(txn) + delta), db=self._meta)

    # --- writing ---

    def add(
        self, txn: lmdb.Transaction, message: Message, body: bytes, within_limits: bool = True
    ) -> None:
        """Store a new message and one ready job per recipient domain.

        ``within_limits=False`` is for bounces: a job may only leave the spool
        with its DSN queued, so a full spool must not refuse the DSN (LMDB's
        map keeps headroom beyond ``max_size`` for this).
        """
        if message.size != len(body):  # delete_job subtracts message.size
            raise ValueError(f"message {message.id}: size {message.size} != {len(body)} bytes")
        problem = self.room_problem(txn, len(body)) if within_limits else None
        if problem:
            raise SpoolFull(problem)
        key = message.id.encode()
        if not txn.put(key, message.encode(), db=self._messages, overwrite=False):
            raise ValueError(f"queue ID {message.id} is already in the spool")
        txn.put(key, body, db=self._bodies)
        self._add_bytes(txn, len(body))
        for job in jobs_for(message):
            self.put_job(txn, job)

    def put_job(self, txn: lmdb.Transaction, job: Job, old: Job | None = None) -> None:
        """Store ``job``, replacing ``old`` (the same job as it was read)."""
        if old is not None:
            self._count(txn, old, -1)
            if old.state is JobState.READY:
                self._unindex(txn, old)
        self._count(txn, job, +1)
        txn.put(job.key, job.encode(), db=self._jobs)
        if job.state is JobState.READY:
            txn.put(due_key(job), b"", db=self._due)
            txn.put(domain_due_key(job), b"", db=self._ready)
            if job.priority == FIRST:
                txn.put(domain_due_key(job), b"", db=self._ready_first)

    def _count(self, txn: lmdb.Transaction, job: Job, sign: int) -> None:
        self._bump(txn, f"d\0{job.domain}\0{job.state.value}", sign, sign * len(job.recipients))
        if job.last_class:
            self._bump(txn, f"c\0{job.last_class}", sign, 0)
        if _untried(job):
            self._bump(txn, _UNTRIED, sign, sign * len(job.recipients))

    def untried_jobs(self, txn: lmdb.Transaction) -> int:
        """Ready jobs delivery has not looked at yet (no attempt, no reply)."""
        raw = txn.get(_UNTRIED.encode(), db=self._counts)
        return max(0, struct.unpack(">qq", raw)[0]) if raw else 0

    def _bump(self, txn: lmdb.Transaction, name: str, jobs: int, recipients: int) -> None:
        key = name.encode()
        raw = txn.get(key, db=self._counts)
        old_jobs, old_recipients = struct.unpack(">qq", raw) if raw else (0, 0)
        new = (old_jobs + jobs, old_recipients + recipients)
        if new == (0, 0):
            txn.delete(key, db=self._counts)
        else:
            txn.put(key, struct.pack(">qq", *new), db=self._counts)

    def _count_existing_jobs(self) -> None:
        """Build the counts of a spool written before they existed (one pass, once).

        Looked at in a read transaction first, so that opening the spool (as
        every `mta queue` command does) takes no writer lock.
        """
        with self.read() as txn:
            if not self._lacks_counts(txn):
                return
        with self.write() as txn:
            if self._lacks_counts(txn):  # not built by another process meanwhile
                for job in self.all_jobs(txn):
                    self._count(txn, job, +1)

    def _lacks_counts(self, txn: lmdb.Transaction) -> bool:
        return not txn.stat(self._counts)["entries"] and bool(txn.stat(self._jobs)["entries"])

    def _count_untried_jobs(self) -> None:
        """Build the "u" count of a spool whose counts were built before it (once;
        a pass gives the right count whenever it runs)."""
        with self.read() as txn:
            if txn.get(_UNTRIED_COUNTED, db=self._meta) is not None:
                return
            if not txn.stat(self._jobs)["entries"]:
                return  # nothing to count: every job to come is counted as it comes
        with self.write() as txn:
            if txn.get(_UNTRIED_COUNTED, db=self._meta) is None:
                txn.delete(_UNTRIED.encode(), db=self._counts)
                for job in self.all_jobs(txn):
                    if _untried(job):
                        self._bump(txn, _UNTRIED, 1, len(job.recipients))
                txn.put(_UNTRIED_COUNTED, b"1", db=self._meta)

    def _open_ready_first(self) -> lmdb._Database:
        """The ``ready_first`` index; built (once) for a spool written before it existed,
        in the transaction that makes it, so that it never exists unbuilt. Looked
        at in a read transaction first: opening the spool takes no writer lock."""
        with self.env.begin() as txn:
            if txn.get(_READY_FIRST) is not None:  # the main database names the others
                return self.env.open_db(_READY_FIRST)
        with self.env.begin(write=True) as txn:
            index = self.env.open_db(_READY_FIRST, txn=txn)
            for job in self.all_jobs(txn):
                if job.state is JobState.READY and job.priority == FIRST:
                    txn.put(domain_due_key(job), b"", db=index)
        self.env.sync(True)
        return index

    def _unindex(self, txn: lmdb.Transaction, job: Job) -> None:
        txn.delete(due_key(job), db=self._due)
        txn.delete(domain_due_key(job), db=self._ready)
        if job.priority == FIRST:
            txn.delete(domain_due_key(job), db=self._ready_first)

    def delete_job(self, txn: lmdb.Transaction, job: Job) -> bool:
        """Remove a job; the message goes with its last job. True if it went."""
        txn.delete(job.key, db=self._jobs)
        self._count(txn, job, -1)
        if job.state is JobState.READY:
            self._unindex(txn, job)
        if any(True for _ in self._job_items(txn, job.message_id)):
            return False
        message = self.message(txn, job.message_id)
        key = job.message_id.encode()
        txn.delete(key, db=self._messages)
        txn.delete(key, db=self._bodies)
        if message is not None:
            self._add_bytes(txn, -message.size)
        return True

    # --- traffic-policy state ---

    def counter(self, txn: lmdb.Transaction, name: str) -> int:
        raw = txn.get(name.encode(), db=self._policy)
        return struct.unpack(">q", raw)[0] if raw else 0

    def add_to_counter(self, txn: lmdb.Transaction, name: str, delta: int) -> None:
        txn.put(name.encode(), struct.pack(">q", self.counter(txn, name) + delta), db=self._policy)

    def state(self, txn: lmdb.Transaction, name: str) -> bytes | None:
        raw = txn.get(name.encode(), db=self._policy)
        return bytes(raw) if raw is not None else None

    def set_state(self, txn: lmdb.Transaction, name: str, value: bytes) -> None:
        txn.put(name.encode(), value, db=self._policy)

    def delete_states(self, txn: lmdb.Transaction, prefix: str, old: Callable[[str], bool]) -> None:
        """Delete the policy records whose name starts with ``prefix`` and is ``old``."""
        cursor = txn.cursor(db=self._policy)
        found = cursor.set_range(prefix.encode())
        while found and bytes(cursor.key()).startswith(prefix.encode()):
            # A delete moves the cursor to the next record itself.
            found = cursor.delete() if old(bytes(cursor.key()).decode()) else cursor.next()

    # --- events waiting for the webhook ---

    def append_event(self, txn: lmdb.Transaction, event: bytes) -> None:
        cursor = txn.cursor(db=self._events)
        last = struct.unpack(">Q", cursor.key())[0] if cursor.last() else 0
        txn.put(struct.pack(">Q", last + 1), event, db=self._events)

    def events(self, txn: lmdb.Transaction, limit: int) -> list[tuple[bytes, bytes]]:
        """The oldest ``limit`` waiting events, (key, event)."""
        batch: list[tuple[bytes, bytes]] = []
        for key, value in txn.cursor(db=self._events):
            if len(batch) == limit:
                break
            batch.append((bytes(key), bytes(value)))
        return batch

    def delete_events(self, txn: lmdb.Transaction, keys: list[bytes]) -> None:
        for key in keys:
            txn.delete(key, db=self._events)

    def event_count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self._events)["entries"])

    # --- suppression list ---

    # Keys are mta.spool.suppression's, already lower case.

    def suppression(self, txn: lmdb.Transaction, key: str) -> bytes | None:
        """The entry under ``key``, or None."""
        raw = txn.get(key.encode(), db=self._suppress)
        return bytes(raw) if raw is not None else None

    def suppress(self, txn: lmdb.Transaction, key: str, why: bytes) -> None:
        txn.put(key.encode(), why, db=self._suppress)

    def unsuppress(self, txn: lmdb.Transaction, key: str) -> bool:
        return bool(txn.delete(key.encode(), db=self._suppress))

    def suppressions(self, txn: lmdb.Transaction, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        """The entries whose keys start with ``prefix``, in key order."""
        start = prefix.encode()
        cursor = txn.cursor(db=self._suppress)
        if not cursor.set_range(start):
            return
        for key, value in cursor:
            if not bytes(key).startswith(start):
                return
            yield bytes(key).decode(), bytes(value)

    # --- reading ---

    def message(self, txn: lmdb.Transaction, queue_id: str) -> Message | None:
        raw = txn.get(queue_id.encode(), db=self._messages)
        return Message.decode(raw) if raw is not None else None

    def body(self, txn: lmdb.Transaction, queue_id: str) -> bytes | None:
        raw = txn.get(queue_id.encode(), db=self._bodies)
        return bytes(raw) if raw is not None else None

    def job(self, txn: lmdb.Transaction, key: bytes) -> Job | None:
        raw = txn.get(key, db=self._jobs)
        return Job.decode(raw) if raw is not None else None

    def due(self, txn: lmdb.Transaction) -> Iterator[tuple[float, bytes]]:
        """(next attempt time, job key) of every ready job, soonest first."""
        for key, _ in txn.cursor(db=self._due):
            raw = bytes(key)
            yield due_time(raw), raw[8:]

    def due_in(
        self,
        txn: lmdb.Transaction,
        domain: str,
        until: float,
        limit: int,
        priority: str | None = None,
    ) -> list[bytes]:
        """Keys of up to ``limit`` ready jobs of ``domain`` due by ``until``, soonest first,
        of ``priority`` (None: any): a seek, whatever the size of the rest of the queue.

        ``FIRST``'s jobs are read from their own index, each checked against the
        index of all (an older version writing the spool in between would have
        left it stale); another priority's from the index of all, passing over
        ``FIRST``'s (the scheduler starts those first, so few of them are due)."""
        prefix = domain_prefix(domain)
        first = priority == FIRST
        keys: list[bytes] = []
        for entry in self._keys_from(txn, self._ready_first if first else self._ready, prefix):
            if len(keys) >= limit or due_time(entry) > until:
                break
            if priority is None or self._of_priority(txn, prefix + entry, first):
                keys.append(entry[8:])
        return keys

    def _of_priority(self, txn: lmdb.Transaction, ready_key: bytes, first: bool) -> bool:
        """Whether the entry of ``ready`` (or of ``ready_first``) is a job of ``FIRST`` (or,
        with ``first`` False, of another priority)."""
        if first:
            return txn.get(ready_key, db=self._ready) is not None  # not a stale entry
        return txn.get(ready_key, db=self._ready_first) is None

    def domains_with_ready_jobs(
        self, txn: lmdb.Transaction, start: str = ""
    ) -> Iterator[tuple[str, float]]:
        """Each domain with ready jobs, in name order from ``start`` on, with its
        soonest next attempt: one seek per domain, however many jobs it has."""
        cursor = txn.cursor(db=self._ready)
        found = cursor.set_range(start.encode())
        while found:
            domain, _, entry = bytes(cursor.key()).partition(b"\0")
            yield domain.decode(), due_time(entry)
            found = cursor.set_range(domain + b"\x01")  # past the domain's every entry

    def due_at(self, txn: lmdb.Transaction, when: float) -> list[bytes]:
        """Keys of the ready jobs whose next attempt is ``when`` (to the millisecond of the
        index): a seek, whatever the size of the rest of the queue."""
        prefix = struct.pack(">Q", max(0, int(when * 1000)))  # as due_key writes it
        return list(self._keys_from(txn, self._due, prefix))

    def make_due(self, txn: lmdb.Transaction, when: float, now: float) -> int:
        """Make the ready jobs told to come back at ``when`` due ``now``; how many.

        A job a suspension defers waits until its end exactly (mta.outbound.egress
        answers ``Wait``), so a resume finds them with a seek; a job whose retry
        falls in that same millisecond by chance is only tried early.
        """
        keys = self.due_at(txn, when)
        for key in keys:
            job = self.job(txn, key)
            assert job is not None, key  # the due index lists stored ready jobs only
            self.put_job(txn, job.with_state(JobState.READY, next_attempt=now), old=job)
        return len(keys)

    def _keys_from(
        self, txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes
    ) -> Iterator[bytes]:
        """The keys of ``db`` that start with ``prefix``, in order, without it: a seek."""
        cursor = txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        for raw, _ in cursor:
            key = bytes(raw)
            if not key.startswith(prefix):
                return
            yield key[len(prefix) :]

    def jobs_of(self, txn: lmdb.Transaction, queue_id: str) -> list[Job]:
        return [Job.decode(value) for value in self._job_items(txn, queue_id)]

    def _job_items(self, txn: lmdb.Transaction, queue_id: str) -> Iterator[bytes]:
        """The encoded jobs of one message."""
        prefix = job_prefix(queue_id)
        cursor = txn.cursor(db=self._jobs)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not bytes(key).startswith(prefix):
                return
            yield bytes(value)

    def all_jobs(self, txn: lmdb.Transaction) -> Iterator[Job]:
        """Every job, in queue ID (arrival) order."""
        for _, value in txn.cursor(db=self._jobs):
            yield Job.decode(value)

    def all_messages(self, txn: lmdb.Transaction) -> Iterator[Message]:
        for _, value in txn.cursor(db=self._messages):
            yield Message.decode(value)

    def stats(self, txn: lmdb.Transaction) -> SpoolStats:
        """Totals, by state, by domain and by class of last reply, from the counts."""
        stats = SpoolStats(messages=self.message_count(txn), bytes=self.stored_bytes(txn))
        for raw, value in txn.cursor(db=self._counts):
            kind, _, rest = bytes(raw).decode().partition("\0")
            jobs, recipients = struct.unpack(">qq", value)
            if kind == "c":
                stats.by_class[rest] = jobs
                continue
            if kind == _UNTRIED:
                continue
            name, _, state = rest.partition("\0")
            stats.jobs += jobs
            stats.by_state[state] = stats.by_state.get(state, 0) + jobs
            domain = stats.by_domain.setdefault(name, DomainStats())
            domain.jobs += jobs
            domain.recipients += recipients
            domain.by_state[state] = domain.by_state.get(state, 0) + jobs
        return stats


def _untried(job: Job) -> bool:
    """A ready job delivery has not looked at yet: new mail waiting for its first try."""
    return job.state is JobState.READY and not job.attempts and not job.last_reply
