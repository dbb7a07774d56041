"""The suppression list shared by the fleet through Redis (`[cluster] redis`).

Each node's spool keeps the whole list and every RCPT check reads only that
(mta.spool.suppression), so accepting mail never waits on Redis. In Redis:

    mta:suppress          hash: entry -> why (an encoded Suppression): the whole list
    mta:suppress:log      stream of changes (entry, why; why "" for a removal),
                          trimmed to about LOG_LENGTH
    mta:suppress:pushed   hash: node -> the number of the last change it pushed
    mta:suppress:redis    a random name for this Redis's data, made by the first
                          node to find it missing

One task per node (the daemon, or its worker 0) does, every POLL_SECONDS:
push the changes made on this node (kept in its spool since the commit that
made them: hard bounces, `mta suppress add|remove`), then read the log from
where it left off and apply it to the spool.

What it guarantees:

- While Redis answers, a change made on any node reaches every running
  node's spool within about a second, and the nodes end with the same list:
  for each entry, the last change in the log's order.
- A change is pushed exactly once (the script skips numbers at or below the
  node's last, so dying between pushing and noting it pushed does no harm),
  and never lost: while Redis is away the changes wait in the spool, and
  `mta suppress` writes them there even when the daemon is stopped.
- A node that was away catches up from the log if it still holds every
  change since the node's position, else from the hash: its list becomes the
  hash's, except for the entries with a change of its own still to push.
- A node that meets a Redis it never followed (a new node, or Redis back
  empty: the name is gone, or back from an older snapshot: the log ends
  before the node's position) merges: it adds the hash's entries it lacks and
  pushes its own the hash lacks. Nothing suppressed is lost when Redis loses
  its data; an entry removed just before may come back from a node that had
  not yet heard of the removal (remove it again).

Node names (`[cluster] node`) must differ, as they must for queue IDs. One
Redis (or a primary), without key eviction.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from mta.cluster import redis_client
from mta.config import ClusterConfig
from mta.spool import suppression
from mta.spool.store import Spool

if TYPE_CHECKING:
    import redis.asyncio as aioredis  # imported only with Redis: mta.cluster.redis_client

log = logging.getLogger("mta.cluster")

LISTING = "mta:suppress"
LOG = LISTING + ":log"
PUSHED = LISTING + ":pushed"
NAME = LISTING + ":redis"
POLL_SECONDS = 0.25  # how often a node pushes and reads: "within about a second"
RETRY_SECONDS = 1.0
TIMEOUT_SECONDS = 2.0  # a Redis that answers nothing this long is away
LOG_LENGTH = 100_000  # changes kept for nodes that were away; older ones: from the hash
BATCH = 1000  # changes per round trip
MAX_BATCHES = 100  # per poll, so a long log is read over several polls

# KEYS: listing, log, pushed. ARGV: node, log length, then per change its
# number, entry and why ("" = removed). Returns the node's last number pushed.
_PUSH = """
local done = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
for i = 3, #ARGV, 3 do
  local number, entry, why = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]
  if number > done then
    if why == '' then
      redis.call('HDEL', KEYS[1], entry)
    else
      redis.call('HSET', KEYS[1], entry, why)
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'entry', entry, 'why', why)
    done = number
  end
