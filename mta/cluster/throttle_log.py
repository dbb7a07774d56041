"""Suspensions, throttles and resumes, told to the fleet through a Redis stream.

Each node keeps its traffic-policy restrictions in its own spool (the copy
every lease reads, which outlives Redis being away). With ``[cluster]
redis``, every decision (a response rule's suspension or throttle on any
node, an operator's ``mta policy suspend|resume``) is also appended to one
stream, and one process per node reads the stream every second and applies
what it finds, in the stream's order, to its spool: one node's Yahoo TSS04
stops that source on every node within about a second.

Applying in stream order, own decisions included, makes every node end in
the same state whatever order the decisions were made in locally: applying
a decision a second time changes nothing (a throttle is known again by its
rule and its time ``at``, mta.policy.throttle), so a node's own decisions,
applied at once and again from the stream, count once. A node
keeps its place in the stream in its spool, so a restart goes on where it
stopped. A decision that could not be appended (Redis away) is kept and
appended later; the stream keeps the last ``MAX_ENTRIES`` decisions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mta.policy.throttle import Throttles

if TYPE_CHECKING:
    import redis.asyncio as aioredis  # imported only with Redis: mta.cluster.redis_client

STREAM = "mta:throttles"
MAX_ENTRIES = 10_000
READ_BATCH = 1000


@dataclass(frozen=True)
class Decision:
    action: str  # "suspend", "throttle" or "resume"
    source: str  # the key's sender: a source name, domain_key(d) or EVERY_SOURCE
    site: str
    until: float = 0.0
    factor: float = 1.0
    reason: str = ""  # the rule's name, or "operator"
    # A suspension's: whether the pool may send the path's mail from its other sources.
    failover: bool = False
    # The rule's (mta.policy.rules.CLASSIFICATIONS), "" for an operator's: a hold
    # for reputation is told apart from a rate throttle by it.
    classification: str = ""
    at: float | None = None  # when the rule acted; None from nodes that did not say

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Decision:
        """The decision ``encode`` wrote, on this node or another, older or newer."""
        known = {field.name for field in dataclasses.fields(cls)}
        written = {name: value for name, value in json.loads(data).items() if name in known}
        # Older nodes wrote no failover, and their suspensions failed over.
        return cls(**{"failover": True, **written})

    def apply(self, throttles: Throttles) -> tuple[float, ...]:
        """Make the decision in ``throttles``; for a resume, the ends it lifted."""
        key = (self.source, self.site)
        if self.action == "suspend":
            throttles.suspend(key, self.until, self.reason, failover=self.failover)
        elif self.action == "throttle":
            throttles.throttle(key, self.factor, self.until, self.reason, at=self.at)
        elif self.action == "resume":
            return throttles.resume(key)
        return ()


class ThrottleLog:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._unsent: list[Decision] = []

    async def publish(self, decisions: Iterable[Decision]) -> None:
        """Append ``decisions``, after any still waiting from when Redis was away;
        on failure they wait for the next call (and the exception is raised)."""
        self._unsent.extend(decisions)
        while self._unsent:
            await self.client.xadd(
                STREAM, {"decision": self._unsent[0].encode()}, maxlen=MAX_ENTRIES
            )
            self._unsent.pop(0)

    async def read(self, after: str) -> tuple[list[Decision], str]:
        """The decisions after stream ID ``after`` (oldest first), and the new place."""
        # [(stream, [(entry id, {field: value})])]; redis-py types it loosely.
        answer: Any = await self.client.xread({STREAM: after}, count=READ_BATCH)
        decided, last = [], after
        for _, entries in answer:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                raw = fields.get(b"decision", fields.get("decision"))
                if raw is not None:
                    decided.append(Decision.decode(raw))
        return decided, last
