"""The suspensions and throttles in force, as one record of the spool's policy state.

Every worker's egress, `mta policy suspend|resume|show` and the fleet's
follower read and write them here, so that all of them agree on one record
(mta.policy.throttle says what the record means).
"""

from __future__ import annotations

import lmdb

from mta.policy.throttle import Throttles
from mta.spool.store import Spool

THROTTLES = "throttles"  # the spool policy-state name of the record


def parse_throttles(raw: bytes | None) -> Throttles:
    return Throttles.from_json(raw.decode()) if raw else Throttles()


def load_throttles(spool: Spool, txn: lmdb.Transaction) -> Throttles:
    return parse_throttles(spool.state(txn, THROTTLES))


def save_throttles(
    spool: Spool, txn: lmdb.Transaction, throttles: Throttles, now: float | None = None
) -> bytes:
    """Store ``throttles`` (with ``now``, less what has expired); the stored record."""
    raw = throttles.to_json(now).encode()
    spool.set_state(txn, THROTTLES, raw)
    return raw
