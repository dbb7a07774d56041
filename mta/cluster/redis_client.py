"""The one place that imports redis-py, and only once ``[cluster] redis`` is used.

Importing redis.asyncio takes about 70 ms, which every process would pay at
start (the daemon, each worker, every `mta` command) though most nodes run
without Redis. So the modules that talk to Redis import its names for type
checking only, connect with ``connect`` and catch ``redis_error()``, both of
which import it when first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for the Redis at ``url`` (redis.asyncio.Redis.from_url's options);
    it connects at its first command."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, **options)


def redis_error() -> type[Exception]:
    """redis.exceptions.RedisError, which every failure of a command derives from;
    for code that runs only with Redis (not at module level)."""
    import redis.exceptions

    return redis.exceptions.RedisError
