"""The suppression list: addresses (and whole domains) we must not mail.

An address lands on the list when it hard-bounced (the receiving server said
it does not exist, `add_hard_bounces`) or when an operator adds it with
`mta suppress add`. Mail to a listed address is refused at RCPT with a
5.1.1 reply, or accepted and dropped with a log line, as `[suppression]
action` says: applications learn at once, and our sending reputation is
spared the bounces that mailing dead addresses causes.

Entries live in the spool's `suppress` database, keyed by the address or by
`@domain`, so the daemon and `mta suppress` share them without a restart.

With `[cluster] redis` the list is shared by the fleet (mta.cluster.suppression_sync)
and the spool stays the copy every RCPT check reads. Every change goes
through ``add``/``remove``, which also note it, in the same commit, in the
spool's `suppress_sync` database until the node has pushed it to Redis: so
a change made while Redis is away, or by `mta suppress` while the daemon is
stopped, is pushed later and never lost. That database also keeps where the
node is in the fleet's log of changes, and which Redis it last followed.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import lmdb

from mta.mail.address import address_is_valid
from mta.spool.store import Spool

OPERATOR = "operator"
BOUNCE = "bounce"


@dataclass(frozen=True)
class Suppression:
    source: str  # OPERATOR or BOUNCE
    reason: str  # the operator's words, or the bounce's reply
    added: str  # ISO 8601 UTC

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Suppression:
        return cls(**json.loads(data))

    def summary(self) -> str:
        """For a 550 reply and a log line: printable ASCII, short."""
        text = f"{self.source} {self.added[:10]}: {self.reason}"
        return "".join(c if " " <= c <= "~" else "?" for c in text)[:120]


def new(source: str, reason: str, now: float | None = None) -> Suppression:
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return Suppression(source, reason, stamp.isoformat(timespec="seconds"))


def entry(text: str) -> str:
    """An address or "@domain", lower case; ValueError for anything else."""
    value = text.strip().lower()
    if value.startswith("@"):
        valid = address_is_valid("postmaster" + value)
    else:
        valid = address_is_valid(value)
    if not valid:
        raise ValueError(f'"{text}" is neither an address nor "@domain"')
    return value


def add(spool: Spool, txn: lmdb.Transaction, entry: str, why: Suppression) -> None:
    """Suppress ``entry`` (an ``entry()`` value), and note the change for the fleet."""
    encoded = why.encode()
    spool.suppress(txn, entry, encoded)
    _note(spool, txn, entry, encoded)


def remove(spool: Spool, txn: lmdb.Transaction, entry: str) -> bool:
    """Mail ``entry`` again; False if it was not on the list."""
    removed = spool.unsuppress(txn, entry)
    if removed:
        _note(spool, txn, entry, None)
    return removed


# --- sharing with the fleet: what the node keeps in `suppress_sync` ---

_SHARED = b"shared"  # present while the list is shared through Redis
_REDIS = b"redis"  # the generation of Redis the node follows (see suppression_sync)
_POSITION = b"position"  # the last ID of the fleet's log applied here
_NUMBER = b"number"  # the last number given to a change
_CHANGE = b"change:"  # + 8-byte number -> a change not yet pushed
START = "0-0"  # the position before the log's first entry


@dataclass(frozen=True)
class Change:
    """A change to the list: ``why`` is the encoded Suppression, None for a removal."""

    entry: str
    why: bytes | None
    number: int = 0  # this node's number for it, for pushing it only once


@dataclass(frozen=True)
class SyncState:
    redis: str | None  # None: this spool never followed the Redis it names now
    position: str


def share(spool: Spool, txn: lmdb.Transaction, shared: bool) -> None:
    """Note changes from now on (``shared``), or forget everything sharing kept."""
    if shared:
        txn.put(_SHARED, b"1", db=spool.suppress_sync)
    else:
        # Next time the list is shared, it is merged with the fleet's whole.
        txn.drop(spool.suppress_sync, delete=False)


def sync_state(spool: Spool, txn: lmdb.Transaction) -> SyncState:
    redis = txn.get(_REDIS, db=spool.suppress_sync)
    position = txn.get(_POSITION, db=spool.suppress_sync)
    return SyncState(
        None if redis is None else bytes(redis).decode(),
        START if position is None else bytes(position).decode(),
    )


def unpushed(spool: Spool, txn: lmdb.Transaction, limit: int | None = None) -> list[Change]:
    """The oldest ``limit`` (or all) changes not yet pushed, in the order they were made."""
    changes: list[Change] = []
    cursor = txn.cursor(db=spool.suppress_sync)
    if cursor.set_range(_CHANGE):
        for key, value in cursor:
            if not bytes(key).startswith(_CHANGE) or len(changes) == limit:
                break
            (number,) = struct.unpack(">Q", key[len(_CHANGE) :])
            entry, _, why = bytes(value).partition(b"\0")
            changes.append(Change(entry.decode(), why or None, number))
    return changes


def pushed(spool: Spool, txn: lmdb.Transaction, changes: Iterable[Change]) -> None:
    for change in changes:
        txn.delete(_change_key(change.number), db=spool.suppress_sync)


def apply(spool: Spool, txn: lmdb.Transaction, changes: Iterable[Change], position: str) -> int:
    """Apply the fleet's changes up to ``position``; how many applied.

    Not to an entry with a change of ours still to push: pushed later, it is the newer.
    """
    mine = _unpushed_entries(spool, txn)
    applied = 0
    for change in changes:
        if change.entry in mine:
            continue
        if change.why is None:
            spool.unsuppress(txn, change.entry)
        else:
            spool.suppress(txn, change.entry, change.why)
        applied += 1
    txn.put(_POSITION, position.encode(), db=spool.suppress_sync)
    return applied


def replace(
    spool: Spool, txn: lmdb.Transaction, listing: Mapping[str, bytes], position: str
) -> None:
    """Make the list the fleet's ``listing`` (as of ``position``), but for our unpushed changes."""
    gone = [entry for entry, _ in spool.suppressions(txn) if entry not in listing]
    changes = [Change(entry, None) for entry in gone]
    changes += [Change(entry, why) for entry, why in listing.items()]
    apply(spool, txn, changes, position)


