"""The node's shared limit state: a small LMDB file beside the spool.

Every worker process of a node opens the same file, so a path's connection
leases and rate (mta.policy.admission) hold across all of them: one write
transaction per decision, which LMDB serialises between processes. The file
holds soft state only (what is under way now), so it is never synced to disk
and is emptied when the node starts: nothing in it outlives its processes
except leases of a worker that died, and those expire by themselves.

Warmup reservations live here too; what was sent is durable, so it stays in
the spool, and ``admit`` reads it (``sent``) inside its write transaction.
A delivery's count is committed to the spool before its reservation is
released here, so a decision sees the recipients either in one or in both,
never in neither.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import lmdb

from mta.policy import admission
from mta.policy.admission import Ask, CountState, Granted, PathState, Refused

_MAP_SIZE = 64 * 2**20  # a path's record is a few hundred bytes
_RESERVATIONS = b"reservations"  # warmup counter -> its reservations


def local_limits_dir(spool_path: str | Path) -> Path:
    return Path(spool_path) / "limits"


class LocalLimits:
    def __init__(self, directory: str, ttl: float, clock: Callable[[], float] = time.time):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.env = lmdb.open(
            directory, map_size=_MAP_SIZE, sync=False, metasync=False, mode=0o600, max_dbs=2
        )
        self.paths = self.env.open_db(b"paths")
        self.reservations = self.env.open_db(_RESERVATIONS)
        self.ttl = ttl
        self.clock = clock

    @staticmethod
    def clear(directory: str) -> None:
        """Empty the file before any worker starts: the last run's leases are void."""
        shutil.rmtree(directory, ignore_errors=True)

    def admit(
        self, asks: Sequence[Ask], lease: str, sent: Callable[[str], int] = lambda _: 0
    ) -> Granted | Refused:
        """``sent``: a warmup counter's count in the spool, read while this decides."""
        with self.env.begin(write=True) as txn:
            states = [self._load(txn, ask.path) for ask in asks]
            counts = [
                None if ask.warmup is None else self._count(txn, ask.warmup.counter, sent)
                for ask in asks
            ]
            result = admission.admit(states, asks, lease, self.clock(), self.ttl, counts)
            for ask, state, count in zip(asks, states, counts, strict=True):
                self._store(txn, ask.path, state)
                if ask.warmup is not None and count is not None:
                    self._store_reservations(txn, ask.warmup.counter, count)
        return result

    def settle(self, counter: str, reservation: str) -> None:
        """The delivery's count is in the spool: its reservation goes."""
        with self.env.begin(write=True) as txn:
            count = self._count(txn, counter, lambda _: 0)
            admission.settle(count, "", 0, reservation)
            self._store_reservations(txn, counter, count)

    def renew_reservations(self, held: Iterable[tuple[str, str, int]]) -> None:
        """Push the expiry of each (counter, reservation, recipients) still under way."""
        with self.env.begin(write=True) as txn:
            now = self.clock()
            for counter, reservation, recipients in held:
                count = self._count(txn, counter, lambda _: 0)
                admission.renew_reservation(count, reservation, recipients, now, self.ttl)
                self._store_reservations(txn, counter, count)

    def renew(self, held: Iterable[tuple[str, str]]) -> None:
        """Push the expiry of each (path, lease) this process still holds."""
        with self.env.begin(write=True) as txn:
            now = self.clock()
            for path, lease in held:
                state = self._load(txn, path)
                state.leases[lease] = now + self.ttl  # re-asserted even if it had expired
                self._store(txn, path, state)

    def release(self, path: str, lease: str) -> None:
        with self.env.begin(write=True) as txn:
            state = self._load(txn, path)
            admission.release(state, lease)
            self._store(txn, path, state)

    def leases(self) -> list[tuple[str, str, float]]:
        """Every unexpired lease of the node: (path, lease, seconds it has left)."""
        now, found = self.clock(), []
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.paths).iternext(values=False):
                path = bytes(key).decode()
                leases = self._load(txn, path).leases.items()
                found += [(path, lease, expiry - now) for lease, expiry in leases if expiry > now]
        return found

    def in_use(self, path: str) -> int:
        """Unexpired leases on ``path`` (for `mta policy show` and tests)."""
        with self.env.begin() as txn:
            state = self._load(txn, path)
        admission.prune(state, self.clock())
        return len(state.leases)

    def close(self) -> None:
        self.env.close()

    def _load(self, txn: lmdb.Transaction, path: str) -> PathState:
        raw = txn.get(path.encode(), db=self.paths)
        if raw is None:
            return PathState()
        stored = json.loads(bytes(raw))
        return PathState(leases=stored["leases"], tat=stored["tat"])

    def _store(self, txn: lmdb.Transaction, path: str, state: PathState) -> None:
        if not state.leases and state.tat is None:
            txn.delete(path.encode(), db=self.paths)
            return
        stored = {"leases": state.leases, "tat": state.tat}
        txn.put(path.encode(), json.dumps(stored).encode(), db=self.paths)

    def _count(self, txn: lmdb.Transaction, counter: str, sent: Callable[[str], int]) -> CountState:
        raw = txn.get(counter.encode(), db=self.reservations)
        reserved = {} if raw is None else json.loads(bytes(raw))
        return CountState(
            sent={"": sent(counter)},
            reserved={r: (n, expiry) for r, (n, expiry) in reserved.items()},
        )

    def _store_reservations(self, txn: lmdb.Transaction, counter: str, count: CountState) -> None:
        if not count.reserved:
            txn.delete(counter.encode(), db=self.reservations)
            return
        txn.put(counter.encode(), json.dumps(count.reserved).encode(), db=self.reservations)
