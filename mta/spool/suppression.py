"""The suppression list: addresses (and whole domains) we must not mail.

An address lands on the list when a receiving server said, beyond doubt,
that it does not exist (``is_hard_bounce``), or when an operator adds it
with `mta suppress add`. Mail to a listed address is refused at RCPT with a
5.1.1 reply, or accepted and dropped with a log line, as `[suppression]
action` says: applications learn at once, and our sending reputation is
spared the bounces that mailing dead addresses causes.

For whom. A bounce suppresses the address only for mail from the sender
domain (the envelope MAIL FROM's) of the message that bounced: a receiver's
"no such user" to one sender is no reason to refuse every other sender's
mail. A bounce of a message from the null sender suppresses nothing. An
operator's entry holds for every sender, or for one sender domain when
given one. Mail from the null sender meets only the entries for every
sender.

For how long. A bounce's entry expires after `[suppression] bounce_expiry`
(mailboxes come back), an operator's when `--for` says, else never; the
moment is kept in the entry ("expires"). Entries written before expiry
existed have none: an operator's never expires, a bounce's expires
LEGACY_BOUNCE_LIFETIME after it was added (those hold for every sender: the
sender was not kept). An expired entry stops nothing; it is removed by the
RCPT check that meets it and by `mta suppress list`.

Entries live in the spool's `suppress` database, lower case, keyed by

    ADDRESS or @DOMAIN                for every sender (the only kind before scopes)
    ADDRESS SP SENDER-DOMAIN          for mail from SENDER-DOMAIN only

A space is in no valid address or domain, so a key splits one way only, and
the RCPT check makes one exact lookup per key an entry could be under
(``lookup_keys``), never a scan. The daemon and `mta suppress` share them
without a restart.

With `[cluster] redis` the list is shared by the fleet (mta.cluster.suppression_sync)
under the same keys, and the spool stays the copy every RCPT check reads. Every change goes
through ``add``/``remove``, which also note it, in the same commit, in the
spool's `suppress_sync` database until the node has pushed it to Redis: so
a change made while Redis is away, or by `mta suppress` while the daemon is
stopped, is pushed later and never lost. That database also keeps where the
node is in the fleet's log of changes, and which Redis it last followed.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

import lmdb

from mta.mail.address import address_is_valid, domain_of
from mta.mail.reply import Reply
from mta.spool.store import Spool

OPERATOR = "operator"
BOUNCE = "bounce"
EVERY_SENDER = ""  # the scope of an entry that holds whoever sends
# The lifetime of bounce entries written before entries kept their expiry:
# [suppression] bounce_expiry's default, which they were never given.
LEGACY_BOUNCE_LIFETIME = 180 * 86400.0


# --- which bounces suppress ---

# 5.1.1 no such mailbox, 5.1.10 recipient not found (Microsoft), 5.1.2 no such domain.
_HARD_STATUSES = {"5.1.1", "5.1.10", "5.1.2"}
_NO_SUCH_USER = re.compile(
    r"The email account that you tried to reach does not exist"  # Gmail
    r"|RESOLVER\.ADR\.Recip(?:ient)?NotFound"  # Microsoft
    r"|Recipient not found by SMTP address lookup"  # Microsoft
    r"|This user doesn't have a \S+ account"  # Yahoo, AOL
    r"|user unknown|no such user",
    re.IGNORECASE,
)


def is_hard_bounce(reply: Reply) -> bool:
    """Did the receiving server say, beyond doubt, that the recipient does not exist?

    Yes for a 5xx whose enhanced status is 5.1.1, 5.1.10 or 5.1.2, and for a
    5xx whose status says no more than "an address problem" (none, 5.0.0,
    5.1.x) with a "no such user" text (the big providers', "user unknown").
    No for anything else: "mailbox unavailable", 5.2.x (disabled, full) and
    5.7.x (policy, spam) may be about us or may pass, and a 4xx is never final.
    """
    if reply.code // 100 != 5:
        return False
    if reply.status in _HARD_STATUSES:
        return True
    vague = reply.status.startswith(("5.0.", "5.1."))
    return vague and _NO_SUCH_USER.search(reply.text) is not None


# --- entries ---


@dataclass(frozen=True)
class Suppression:
    """Why an entry is on the list, and until when (the value under its key)."""

    source: str  # OPERATOR or BOUNCE
    reason: str  # the operator's words, or the bounce's reply
    added: str  # ISO 8601 UTC
    expires: str | None = None  # ISO 8601 UTC; None: never

    def encode(self) -> bytes:
        # Without "expires" when it never expires: what nodes that predate expiry can read.
        stored = {name: value for name, value in asdict(self).items() if value is not None}
        return json.dumps(stored, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Suppression:
        stored = json.loads(data)
        if stored["source"] == BOUNCE and "expires" not in stored:  # from before bounces expired
            stored["expires"] = _iso(_seconds(stored["added"]) + LEGACY_BOUNCE_LIFETIME)
        # Fields only a newer node knows are left out, so that every node reads every entry.
        return cls(**{spec.name: stored[spec.name] for spec in fields(cls) if spec.name in stored})

    def expired(self, now: float) -> bool:
        return self.expires is not None and _seconds(self.expires) <= now


@dataclass(frozen=True)
class Entry:
    """One entry of the list: mail to whom it stops, from whom, and why."""

    target: str  # an address or "@domain"
    scope: str  # the sender domain it holds for; EVERY_SENDER: whoever sends
    why: Suppression

    @classmethod
    def read(cls, key: str, value: bytes) -> Entry:
        target, _, scope = key.partition(" ")
        return cls(target, scope, Suppression.decode(value))

    @property
    def key(self) -> str:
        return entry_key(self.target, self.scope)

    def summary(self) -> str:
        """For a 550 reply and a log line: printable ASCII, short."""
        scope = f" for mail from {self.scope}" if self.scope else ""
        text = f"{self.why.source} {self.why.added[:10]}{scope}: {self.why.reason}"
        return "".join(c if " " <= c <= "~" else "?" for c in text)[:120]


@dataclass(frozen=True)
class Lookup:
    """What the RCPT check found: the entry that stops the mail, and expired ones to remove."""

    entry: Entry | None
    expired: tuple[str, ...]  # their keys


def new(
    source: str, reason: str, now: float | None = None, lifetime: float | None = None
) -> Suppression:
    """Why an entry added ``now`` is there; it expires ``lifetime`` seconds later (None: never)."""
    added = time.time() if now is None else now
    expires = None if lifetime is None else _iso(added + lifetime)
    return Suppression(source, reason, _iso(added), expires)


def entry(text: str) -> str:
    """An address or "@domain", lower case; ValueError for anything else."""
    value = text.strip().lower()
    valid = _is_domain(value[1:]) if value.startswith("@") else address_is_valid(value)
    if not valid:
        raise ValueError(f'"{text}" is neither an address nor "@domain"')
    return value


def parse_sender_domain(text: str) -> str:
    """A sender domain to scope an entry to, lower case; ValueError for anything else."""
    value = text.strip().lower()
    if not _is_domain(value):
        raise ValueError(f'"{text}" is not a domain')
    return value


def entry_key(target: str, scope: str = EVERY_SENDER) -> str:
    """The key of the entry for ``target`` (an address or "@domain") and ``scope``."""
    return f"{target} {scope}".lower() if scope else target.lower()


def lookup_keys(recipient: str, sender: str) -> tuple[str, ...]:
    """The keys of every entry that could stop mail from ``sender`` to ``recipient``."""
    address = recipient.lower()
    keys = (address, "@" + address.rpartition("@")[2])
    domain = domain_of(sender)
    return (*keys, entry_key(address, domain)) if domain else keys


def lookup(spool: Spool, txn: lmdb.Transaction, recipient: str, sender: str, now: float) -> Lookup:
    """The entry that stops mail from ``sender`` to ``recipient`` at ``now``, if any."""
    found = []
    for key in lookup_keys(recipient, sender):
        raw = spool.suppression(txn, key)
        if raw is not None:
            found.append(Entry.read(key, raw))
    holding = [listed for listed in found if not listed.why.expired(now)]
    expired = tuple(listed.key for listed in found if listed.why.expired(now))
    return Lookup(holding[0] if holding else None, expired)


def entries(spool: Spool, txn: lmdb.Transaction, target: str | None = None) -> list[Entry]:
    """Every entry, or those for ``target``: for every sender, then per sender domain."""
    if target is None:
        return [Entry.read(key, why) for key, why in spool.suppressions(txn)]
    key = entry_key(target)
    for_everyone = spool.suppression(txn, key)
    listed = [] if for_everyone is None else [Entry.read(key, for_everyone)]
    scoped = spool.suppressions(txn, prefix=key + " ")
    return listed + [Entry.read(scoped_key, why) for scoped_key, why in scoped]


def current(spool: Spool, txn: lmdb.Transaction, now: float) -> list[Entry]:
    """Every entry that holds at ``now``; the expired ones are removed."""
    holding = []
    for listed in entries(spool, txn):
        if listed.why.expired(now):
            _remove(spool, txn, listed.key)
        else:
            holding.append(listed)
    return holding


def add(
    spool: Spool,
    txn: lmdb.Transaction,
    target: str,
    why: Suppression,
    scope: str = EVERY_SENDER,
) -> None:
    """Suppress ``target`` (an ``entry()`` value) for ``scope``; note the change for the fleet."""
    key, encoded = entry_key(target, scope), why.encode()
    spool.suppress(txn, key, encoded)
    _note(spool, txn, key, encoded)


def remove(spool: Spool, txn: lmdb.Transaction, target: str, scope: str = EVERY_SENDER) -> bool:
    """Mail ``target`` again (from ``scope``); False if it had no such entry."""
    return _remove(spool, txn, entry_key(target, scope))


def remove_expired(spool: Spool, txn: lmdb.Transaction, keys: Iterable[str], now: float) -> int:
    """Remove those of ``keys`` whose entries have expired at ``now``; how many.

    Each is read again: it may have been added anew since it was found expired.
    """
    removed = 0
    for key in keys:
        raw = spool.suppression(txn, key)
        if raw is not None and Suppression.decode(raw).expired(now):
            _remove(spool, txn, key)
            removed += 1
    return removed


def _remove(spool: Spool, txn: lmdb.Transaction, key: str) -> bool:
    removed = spool.unsuppress(txn, key)
    if removed:
        _note(spool, txn, key, None)
    return removed


def _is_domain(text: str) -> bool:
    return address_is_valid("postmaster@" + text)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


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

    key: str  # the entry's (``entry_key``)
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
            key, _, why = bytes(value).partition(b"\0")  # no key holds a NUL
            changes.append(Change(key.decode(), why or None, number))
    return changes


def pushed(spool: Spool, txn: lmdb.Transaction, changes: Iterable[Change]) -> None:
    for change in changes:
        txn.delete(_change_key(change.number), db=spool.suppress_sync)


def apply(spool: Spool, txn: lmdb.Transaction, changes: Iterable[Change], position: str) -> int:
    """Apply the fleet's changes up to ``position``; how many applied.

    Not to an entry with a change of ours still to push: pushed later, it is the newer.
    """
    mine = _unpushed_keys(spool, txn)
    applied = 0
    for change in changes:
        if change.key in mine:
            continue
        if change.why is None:
            spool.unsuppress(txn, change.key)
        else:
            spool.suppress(txn, change.key, change.why)
        applied += 1
    txn.put(_POSITION, position.encode(), db=spool.suppress_sync)
    return applied


def replace(
    spool: Spool, txn: lmdb.Transaction, listing: Mapping[str, bytes], position: str
) -> None:
    """Make the list the fleet's ``listing`` (as of ``position``), but for our unpushed changes."""
    gone = [key for key, _ in spool.suppressions(txn) if key not in listing]
    changes = [Change(key, None) for key in gone]
    changes += [Change(key, why) for key, why in listing.items()]
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
    for key, why in ours.items():
        if key not in listing:
            _note(spool, txn, key, why)
    apply(
        spool,
        txn,
        (Change(key, why) for key, why in listing.items() if key not in ours),
        position,
    )
    txn.put(_REDIS, redis.encode(), db=spool.suppress_sync)


def _note(spool: Spool, txn: lmdb.Transaction, key: str, why: bytes | None) -> None:
    """Keep the change for the fleet, if the list is shared."""
    if txn.get(_SHARED, db=spool.suppress_sync) is None:
        return
    last = txn.get(_NUMBER, db=spool.suppress_sync)
    number = (0 if last is None else struct.unpack(">Q", last)[0]) + 1
    txn.put(_NUMBER, struct.pack(">Q", number), db=spool.suppress_sync)
    value = key.encode() + b"\0" + (why or b"")  # an encoded Suppression is never empty
    txn.put(_change_key(number), value, db=spool.suppress_sync)


def _change_key(number: int) -> bytes:
    return _CHANGE + struct.pack(">Q", number)


def _unpushed_keys(spool: Spool, txn: lmdb.Transaction) -> set[str]:
    return {change.key for change in unpushed(spool, txn)}
