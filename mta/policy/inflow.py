"""Inflow control: accepting slows down when new mail piles up faster than it leaves.

A node that accepts faster than it delivers fills its spool until
``max_size`` stops it, hours later, with every message delayed behind the
backlog. Postfix slows its clients instead (``in_flow_delay``); so do we.
The backlog watched is the node's untried mail: ready jobs delivery has not
looked at yet (mta.spool.store's "u" count), so mail that waits for a retry, a
suspension or a warmup cap does not slow anyone.

Up to ``backlog`` untried jobs nothing is slowed. Above it, each new
transaction waits before its MAIL FROM is answered, in proportion to how far
above: ``max_delay`` once the backlog is twice the limit. A session that waits
sends less, so the inflow falls until delivery keeps up, and the wait with it.

Pure: the backlog is an argument.
"""

from __future__ import annotations


def delay(untried: int, backlog: int, max_delay: float) -> float:
    """Seconds the next transaction waits; 0.0 at or under the limit (or with none)."""
    if backlog <= 0 or untried <= backlog:
        return 0.0
    return max_delay * min(1.0, (untried - backlog) / backlog)