end
redis.call('HSET', KEYS[3], ARGV[1], done)
return done
"""


class SuppressionSync:
    def __init__(
        self, spool: Spool, client: aioredis.Redis, node: str, log_length: int = LOG_LENGTH
    ) -> None:
        self.spool = spool
        self.client = client
        self.node = node
        self.log_length = log_length
        self.away = False
        self._push_changes = client.register_script(_PUSH)
        with spool.write() as txn:  # changes are noted from now on, before the first poll
            suppression.share(spool, txn, True)

    async def run(self) -> None:
        """Keep the spool's list and the fleet's in step, until cancelled."""
        trouble = (TimeoutError, OSError, redis_client.redis_error())
        try:
            while True:
                try:
                    await self.step()
                except trouble as error:
                    self._went_away(error)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                if self.away:
                    self.away = False
                    log.warning("redis is back: the suppression list is shared again")
                await asyncio.sleep(POLL_SECONDS)
        finally:
            await self.client.aclose()

    async def step(self) -> None:
        """Catch up if need be, push this node's changes, apply the fleet's."""
        with self.spool.read() as txn:
            state = suppression.sync_state(self.spool, txn)
        name = await self._name()
        last = await self._last_id()
        if name != state.redis or _id(state.position) > _id(last):
            await self._catch_up(last, merge_as=name)
        elif await self._missed(state.position):
            await self._catch_up(last)
        await self._push()
        await self._follow()

    async def _name(self) -> str:
        """This Redis's data's name, made now if it has none (new, or back empty)."""
        await self.client.set(NAME, secrets.token_hex(8), nx=True)
        name = await self.client.get(NAME)
        assert name is not None, "set just now, and never deleted or expired"
        return str(name)

    async def _last_id(self) -> str:
        return _first_id(await self.client.xrevrange(LOG, count=1)) or suppression.START

    async def _missed(self, position: str) -> bool:
        """Were changes after ``position`` trimmed from the log before we read them?"""
        oldest = _first_id(await self.client.xrange(LOG, count=1))
        return oldest is not None and _id(oldest) > _id(position)

    async def _catch_up(self, last: str, merge_as: str | None = None) -> None:
        """From the whole list: replace ours with it, or (``merge_as``) merge the two."""
        if merge_as is not None:
            # Our change numbers start again (a new spool), or Redis has no record of them.
            await self.client.hdel(PUSHED, self.node)
        listing = {
            str(entry): str(why).encode()
            async for entry, why in self.client.hscan_iter(LISTING, count=BATCH)
        }
        with self.spool.write() as txn:
            if merge_as is None:
                suppression.replace(self.spool, txn, listing, last)
            else:
                suppression.merge(self.spool, txn, listing, merge_as, last)
        log.info(
            "suppression list: %s redis's %d entries",
            "replaced by" if merge_as is None else "merged with",
            len(listing),
        )

    async def _push(self) -> None:
        for _ in range(MAX_BATCHES):
            with self.spool.read() as txn:
                changes = suppression.unpushed(self.spool, txn, BATCH)
            if not changes:
                return
            args: list[str | int] = [self.node, self.log_length]
            for change in changes:
                args += [change.number, change.key, (change.why or b"").decode()]
            await self._push_changes(keys=[LISTING, LOG, PUSHED], args=args)
            with self.spool.write() as txn:
                suppression.pushed(self.spool, txn, changes)

    async def _follow(self) -> None:
        with self.spool.read() as txn:
            position = suppression.sync_state(self.spool, txn).position
        for _ in range(MAX_BATCHES):
            reply = await self.client.xread({LOG: position}, count=BATCH)
            if not reply:
                return
            changes, position = _read(reply)
            with self.spool.write() as txn:
                suppression.apply(self.spool, txn, changes, position)

    def _went_away(self, error: BaseException) -> None:
        if not self.away:
            self.away = True
            log.warning(
                "redis away (%s): suppression list changes wait in the spool until it is back",
                type(error).__name__ if isinstance(error, TimeoutError) else error,
            )


def _first_id(entries: Any) -> str | None:
    """The ID of the first of XRANGE's (or XREVRANGE's) ``entries``, None if none."""
    return str(entries[0][0]) if entries else None


def _read(reply: Any) -> tuple[list[suppression.Change], str]:
    """XREAD's ``reply`` (from the log alone, not empty): the changes, and the last ID."""
    [(_, entries)] = reply
    changes = [
        suppression.Change(str(fields["entry"]), str(fields["why"]).encode() or None)
        for _, fields in entries
    ]
    return changes, str(entries[-1][0])


def _id(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def syncer(cluster: ClusterConfig, spool: Spool) -> SuppressionSync | None:
    """What shares the list with ``[cluster] redis``, or None without it.

    Without it the spool forgets what sharing kept, so sharing again later starts with a merge.
    """
    if cluster.redis is None:
        with spool.write() as txn:
            suppression.share(spool, txn, False)
        return None
    client = redis_client.connect(
        cluster.redis,
        socket_connect_timeout=TIMEOUT_SECONDS,
        socket_timeout=TIMEOUT_SECONDS,
        decode_responses=True,
    )
    return SuppressionSync(spool, client, cluster.node)