def merge(
    spool: Spool,
    txn: lmdb.Transaction,
    listing: Mapping[str, bytes],
    redis: str,
    position: str,
) -> None:
    """Follow a Redis new to this spool: the union of its ``listing`` and ours.

    Ours that it lacks become changes to push; its that we lack are added.
    """
    ours = dict(spool.suppressions(txn))
    for entry, why in ours.items():
        if entry not in listing:
            _note(spool, txn, entry, why)
    apply(
        spool,
        txn,
        (Change(entry, why) for entry, why in listing.items() if entry not in ours),
        position,
    )
    txn.put(_REDIS, redis.encode(), db=spool.suppress_sync)


def _note(spool: Spool, txn: lmdb.Transaction, entry: str, why: bytes | None) -> None:
    """Keep the change for the fleet, if the list is shared."""
    if txn.get(_SHARED, db=spool.suppress_sync) is None:
        return
    last = txn.get(_NUMBER, db=spool.suppress_sync)
    number = (0 if last is None else struct.unpack(">Q", last)[0]) + 1
    txn.put(_NUMBER, struct.pack(">Q", number), db=spool.suppress_sync)
    value = entry.encode() + b"\0" + (why or b"")  # an encoded Suppression is never empty
    txn.put(_change_key(number), value, db=spool.suppress_sync)


def _change_key(number: int) -> bytes:
    return _CHANGE + struct.pack(">Q", number)


def _unpushed_entries(spool: Spool, txn: lmdb.Transaction) -> set[str]:
    return {change.entry for change in unpushed(spool, txn)}
