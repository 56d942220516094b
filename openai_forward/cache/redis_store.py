"""REDIS: one cache shared by every worker and instance, over our own pipelined client
(:mod:`openai_forward.resp`, one connection per process).

Keys are ``<REDIS_KEY_PREFIX>:cache:<hex digest>``; Redis drops expired entries itself
(``SET ... PX``). A command unanswered in 2 s fails (a miss for the caller); a lost connection
is opened again on the next command: a cache must not hold a request up.
"""

from __future__ import annotations

from openai_forward.resp import RedisClient

TIMEOUT = 2.0


class RedisStore:
    name = "REDIS"

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = f"{prefix}:cache:"
        self._client: RedisClient | None = None

    async def open(self) -> None:
        self._client = RedisClient(self._url, timeout=TIMEOUT, connect_timeout=TIMEOUT)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _live(self) -> RedisClient:
        assert self._client is not None, "RedisStore used before open"
        return self._client

    async def get(self, key: bytes) -> bytes | None:
        return await self._live().execute(b"GET", self._prefix + key.hex())

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None:
        name = self._prefix + key.hex()
        if ttl:
            await self._live().execute(b"SET", name, value, b"PX", max(1, int(ttl * 1000)))
        else:
            await self._live().execute(b"SET", name, value)

    async def delete(self, key: bytes) -> None:
        await self._live().execute(b"DEL", self._prefix + key.hex())
