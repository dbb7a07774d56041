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
from typing import TYPE_CHECKING

from mta.policy.admission import TOLERANCE, Ask, Granted, Refused

if TYPE_CHECKING:
    import redis.asyncio as aioredis  # imported only with Redis: mta.cluster.redis_client

PREFIX = "mta:"
NODES = PREFIX + "nodes"


def _clock(argument: int) -> str:
    """Lua setting ``now``: ARGV[argument] if given (the tests pass one), else
    Redis's own clock, so that nodes' clocks may differ."""
    return f"""
local now = tonumber(ARGV[{argument}])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end"""


# KEYS: per ask, the path's lease set, its tat, its warmup counter's sent
# hash (node -> count) and reservation hash (reservation -> "n expiry"); then
# the settling key and the epoch key. ARGV: lease, ttl, now ("" = Redis's
# clock; the tests pass one), tolerance, the epoch the node last wrote its
# leases under, then per ask max_connections (-1: unlimited), interval (-1:
# unlimited), burst, takes_slot (1 or 0), warmup cap (-1: none) and the
# recipients wanted. Returns {index, reserved, left} (index 1-based, left ""
# without a cap), {0, retry_in, full} (retry_in "" when only a release can
# help; full: the 1-based indices whose cap is used up, comma-separated), or
# {-1, epoch} when the epoch is not the node's: Redis lost what the nodes
# hold, or this node is new to it. While the settling key lives (a new epoch,
# the nodes writing their leases back), nothing is granted. Otherwise it
# mirrors admission.admit.
_ADMIT = (
    _clock(3)
    + """
if redis.call('GET', KEYS[#KEYS]) ~= ARGV[5] then
  return {-1, redis.call('GET', KEYS[#KEYS]) or ''}
end
local settling = redis.call('PTTL', KEYS[#KEYS - 1])
if settling > 0 then return {0, string.format('%.3f', settling / 1000), ''} end
local lease, ttl, tolerance = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local best = nil
local full = {}
for i = 1, (#KEYS - 2) / 4 do
  local leases, tat_key = KEYS[4 * i - 3], KEYS[4 * i - 2]
  local sent_key, reserved_key = KEYS[4 * i - 1], KEYS[4 * i]
  local base = 5 + 6 * (i - 1)
  local max_connections = tonumber(ARGV[base + 1])
  local interval, burst = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local takes_slot = ARGV[base + 4] == '1'
  local cap, wanted = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', string.format('%.6f', now))
  local free = true
  local room = nil
  if cap >= 0 then
    local sent = 0
    for _, count in ipairs(redis.call('HVALS', sent_key)) do sent = sent + tonumber(count) end
    local reserved = 0
    local held = redis.call('HGETALL', reserved_key)
    for j = 1, #held, 2 do
      local n, expiry = string.match(held[j + 1], '(%S+) (%S+)')
      if tonumber(expiry) <= now then
        redis.call('HDEL', reserved_key, held[j])
      else
        reserved = reserved + tonumber(n)
      end
    end
    room = cap - sent - reserved
    if room <= 0 then
      free = false
      if sent >= cap then full[#full + 1] = tostring(i) end
    end
  end
  if free and max_connections >= 0 then
    local needed = 0
    if takes_slot then needed = 1 end
    free = max_connections - redis.call('ZCARD', leases) >= needed
  end
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
    if not room then return {i, 0, ''} end
    local reserved = math.min(wanted, room)
    redis.call('HSET', reserved_key, lease, reserved .. ' ' .. string.format('%.6f', now + ttl))
    redis.call('PEXPIRE', reserved_key, math.ceil(ttl * 1000) + 1000)
    return {i, reserved, tostring(room - reserved)}
  end
end
local retry = ''
if best then retry = string.format('%.6f', best) end
return {0, retry, table.concat(full, ',')}
"""
)

# KEYS: lease sets; ARGV: now ("" = Redis's clock; the tests pass one), then
# per key a lease and the seconds it has left. Renewing and writing back alike.
_RENEW = (
    _clock(1)
    + """
for i = 1, #KEYS do
  local left = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', KEYS[i], string.format('%.6f', now + left), ARGV[2 * i])
  redis.call('PEXPIRE', KEYS[i], math.ceil(left * 1000) + 1000)
end
return #KEYS
"""
)

# KEYS: warmup reservation hashes; ARGV: now ("" = Redis's clock), then per
# key a reservation, its recipients and the seconds it has left.
_RESERVE = (
    _clock(1)
    + """
for i = 1, #KEYS do
  local left = tonumber(ARGV[3 * i + 1])
  redis.call('HSET', KEYS[i], ARGV[3 * i - 1],
             ARGV[3 * i] .. ' ' .. string.format('%.6f', now + left))
  redis.call('PEXPIRE', KEYS[i], math.ceil(left * 1000) + 1000)
end
return #KEYS
"""
)

# KEYS: per counter its sent hash and reservation hash; ARGV: node, how long a
# count is kept (ms), then per counter the node's count and the reservation it
# settles ("": none). A count never goes down (admission.settle).
_SETTLE = """
for i = 1, #KEYS / 2 do
  local sent_key, reserved_key = KEYS[2 * i - 1], KEYS[2 * i]
  local count = tonumber(ARGV[2 * i + 1])
  local before = tonumber(redis.call('HGET', sent_key, ARGV[1]) or '0')
  if count >= before then redis.call('HSET', sent_key, ARGV[1], count) end
  redis.call('PEXPIRE', sent_key, ARGV[2])
  if ARGV[2 * i + 2] ~= '' then redis.call('HDEL', reserved_key, ARGV[2 * i + 2]) end
end
return #KEYS
"""

