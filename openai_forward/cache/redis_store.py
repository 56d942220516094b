"""REDIS: one cache shared by every worker and instance (``redis.asyncio``, no thread).

Keys are ``<REDIS_KEY_PREFIX>:cache:<hex digest>``; Redis drops expired entries itself
(``SET ... PX``). Timeouts are short and a failed command is retried once at once (a pooled
connection the server closed), never with backoff: a cache must not hold a request up.
"""

from __future__ import annotations

from typing import Any

MAX_CONNECTIONS = 64


class RedisStore:
    name = "REDIS"

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = f"{prefix}:cache:"
        self._client: Any = None

    async def open(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # A bounded pool that waits (briefly) for a free connection instead of failing a burst.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=MAX_CONNECTIONS,
            timeout=2,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 1),
        )
        self._client = aioredis.Redis.from_pool(pool)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get(self, key: bytes) -> bytes | None:
        return await self._client.get(self._prefix + key.hex())

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None:
        expiry = max(1, int(ttl * 1000)) if ttl else None
        await self._client.set(self._prefix + key.hex(), value, px=expiry)

    async def delete(self, key: bytes) -> None:
        await self._client.delete(self._prefix + key.hex())
