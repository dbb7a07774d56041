"""The node's SMTP sessions and AUTH failures: one small LMDB file beside the spool.

Every worker process of a node accepts connections on the same addresses, so
``[server] max_connections`` and ``max_connections_per_ip``, and the AUTH
failure table of ``mta.inbound.auth_limits``, must be one for the node, not
one per worker (docs/architecture.md, invariant 6). Each worker opens the same
file, ``<spool>/sessions``, and decides in one write transaction (LMDB
serialises them between processes):

- connections: an open session counts under (client address, worker PID),
  and in a total per PID. ``admit`` reads the node's total and the address's
  count and takes a slot, or says which limit refuses it; ``leave`` gives it
  back. A worker that dies takes nothing with it: the supervisor drops its
  PID's counts when it sees it die (``forget_worker``), and a worker starting
  drops its own PID's and those of processes no longer alive.
- AUTH failures: one ``ClientState`` per address, under ``AuthRules``: a
  block is seen by every worker at once, and the tries reserved by checks
  still under way on any worker count against the address's limit. The
  table is bounded at ``max_clients`` addresses: when it grows past that,
  expired records go first, then the least recently failing, down to three
  quarters of it (so that the scan is rare, not once per failure).

The file holds soft state only (what is open now, recent failures), so it is
never synced to disk and is emptied when the node starts, before any worker
runs. Without it (``Sessions`` made with no store, as in unit tests) one
process counts alone: ``ProcessCounts`` and ``AuthFailures``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import lmdb

from mta.inbound.auth_limits import AuthRules, ClientState, new_token

log = logging.getLogger("mta")

_MAP_SIZE = 64 * 2**20  # 10,000 AUTH records of a few hundred bytes, and the counts
MAX_CLIENTS = 10_000  # AUTH records kept at most

# Which limit refuses a connection: [server] max_connections, or max_connections_per_ip.
Refusal = Literal["total", "per_ip"]


def node_sessions_dir(spool_path: str | Path) -> Path:
    return Path(spool_path) / "sessions"


class ConnectionCounts(Protocol):
    """Open sessions, for the connection limits: per process or per node."""

    def admit(self, ip: str, max_total: int, max_per_ip: int) -> Refusal | None: ...

    def leave(self, ip: str) -> None: ...


class ProcessCounts:
    """The sessions of this process alone (a single process, or a test)."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str, max_total: int, max_per_ip: int) -> Refusal | None:
        if self.total >= max_total:
            return "total"
        if self.per_ip[ip] >= max_per_ip:
            return "per_ip"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def leave(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: the PID is in use
    return True


class NodeSessions:
    """The node's open sessions per (address, worker) and its AUTH failure table."""

    def __init__(
        self,
        directory: str,
        rules: AuthRules | None = None,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,  # CLOCK_MONOTONIC: one for every process
        pid: int | None = None,
        alive: Callable[[int], bool] = _alive,
    ) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.env = lmdb.open(
            directory, map_size=_MAP_SIZE, sync=False, metasync=False, mode=0o600, max_dbs=3
        )
        self.connections = self.env.open_db(b"connections")  # ip NUL pid -> count
        self.totals = self.env.open_db(b"totals")  # pid -> count
        self.clients = self.env.open_db(b"auth")  # ip -> ClientState
        self.rules = rules if rules is not None else AuthRules()
        self.max_clients = max_clients
        self.clock = clock
        self.pid = pid if pid is not None else os.getpid()
        self._closed = False
        # Counts under this PID are a dead process's that had it before; and
        # a worker that died while the supervisor was not looking leaves some.
        self.forget(lambda other: other == self.pid or not alive(other))

    @staticmethod
    def clear(directory: str) -> None:
        """Empty the file before any worker starts: the last run's counts are void."""
        shutil.rmtree(directory, ignore_errors=True)

    @classmethod
    def forget_worker(cls, directory: str, pid: int) -> None:
        """Drop the counts of the worker ``pid``, which died (the supervisor's call).

        Never raises: if the file cannot be opened, the worker started in its
        place drops them (its start drops the counts of every dead PID)."""
        if not os.path.isdir(directory):
            return
        try:
            env = lmdb.open(directory, map_size=_MAP_SIZE, sync=False, metasync=False, max_dbs=3)
            try:
                _forget(env, lambda other: other == pid)
            finally:
                env.close()
        except lmdb.Error as error:
            log.warning(
                "cannot drop the sessions of worker pid %d from %s: %s", pid, directory, error
            )

    def as_process(self, pid: int) -> NodeSessions:
        """The same file, counting as the process ``pid`` (LMDB opens a file once
        per process, so a test stands in for several workers this way)."""
        view = copy.copy(self)
        view.pid = pid
        return view

    def close(self) -> None:
        self._closed = True
        self.env.close()

    # --- connections ---

    def admit(self, ip: str, max_total: int, max_per_ip: int) -> Refusal | None:
        """Take a slot for a session from ``ip``, or say which limit refuses it."""
        if self._closed:
            return "total"
        with self.env.begin(write=True) as txn:
            total = sum(int(count) for count in txn.cursor(db=self.totals).iternext(keys=False))
            if total >= max_total:
                return "total"
            if sum(count for _, count in _per_pid(txn, self.connections, ip)) >= max_per_ip:
                return "per_ip"
            self._add(txn, ip, 1)
        return None

    def leave(self, ip: str) -> None:
        """Give back the slot of a session from ``ip`` that this process admitted."""
        if self._closed:
            return
        with self.env.begin(write=True) as txn:
            self._add(txn, ip, -1)

    def open_sessions(self, ip: str | None = None) -> int:
        """Sessions open on the node (from ``ip``), for tests and inspection."""
        with self.env.begin() as txn:
            if ip is not None:
                return sum(count for _, count in _per_pid(txn, self.connections, ip))
            return sum(int(count) for count in txn.cursor(db=self.totals).iternext(keys=False))

    def forget(self, which: Callable[[int], bool]) -> None:
        """Drop the counts of every PID ``which`` says is gone."""
        _forget(self.env, which)

    def _add(self, txn: lmdb.Transaction, ip: str, step: int) -> None:
        pid = str(self.pid).encode()
        for db, key in ((self.connections, _key(ip, self.pid)), (self.totals, pid)):
            count = int(txn.get(key, b"0", db=db)) + step
            if count > 0:
                txn.put(key, str(count).encode(), db=db)
            else:
                txn.delete(key, db=db)

    # --- AUTH failures (mta.inbound.auth_limits.AuthTable) ---

    def blocked(self, ip: str) -> bool:
        """True while ``ip`` may not try to authenticate, on any worker."""
        if self._closed:
            return False
        with self.env.begin() as txn:
            client = self._load(txn, ip)
        return client is not None and self.rules.blocked(client, self.clock())

    def begin(self, ip: str) -> str | None:
        """Reserve one of ``ip``'s tries for a password check: its token, or None
        when the address may not try now."""
        if self._closed:
            return None
        now, token = self.clock(), new_token()
        with self.env.begin(write=True) as txn:
            client = self._load(txn, ip) or ClientState()
            if not self.rules.begin(client, now, token):
                return None
            self._store(txn, ip, client, now)
        return token

    def failed(self, ip: str, token: str | None = None) -> bool:
        """A failed attempt from ``ip`` (its try ``token``); True when that blocks it."""
        if self._closed:
            return False
        now = self.clock()
        with self.env.begin(write=True) as txn:
            client = self._load(txn, ip) or ClientState()
            blocks = self.rules.fail(client, now, token)
            self._store(txn, ip, client, now)
        return blocks

    def release(self, ip: str, token: str) -> None:
        """The check ``token`` succeeded or never ran: its try comes back."""
        if self._closed:
            return
        now = self.clock()
        with self.env.begin(write=True) as txn:
            client = self._load(txn, ip)
            if client is not None:
                self.rules.release(client, token)
                self._store(txn, ip, client, now)

    def auth_records(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.clients)["entries"])

    def _load(self, txn: lmdb.Transaction, ip: str) -> ClientState | None:
        raw = txn.get(ip.encode(), db=self.clients)
        if raw is None:
            return None
        stored = json.loads(bytes(raw))
        return ClientState(
            failures=stored["failures"],
            blocked_until=stored["blocked_until"],
            pending=stored["pending"],
            last=stored["last"],
        )

    def _store(self, txn: lmdb.Transaction, ip: str, client: ClientState, now: float) -> None:
        if self.rules.expired(client, now):
            txn.delete(ip.encode(), db=self.clients)
            return
        record = {
            "failures": client.failures,
            "blocked_until": client.blocked_until,
            "pending": client.pending,
            "last": client.last,
        }
        txn.put(ip.encode(), json.dumps(record).encode(), db=self.clients)
        if txn.stat(self.clients)["entries"] > self.max_clients:
            self._bound(txn, now)

    def _bound(self, txn: lmdb.Transaction, now: float) -> None:
        """Down to three quarters of ``max_clients``: expired records first, then
        the least recently failing."""
        clients = {}
        for key in txn.cursor(db=self.clients).iternext(values=False):
            ip = bytes(key).decode()
            client = self._load(txn, ip)
            assert client is not None
            clients[ip] = client
        for ip in self.rules.evictions(clients, now, self.max_clients * 3 // 4):
            txn.delete(ip.encode(), db=self.clients)


def _key(ip: str, pid: int) -> bytes:
    return f"{ip}\0{pid}".encode()


def _per_pid(txn: lmdb.Transaction, db: Any, ip: str) -> Iterator[tuple[int, int]]:
    """(pid, count) of the sessions from ``ip``."""
    prefix = f"{ip}\0".encode()
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, count in cursor.iternext():
        key = bytes(key)
        if not key.startswith(prefix):
            return
        yield int(key[len(prefix) :]), int(count)


def _forget(env: lmdb.Environment, which: Callable[[int], bool]) -> None:
    connections, totals = env.open_db(b"connections"), env.open_db(b"totals")
    with env.begin(write=True) as txn:
        gone = [
            bytes(key)
            for key in txn.cursor(db=totals).iternext(values=False)
            if which(int(bytes(key)))
        ]
        for key in gone:
            txn.delete(key, db=totals)
        if not gone:
            return
        pids = {int(key) for key in gone}
        stale = [
            bytes(key)
            for key in txn.cursor(db=connections).iternext(values=False)
            if int(bytes(key).rpartition(b"\0")[2]) in pids
        ]
        for key in stale:
            txn.delete(key, db=connections)