# KEYS: the node set, the epoch key; ARGV: node, how long a silent node counts
# as alive. Returns Redis's epoch ("" if none), then the nodes alive.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local alive = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - alive)
redis.call('PEXPIRE', KEYS[1], math.ceil(alive * 1000))
local answer = redis.call('ZRANGE', KEYS[1], 0, -1)
table.insert(answer, 1, redis.call('GET', KEYS[2]) or '')
return answer
"""


EPOCH = PREFIX + "epoch"
SETTLING = PREFIX + "settling"


class EpochChanged(Exception):
    """Redis does not hold this node's leases: write them back, then ``join``."""


def lease_key(path: str) -> str:
    return f"{PREFIX}path:{path}:leases"


def tat_key(path: str) -> str:
    return f"{PREFIX}path:{path}:tat"


def sent_key(counter: str) -> str:
    return f"{PREFIX}warmup:{counter}:sent"


def reserved_key(counter: str) -> str:
    return f"{PREFIX}warmup:{counter}:reserved"


COUNT_KEPT = 3 * 86_400  # a day's warmup counts outlive the day, wherever it starts


class RedisLimits:
    def __init__(self, client: aioredis.Redis, ttl: float, settling: float = 0.0) -> None:
        self.client = client
        self.ttl = ttl
        self.settling = settling  # after a new epoch, how long every node has to write back
        self.epoch = ""  # the epoch this node's leases were last written under
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._heartbeat = client.register_script(_HEARTBEAT)

    async def admit(
        self, asks: Sequence[Ask], lease: str, now: float | None = None
    ) -> Granted | Refused:
        keys: list[str] = []
        args: list[str | float | int] = [lease, self.ttl, _now(now), TOLERANCE, self.epoch]
        for ask in asks:
            counter = ask.warmup.counter if ask.warmup else ""
            keys += [lease_key(ask.path), tat_key(ask.path), sent_key(counter)]
            keys.append(reserved_key(counter))
            args += [
                -1 if ask.max_connections is None else ask.max_connections,
                -1 if ask.interval is None else ask.interval,
                ask.burst,
                1 if ask.takes_slot else 0,
                -1 if ask.warmup is None else ask.warmup.cap,
                0 if ask.warmup is None else ask.warmup.wanted,
            ]
        index, *answer = await self._admit(keys=[*keys, SETTLING, EPOCH], args=args)
        if int(index) < 0:
            raise EpochChanged(answer[0])
        if int(index):
            reserved, left = answer
            return Granted(int(index) - 1, int(reserved), int(left) if left else None)
        retry_in, full = (_text(value) for value in answer)
        return Refused(
            float(retry_in) if retry_in else None,
            tuple(int(i) - 1 for i in full.split(",") if i),
        )

    async def renew(self, held: Iterable[tuple[str, str]], now: float | None = None) -> None:
        """Re-assert the leases this node holds, so they outlive a Redis restart too."""
        await self.restore([(path, lease, self.ttl) for path, lease in held], now)

    async def join(self) -> None:
        """Take Redis's epoch (making one if Redis has none); call after writing
        back every lease this node holds."""
        if await self.client.set(EPOCH, os.urandom(8).hex(), nx=True) and self.settling:
            await self.client.set(SETTLING, 1, px=int(self.settling * 1000))
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

    async def reserve(
        self, reservations: Sequence[tuple[str, str, int, float]], now: float | None = None
    ) -> None:
        """Write (counter, reservation, recipients, seconds left) warmup reservations."""
        if reservations:
            await self._reserve(
                keys=[reserved_key(counter) for counter, *_ in reservations],
                args=[
                    _now(now),
                    *(x for _, name, n, left in reservations for x in (name, n, left)),
                ],
            )

    async def settle(self, node: str, counts: Sequence[tuple[str, int, str | None]]) -> None:
        """Take the node's (counter, count, reservation it settles or None) warmup counts."""
        if counts:
            await self._settle(
                keys=[key for c, *_ in counts for key in (sent_key(c), reserved_key(c))],
                args=[
                    node,
                    COUNT_KEPT * 1000,
                    *(x for _, count, reservation in counts for x in (count, reservation or "")),
                ],
            )

    async def sent(self, counter: str) -> dict[str, int]:
        """The counter's count per node (for `mta policy show` and tests)."""
        counts = await self.client.hgetall(sent_key(counter))
        return {_text(node): int(count) for node, count in counts.items()}

    async def release(self, path: str, lease: str) -> None:
        await self.client.zrem(lease_key(path), lease)

    async def in_use(self, path: str) -> int:
        """Leases on ``path`` now, expired ones not counted."""
        now = await self.client.time()
        return int(
            await self.client.zcount(lease_key(path), f"({now[0] + now[1] / 1e6:.6f}", "+inf")
        )

    async def heartbeat(self, node: str, alive_for: float) -> list[str]:
        """Say ``node`` is alive; the nodes alive. Raises EpochChanged if Redis's
        epoch is not the one this node joined."""
        epoch, *names = await self._heartbeat(keys=[NODES, EPOCH], args=[node, alive_for])
        if _text(epoch) != self.epoch:
            raise EpochChanged(_text(epoch))
        return [_text(name) for name in names]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _now(now: float | None) -> str:
    return "" if now is None else f"{now:.6f}"
