"""The fleet's shared limit state in Redis (or Valkey): one script per decision.

The same state and decision as mta.policy.admission, kept in Redis so every
node that names the same server shares it: per path a sorted set of leases
scored by their expiry, and a string holding the GCRA's theoretical arrival
time. A decision is one Lua script, atomic on the server and one round trip
for the lease and the rate together, and it reads Redis's own clock, so the
nodes' clocks may differ. Keys expire by themselves when a path goes quiet.

Every node also keeps a heartbeat in one sorted set, so while Redis is away a
node knows how many nodes were alive to share each limit with
(mta.cluster.limits).

A single Redis (or a primary with replicas / Sentinel): a script touches
several paths' keys, which Redis Cluster would refuse unless they hashed to
one slot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import redis.asyncio as aioredis

from mta.policy.admission import TOLERANCE, Ask, Granted, Refused

PREFIX = "mta:"
NODES = PREFIX + "nodes"

# KEYS: per ask, the path's lease set and its tat; then the settling key and
# the epoch key. ARGV: lease, ttl, now ("" = Redis's clock; the tests pass
# one), tolerance, the epoch the node last wrote its leases under, then per ask
# max_connections (-1: unlimited), interval (-1: unlimited), burst and
# takes_slot (1 or 0). Returns {index, ""} (1-based), {0, retry_in} ("" when
# only a release can help), or {-1, epoch} when the epoch is not the node's:
# Redis lost what the nodes hold, or this node is new to it. While the settling
# key lives (a new epoch, the nodes writing their leases back), nothing is
# granted. Otherwise it mirrors admission.admit.
_ADMIT = """
if redis.call('GET', KEYS[#KEYS]) ~= ARGV[5] then
  return {-1, redis.call('GET', KEYS[#KEYS]) or ''}
end
local settling = redis.call('PTTL', KEYS[#KEYS - 1])
if settling > 0 then return {0, string.format('%.3f', settling / 1000)} end
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local lease, ttl, tolerance = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local best = nil
for i = 1, (#KEYS - 2) / 2 do
  local leases, tat_key = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 5 + 4 * (i - 1)
  local max_connections = tonumber(ARGV[base + 1])
  local interval, burst = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local takes_slot = ARGV[base + 4] == '1'
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', string.format('%.6f', now))
  local needed = 0
  if takes_slot then needed = 1 end
  local free = max_connections < 0
    or max_connections - redis.call('ZCARD', leases) >= needed
  local tat = nil
  if free and interval > 0 then
    tat = tonumber(redis.call('GET', tat_key))
    if tat then
      local wait = tat - (burst - 1) * interval - now
      if wait > tolerance then
        free = false
        if not best or wait < best then best = wait end
      end
    end
  end
  if free then
    if takes_slot then
      redis.call('ZADD', leases, string.format('%.6f', now + ttl), lease)
      redis.call('PEXPIRE', leases, math.ceil(ttl * 1000) + 1000)
    end
    if interval > 0 then
      local next_tat = math.max(tat or now, now) + interval
      redis.call('SET', tat_key, string.format('%.6f', next_tat),
                 'PX', math.ceil((next_tat - now + burst * interval) * 1000) + 1000)
    end
    return {i, ''}
  end
end
if best then return {0, string.format('%.6f', best)} end
return {0, ''}
"""

# KEYS: lease sets; ARGV: now ("" = Redis's clock; the tests pass one), then
# per key a lease and the seconds it has left. Renewing and writing back alike.
_RENEW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
for i = 1, #KEYS do
  local left = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', KEYS[i], string.format('%.6f', now + left), ARGV[2 * i])
  redis.call('PEXPIRE', KEYS[i], math.ceil(left * 1000) + 1000)
end
return #KEYS
"""

# KEYS: the node set; ARGV: node, how long a silent node counts as alive.
# Returns the names of the nodes alive, sorted.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local alive = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - alive)
redis.call('PEXPIRE', KEYS[1], math.ceil(alive * 1000))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


EPOCH = PREFIX + "epoch"
SETTLING = PREFIX + "settling"


class EpochChanged(Exception):
    """Redis does not hold this node's leases: write them back, then ``join``."""


def lease_key(path: str) -> str:
    return f"{PREFIX}path:{path}:leases"


def tat_key(path: str) -> str:
    return f"{PREFIX}path:{path}:tat"


class RedisLimits:
    def __init__(self, client: aioredis.Redis, ttl: float, settle: float = 0.0) -> None:
        self.client = client
        self.ttl = ttl
        self.settle = settle  # after a new epoch, how long every node has to write back
        self.epoch = ""  # the epoch this node's leases were last written under
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self._heartbeat = client.register_script(_HEARTBEAT)

    async def admit(
        self, asks: Sequence[Ask], lease: str, now: float | None = None
    ) -> Granted | Refused:
        keys = [key for ask in asks for key in (lease_key(ask.path), tat_key(ask.path))]
        keys += [SETTLING, EPOCH]
        args: list[str | float | int] = [lease, self.ttl, _now(now), TOLERANCE, self.epoch]
        for ask in asks:
            args += [
                -1 if ask.max_connections is None else ask.max_connections,
                -1 if ask.interval is None else ask.interval,
                ask.burst,
                1 if ask.takes_slot else 0,
            ]
        index, answer = await self._admit(keys=keys, args=args)
        if int(index) < 0:
            raise EpochChanged(answer)
        retry_in = answer
        if int(index):
            return Granted(int(index) - 1)
        return Refused(float(retry_in) if retry_in else None)

    async def renew(self, held: Iterable[tuple[str, str]], now: float | None = None) -> None:
        """Re-assert the leases this node holds, so they outlive a Redis restart too."""
        await self.restore([(path, lease, self.ttl) for path, lease in held], now)

    async def join(self) -> None:
        """Take Redis's epoch (making one if Redis has none); call after writing
        back every lease this node holds."""
        if await self.client.set(EPOCH, os.urandom(8).hex(), nx=True) and self.settle:
            await self.client.set(SETTLING, 1, px=int(self.settle * 1000))
        epoch = await self.client.get(EPOCH)
        self.epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch or "")

    async def restore(
        self, leases: Sequence[tuple[str, str, float]], now: float | None = None
    ) -> None:
        """Write (path, lease, seconds left) leases, whether Redis knows them or not."""
        if leases:
            await self._renew(
                keys=[lease_key(path) for path, _, _ in leases],
                args=[_now(now), *(x for _, lease, left in leases for x in (lease, left))],
            )

    async def release(self, path: str, lease: str) -> None:
        await self.client.zrem(lease_key(path), lease)

    async def in_use(self, path: str) -> int:
        """Leases on ``path`` now, expired ones not counted."""
        now = await self.client.time()
        return int(
            await self.client.zcount(lease_key(path), f"({now[0] + now[1] / 1e6:.6f}", "+inf")
        )

    async def heartbeat(self, node: str, alive_for: float) -> list[str]:
        names = await self._heartbeat(keys=[NODES], args=[node, alive_for])
        return [name.decode() if isinstance(name, bytes) else name for name in names]


def _now(now: float | None) -> str:
    return "" if now is None else f"{now:.6f}"
