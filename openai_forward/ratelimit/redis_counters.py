"""Counters in Redis for ``limits``' strategies, over our own client (:mod:`openai_forward.resp`).

The same async interface as ``limits.aio.storage.RedisStorage``, the same Lua scripts (read at
run time from the installed ``limits`` package, as ``limits`` does) and the same keys
(``<key_prefix>:<limits' key>``, sliding windows as ``{key}`` and ``{key}/-1``), so the
semantics are ``limits``' own and processes on either implementation count together.
"""

from __future__ import annotations

import time
from importlib.resources import files

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage

from openai_forward.resp import RedisClient, RedisError, Script


def _lua(name: str) -> str:
    return (files("limits") / "resources" / "redis" / "lua_scripts" / f"{name}.lua").read_text()


class RedisCounters(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    STORAGE_SCHEME = None  # built by open_backend only, never looked up by URL scheme

    def __init__(self, client: RedisClient, key_prefix: str) -> None:
        super().__init__()
        self.client = client
        self.key_prefix = key_prefix
        self._incr_expire = Script(client, _lua("incr_expire"))
        self._moving_window = Script(client, _lua("moving_window"))
        self._acquire_moving_window = Script(client, _lua("acquire_moving_window"))
        self._sliding_window = Script(client, _lua("sliding_window"))
        self._acquire_sliding_window = Script(client, _lua("acquire_sliding_window"))
        self._clear_keys = Script(client, _lua("clear_keys"))

    def prefixed_key(self, key: str) -> str:
        return f"{self.key_prefix}:{key}"

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return (RedisError,)

    # Fixed window

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return int(await self._incr_expire([self.prefixed_key(key)], [expiry, amount]))

    async def get(self, key: str) -> int:
        return int(await self.client.execute(b"GET", self.prefixed_key(key)) or 0)

    async def get_expiry(self, key: str) -> float:
        ttl = await self.client.execute(b"TTL", self.prefixed_key(key))
        return max(ttl, 0) + time.time()

    async def clear(self, key: str) -> None:
        await self.client.execute(b"DEL", self.prefixed_key(key))

    async def check(self) -> bool:
        try:
            return await self.client.execute(b"PING") == b"PONG"
        except RedisError:
            return False

    async def reset(self) -> int | None:
        return await self._clear_keys([self.prefixed_key("*")])

    # Moving window

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        now = time.time()
        keys = [self.prefixed_key(key)]
        return bool(await self._acquire_moving_window(keys, [now, limit, expiry, amount]))

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        window = await self._moving_window([self.prefixed_key(key)], [now - expiry, limit])
        if window:
            oldest, count = window
            return float(oldest), count
        return now, 0

    # Sliding window counter: two counters kept on one cluster slot by the braces

    def _window_keys(self, key: str) -> list[str]:
        current = self.prefixed_key(f"{{{key}}}")
        previous = self.prefixed_key(f"{{{key}}}/-1")
        return [previous, current]

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        keys = self._window_keys(key)
        return bool(await self._acquire_sliding_window(keys, [limit, expiry, amount]))

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        window = await self._sliding_window(self._window_keys(key), [expiry])
        if not window:
            return 0, 0.0, 0, 0.0
        previous, previous_ttl, current, current_ttl = window
        return (
            int(previous or 0),
            max(0, float(previous_ttl or 0)) / 1000,
            int(current or 0),
            max(0, float(current_ttl or 0)) / 1000,
        )

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        await self.client.execute(b"DEL", *self._window_keys(key))
