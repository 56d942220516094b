"""Counters in Redis for ``limits``' strategies, over our own client (:mod:`openai_forward.resp`).

The same async interface as ``limits.aio.storage.RedisStorage``, the same Lua scripts (read at
run time from the installed ``limits`` package, as ``limits`` does) and the same keys
(``<key_prefix>:<limits' key>``, sliding windows as ``{key}`` and ``{key}/-1``), so the
semantics are ``limits``' own and processes on either implementation count together.
"""

from __future__ import annotations

import time
from importlib.resources import files
from typing import NamedTuple

from limits import RateLimitItem
from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage

from openai_forward.ratelimit.rules import Items
from openai_forward.resp import RedisClient, RedisError, RedisReplyError, Script
from openai_forward.resp_wire import Arg, encode

# Every fixed-window limit of a route in one round trip: the limits in order, each key counted
# as limits' incr_expire does (the expiry set on the first hit, or on every hit when elastic),
# stopping at the first one that is over (later ones are then not counted, as when hit one by
# one). Returns the 1-based index of that limit, or 0.
_HIT_ALL = """
local elastic = ARGV[1] == "1"
for i, key in ipairs(KEYS) do
  local current = redis.call("incrby", key, 1)
  if elastic or current == 1 then
    redis.call("expire", key, ARGV[2 * i])
  end
  if current > tonumber(ARGV[2 * i + 1]) then
    return i
  end
end
return 0
"""


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


class FixedWindowHits:
    """A request's fixed-window hits on Redis in one script call, without ``limits``' layers
    (strategy, error wrapping, key building): the same keys and counts as its
    ``FixedWindowRateLimiter`` (or our elastic one) hitting each limit in turn, for about half
    the CPU. Everything but the keys is encoded once per set of limits."""

    def __init__(self, storage: RedisCounters, elastic: bool) -> None:
        self._client = storage.client
        self._script = Script(storage.client, _HIT_ALL)
        self._prefix = storage.key_prefix
        self._elastic = b"1" if elastic else b"0"
        self._plans: dict[int, _Plan] = {}

    def keys(self, items: Items, user: str, route: str) -> list[str]:
        """The Redis keys of ``items`` for this user and route (``limits``' key layout)."""
        who = f"{user}/{route}".encode()
        return [(before + who + after).decode() for before, after in self._plan(items).around]

    def _plan(self, items: Items) -> _Plan:
        # By identity: hashing the limits themselves runs Python code per limit. The plan holds
        # its items, so their id cannot be reused while the plan is here.
        plan = self._plans.get(id(items))
        if plan is None or plan.items is not items:
            args: list[Arg] = [self._elastic]
            for item in items:
                args += (item.get_expiry(), item.amount)
            # "*<count>", then EVALSHA, the script's SHA1 and the number of keys; the keys go
            # in between; then the arguments
            head = encode([b"EVALSHA", self._script.sha, len(items)])
            head = b"*%d" % (3 + len(items) + len(args)) + head[head.index(b"\r\n") :]
            tail = encode(args)
            tail = tail[tail.index(b"\r\n") + 2 :]
            around = [
                (
                    f"{self._prefix}:{item.namespace}/".encode(),
                    f"/{item.amount}/{item.multiples}/{item.GRANULARITY.name}".encode(),
                )
                for item in items
            ]
            plan = self._plans[id(items)] = _Plan(items, head, around, tail, args)
        return plan

    async def __call__(self, items: Items, user: str, route: str) -> RateLimitItem | None:
        """Count one request against ``items``; the first limit it is over, else None."""
        plan = self._plan(items)
        who = f"{user}/{route}".encode()
        parts = [plan.head]
        for before, after in plan.around:
            parts += (
                b"$%d\r\n" % (len(before) + len(who) + len(after)),
                before,
                who,
                after,
                b"\r\n",
            )
        parts.append(plan.tail)
        try:
            index = await self._client.execute_encoded(b"".join(parts))
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # loads it for the next call
            index = await self._script(self.keys(items, user, route), plan.args)
        return items[index - 1] if index else None


class _Plan(NamedTuple):
    items: Items
    head: bytes
    # per limit: what comes before and after "<user>/<route>" in its key, encoded
    around: list[tuple[bytes, bytes]]
    tail: bytes
    args: list[Arg]
