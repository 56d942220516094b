"""REDIS: one cache shared by every worker and instance, through redis-py's asyncio client.

Keys are ``<REDIS_KEY_PREFIX>:cache:<hex digest>``; Redis drops expired entries itself
(``SET ... PX``). A command unanswered in 2 s fails and is not retried (the caller treats any
failure as a miss and steps aside for a while): a cache must not hold a request up. redis-py
comes with the ``[redis]`` extra and is imported only when this backend is chosen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar, cast

from openai_forward.settings import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool, Redis

TIMEOUT = 2.0
T = TypeVar("T")


class RedisStore:
    name = "REDIS"

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = f"{prefix}:cache:"
        self._client: Redis | None = None
        self._pool: ConnectionPool

    async def open(self) -> None:
        from redis.asyncio import Redis

        from openai_forward.ratelimit.storage import connection_pool

        # No retry (redis-py retries 10 times by default): a miss now beats an answer later.
        self._pool = connection_pool(self._url, TIMEOUT)
        self._client = Redis(connection_pool=self._pool)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
            await self._pool.disconnect()

    def _live(self) -> Redis:
        assert self._client is not None, "RedisStore used before open"
        return self._client

    async def get(self, key: bytes) -> bytes | None:
        return cast(bytes | None, await _answer(self._live().get(self._prefix + key.hex())))

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None:
        name = self._prefix + key.hex()
        await _answer(self._live().set(name, value, px=max(1, int(ttl * 1000)) if ttl else None))

    async def delete(self, key: bytes) -> None:
        await _answer(self._live().delete(self._prefix + key.hex()))


async def _answer(command: Awaitable[T]) -> T:
    """What ``command`` returns, failing it if Redis has not answered in ``TIMEOUT`` (the
    pool's connections time out only when connecting), with a message saying so: asyncio's
    ``TimeoutError`` has none."""
    try:
        async with asyncio.timeout(TIMEOUT):
            return await command
    except TimeoutError:
        raise TimeoutError(f"no answer from Redis in {TIMEOUT:g} s") from None


def require_driver() -> None:
    """Raise ``ConfigError`` naming the extra to install when redis-py is missing."""
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError(
            "CACHE_BACKEND",
            "REDIS",
            "its driver 'redis' installed: pip install \"openai-forward[redis]\"",
        ) from None
