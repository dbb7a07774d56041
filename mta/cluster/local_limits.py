"""The node's shared limit state: a small LMDB file beside the spool.

Every worker process of a node opens the same file, so a path's connection
leases and rate (mta.policy.admission) hold across all of them: one write
transaction per decision, which LMDB serialises between processes. The file
holds soft state only (what is under way now), so it is never synced to disk
and is emptied when the node starts: nothing in it outlives its processes
except leases of a worker that died, and those expire by themselves.
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
from mta.policy.admission import Ask, Granted, PathState, Refused

_MAP_SIZE = 64 * 2**20  # a path's record is a few hundred bytes


def local_limits_dir(spool_path: str | Path) -> Path:
    return Path(spool_path) / "limits"


class LocalLimits:
    def __init__(self, directory: str, ttl: float, clock: Callable[[], float] = time.time):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.env = lmdb.open(directory, map_size=_MAP_SIZE, sync=False, metasync=False, mode=0o600)
        self.ttl = ttl
        self.clock = clock

    @staticmethod
    def clear(directory: str) -> None:
        """Empty the file before any worker starts: the last run's leases are void."""
        shutil.rmtree(directory, ignore_errors=True)

    def admit(self, asks: Sequence[Ask], lease: str) -> Granted | Refused:
        with self.env.begin(write=True) as txn:
            states = [_load(txn, ask.path) for ask in asks]
            result = admission.admit(states, asks, lease, self.clock(), self.ttl)
            for ask, state in zip(asks, states, strict=True):
                _store(txn, ask.path, state)
        return result

    def renew(self, held: Iterable[tuple[str, str]]) -> None:
        """Push the expiry of each (path, lease) this process still holds."""
        with self.env.begin(write=True) as txn:
            now = self.clock()
            for path, lease in held:
                state = _load(txn, path)
                state.leases[lease] = now + self.ttl  # re-asserted even if it had expired
                _store(txn, path, state)

    def release(self, path: str, lease: str) -> None:
        with self.env.begin(write=True) as txn:
            state = _load(txn, path)
            admission.release(state, lease)
            _store(txn, path, state)

    def leases(self) -> list[tuple[str, str, float]]:
        """Every unexpired lease of the node: (path, lease, seconds it has left)."""
        now, found = self.clock(), []
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(values=False):
                path = bytes(key).decode()
                leases = _load(txn, path).leases.items()
                found += [(path, lease, expiry - now) for lease, expiry in leases if expiry > now]
        return found

    def in_use(self, path: str) -> int:
        """Unexpired leases on ``path`` (for `mta policy show` and tests)."""
        with self.env.begin() as txn:
            state = _load(txn, path)
        admission.prune(state, self.clock())
        return len(state.leases)

    def close(self) -> None:
        self.env.close()


def _load(txn: lmdb.Transaction, path: str) -> PathState:
    raw = txn.get(path.encode())
    if raw is None:
        return PathState()
    stored = json.loads(bytes(raw))
    return PathState(leases=stored["leases"], tat=stored["tat"])


def _store(txn: lmdb.Transaction, path: str, state: PathState) -> None:
    if not state.leases and state.tat is None:
        txn.delete(path.encode())
        return
    txn.put(path.encode(), json.dumps({"leases": state.leases, "tat": state.tat}).encode())
