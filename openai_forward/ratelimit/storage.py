"""Where the counters live: ``limits``' async storage (memory or Redis) and a strategy on it.

``redis`` is imported only when a ``redis://`` backend is configured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from limits import RateLimitItem
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import STRATEGIES as LIMITS_STRATEGIES
from limits.aio.strategies import FixedWindowRateLimiter, RateLimiter

from openai_forward.ratelimit.memory import MemoryCounters
from openai_forward.settings import ConfigError, Settings

# A Redis call that takes longer than this counts as a failure (fail open or closed) instead of
# holding the request: a dead Redis host must not hang the proxy.
REDIS_TIMEOUT = 1.0
REDIS_POOL_SIZE = 64  # per process; requests beyond it wait up to REDIS_TIMEOUT for a connection

# INCRBY and push the expiry back on every hit, refused ones included, in one atomic step.
_ELASTIC_INCR = """
local current = redis.call("incrby", KEYS[1], ARGV[2])
redis.call("expire", KEYS[1], ARGV[1])
return current
"""


class FixedWindowElasticExpiry(FixedWindowRateLimiter):
    """A fixed window whose expiry moves back on every hit, so a client that keeps knocking
    while refused stays refused until it pauses for a whole window.

    ``limits`` 5 dropped this strategy; it is rebuilt here on the same storages: a Lua script
    on Redis (atomic across processes) and an elastic increment of the memory counters.
    """

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage)
        self._incr: Callable[[str, int, int], Awaitable[int]]
        if isinstance(storage, RedisStorage):
            # implementation="redispy": the bridge hands out a redis.asyncio client
            client = storage.bridge.get_connection()  # type: ignore[attr-defined]
            script = client.register_script(_ELASTIC_INCR)
            prefixed = storage.bridge.prefixed_key

            async def incr(key: str, expiry: int, amount: int) -> int:
                return int(await script([prefixed(key)], [expiry, amount]))

        elif isinstance(storage, MemoryCounters):

            async def incr(key: str, expiry: int, amount: int) -> int:
                return await storage.incr(key, expiry, amount, elastic=True)

        else:  # pragma: no cover - only the two storages above are ever built
            raise TypeError(f"no elastic expiry for {type(storage).__name__}")
        self._incr = incr

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        count = await self._incr(item.key_for(*identifiers), item.get_expiry(), cost)
        return count <= item.amount


STRATEGIES: dict[str, type[RateLimiter]] = {
    **LIMITS_STRATEGIES,
    "fixed-window-elastic-expiry": FixedWindowElasticExpiry,
}


@dataclass
class Backend:
    strategy: RateLimiter
    errors: tuple[type[BaseException], ...]  # what a lost storage raises
    close: Callable[[], Awaitable[None]]


def is_redis(url: str) -> bool:
    return not url.startswith("memory://")


def open_backend(settings: Settings) -> Backend:
    """The storage named by ``REQ_RATE_LIMIT_BACKEND`` with the configured strategy on it.

    Nothing is connected yet: Redis connections open on first use, from a bounded pool.
    """
    url = settings.req_rate_limit_backend
    storage: Storage
    if not is_redis(url):
        storage = MemoryCounters()

        async def close() -> None:
            pass

        errors: tuple[type[BaseException], ...] = ()
    else:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError, RedisError

        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_POOL_SIZE,
            timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            # One quick reconnect for a connection that went stale (Redis restarted); never a
            # retry after a timeout, which could count a hit twice.
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
        )
        options: dict[str, Any] = {"connection_pool": pool}
        storage = RedisStorage(
            "async+redis://",  # the pool carries the real URL (redis://, rediss://, unix://)
            implementation="redispy",
            # The strategy is part of the prefix: strategies keep different Redis types under
            # the same key, and a changed RATE_LIMIT_STRATEGY must not meet WRONGTYPE errors.
            key_prefix=f"{settings.redis_key_prefix}:limits:{settings.rate_limit_strategy}",
            **options,
        )
        close = pool.aclose
        errors = (RedisError, OSError, TimeoutError)
    return Backend(STRATEGIES[settings.rate_limit_strategy](storage), errors, close)


def redacted(url: str) -> str:
    """``url`` without its password, for messages and the banner."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def ping_redis(url: str) -> None:
    """Raise ``ConfigError`` naming ``REQ_RATE_LIMIT_BACKEND`` unless Redis answers PING.

    Runs once in the CLI before any worker starts, so a blocking client is right here.
    """
    variable, shown = "REQ_RATE_LIMIT_BACKEND", redacted(url)
    try:
        import redis
    except ImportError:
        raise ConfigError(
            variable, shown, "the redis package: pip install 'openai-forward[redis]'"
        ) from None
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
    except ValueError:
        raise ConfigError(variable, shown, "a URL like redis://host:6379/0") from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}".strip()
        password = urlsplit(url).password
        if password:
            reason = reason.replace(password, "***")
        raise ConfigError(variable, shown, f"a reachable Redis ({reason})") from None
    finally:
        client.close()
