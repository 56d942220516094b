"""Where the counters live, and the strategy on them.

``memory://`` keeps them in this process (:mod:`openai_forward.ratelimit.memory`). A Redis URL
keeps them in Redis through ``limits``' own ``RedisStorage`` on redis-py's asyncio client: the
keys and Lua scripts are those of ``limits``, so a process using ``limits`` directly with the
same key prefix counts together with the proxy. redis-py comes with the ``[redis]`` extra and is
imported only when a Redis URL is configured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from limits import RateLimitItem
from limits.aio.storage import RedisSentinelStorage, RedisStorage, Storage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import STRATEGIES as LIMITS_STRATEGIES
from limits.aio.strategies import FixedWindowRateLimiter, RateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from openai_forward.ratelimit.memory import MemoryCounters
from openai_forward.settings import ConfigError, Settings, redacted

if TYPE_CHECKING:  # redis-py is an optional extra
    import redis
    import redis.asyncio

VARIABLE = "REQ_RATE_LIMIT_BACKEND"
MAX_REDIS_CONNECTIONS = 65536  # in effect: no cap of its own (see connection_pool)
# A Redis check unanswered in this long is a failure (the limiter then fails open or closed)
# rather than a request held up: a dead or frozen Redis host must not hang the proxy.
REDIS_TIMEOUT = 1.0
STARTUP_TIMEOUT = 2.0

# The URL schemes accepted, and what ``limits`` calls them (its async storages add "async+").
LIMITS_SCHEMES = {
    "redis": "redis",
    "rediss": "rediss",
    "unix": "redis+unix",
    "redis+sentinel": "redis+sentinel",
    "redis+cluster": "redis+cluster",
}

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
            # The script runs on the client limits' storage already holds rather than on one of
            # our own: the same pool, timeouts and TLS options, and Sentinel's master or the
            # cluster node of the key found by redis-py as for limits' own scripts.
            bridge = cast(RedispyBridge, storage.bridge)
            script = _async_client(bridge).register_script(_ELASTIC_INCR)

            async def incr(key: str, expiry: int, amount: int) -> int:
                return int(await script([bridge.prefixed_key(key)], [expiry, amount]))

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
    timeout: float | None = None  # the deadline of one check, if the storage has none of its own


def is_redis(url: str) -> bool:
    return not url.startswith("memory://")


def open_backend(settings: Settings) -> Backend:
    """The storage named by ``REQ_RATE_LIMIT_BACKEND`` with the configured strategy on it.

    Nothing is connected yet: Redis connections open on first use.
    """
    strategy = STRATEGIES[settings.rate_limit_strategy]
    url = settings.req_rate_limit_backend
    if not is_redis(url):
        return Backend(strategy(MemoryCounters()), (), _nothing_to_close)
    _require_redis_py(url)
    uri = limits_uri(url)
    options = _redis_options(uri, REDIS_TIMEOUT, asynchronous=True)
    pool = None
    if url.startswith(("redis://", "rediss://", "unix://")):  # Sentinel and Cluster pool alike
        options["connection_pool"] = pool = connection_pool(url, REDIS_TIMEOUT)
    # One server: one deadline per check, as the pool's connections time out only when
    # connecting. Sentinel and Cluster clients keep their socket timeouts: they move on to the
    # next sentinel, or find a cluster's new layout, only when a socket call fails.
    deadline = REDIS_TIMEOUT if pool is not None else None
    storage = _limits_storage(
        url,
        f"async+{uri}",
        implementation="redispy",
        # The strategy is part of the prefix: strategies keep different Redis types under the
        # same key, and a changed RATE_LIMIT_STRATEGY must not meet WRONGTYPE errors.
        key_prefix=f"{settings.redis_key_prefix}:limits:{settings.rate_limit_strategy}",
        **options,
    )
    assert isinstance(storage, RedisStorage)  # or its Sentinel or cluster subclass
    bridge = cast(RedispyBridge, storage.bridge)

    async def close() -> None:
        clients = [_async_client(bridge), _async_client(bridge, True)]
        if isinstance(storage, RedisSentinelStorage):
            # Sentinel mode has a client for the replicas and one per sentinel as well.
            clients += bridge.sentinel.sentinels
        for client in {id(c): c for c in clients}.values():
            await client.aclose()
        if pool is not None:  # a pool given to a client is not the client's to close
            await pool.disconnect()

    from redis.exceptions import RedisClusterException

    # redis-py raises its RedisError subclasses, but a cluster it cannot reach raises
    # RedisClusterException, and a socket error may reach us bare from below it.
    errors = (*_as_tuple(storage.base_exceptions), RedisClusterException, OSError)
    return Backend(strategy(storage), errors, close, deadline)


async def _nothing_to_close() -> None:
    pass


def _async_client(
    bridge: RedispyBridge, readonly: bool = False
) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    # limits types it as a protocol of the few methods it calls itself
    return cast("redis.asyncio.Redis | redis.asyncio.RedisCluster", bridge.get_connection(readonly))


def _as_tuple(
    exceptions: type[Exception] | tuple[type[Exception], ...],
) -> tuple[type[Exception], ...]:
    return exceptions if isinstance(exceptions, tuple) else (exceptions,)


def limits_uri(url: str) -> str:
    """``url`` as ``limits``' storages name it (``unix://`` is ``redis+unix://`` there)."""
    scheme, _, rest = url.partition("://")
    if scheme not in LIMITS_SCHEMES:
        raise ConfigError(
            VARIABLE,
            redacted(url),
            "memory://, redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://",
        )
    return f"{LIMITS_SCHEMES[scheme]}://{rest}"


def _require_redis_py(url: str) -> None:
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError(
            VARIABLE, redacted(url), 'redis-py installed: pip install "openai-forward[redis]"'
        ) from None


def _limits_storage(url: str, uri: str, **options: Any) -> Any:
    """``limits``' storage for ``uri``; one it cannot build is a ``ConfigError``."""
    try:
        return storage_from_string(uri, **options)
    except (ConfigurationError, ValueError) as exc:
        expected = f"a usable Redis URL ({_reason(exc, url)})"
        raise ConfigError(VARIABLE, redacted(url), expected) from None


def _redis_options(uri: str, timeout: float, *, asynchronous: bool) -> dict[str, Any]:
    """The options of every Redis client here: short timeouts and no retry. (redis-py retries
    a failed command 10 times by default; a hit whose reply was lost may have counted already,
    so a retry could count it twice, and retries would hold the request up.)"""
    from redis.backoff import NoBackoff

    if asynchronous:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry  # type: ignore[assignment]
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if uri.startswith("redis+sentinel://"):  # the same for the sentinels themselves
        options["sentinel_kwargs"] = dict(options)
    return options


def connection_pool(url: str, timeout: float) -> redis.asyncio.ConnectionPool:
    """Connections to ``url`` (``redis://``, ``rediss://`` or ``unix://``), as many as commands
    are in flight: redis-py's default cap (100) fails a command at once past it, and its
    blocking pool costs a task per command (about 30 µs of CPU, measured). The requests in
    flight, which the server bounds, bound the connections. No retry, as for every Redis client
    here.

    ``timeout`` bounds connecting only: the caller puts one deadline (``asyncio.timeout``)
    around each of its operations instead. redis-py's ``socket_timeout`` wraps every write in
    ``asyncio.wait_for``, which on Python 3.11 runs it as a task of its own: measured, 99k of
    the 369k instructions of a limiter hit."""
    from redis.asyncio import ConnectionPool

    options = _redis_options(url, timeout, asynchronous=True)
    options["socket_timeout"] = None
    return ConnectionPool.from_url(url, max_connections=MAX_REDIS_CONNECTIONS, **options)


def ping_redis(url: str) -> None:
    """Raise ``ConfigError`` naming ``REQ_RATE_LIMIT_BACKEND`` unless Redis answers PING
    (after AUTH and SELECT from the URL), the URL's password masked.

    Runs once in the CLI before any worker starts, so a blocking client is right here. It is
    ``limits``' synchronous storage for the URL, which builds the redis-py client for each
    scheme (a plain client, Sentinel's master, a cluster) as the async one does when serving.
    """
    _require_redis_py(url)
    uri = limits_uri(url)
    from limits.storage import RedisStorage as SyncRedisStorage
    from redis.exceptions import RedisClusterException, RedisError

    try:
        storage = _limits_storage(
            url, uri, **_redis_options(uri, STARTUP_TIMEOUT, asynchronous=False)
        )
        assert isinstance(storage, SyncRedisStorage)
        client = cast("redis.Redis | redis.RedisCluster", storage.get_connection())
        try:
            client.ping()
        finally:
            client.close()
    except (RedisError, RedisClusterException, OSError) as exc:
        reason = _reason(exc, url)
        raise ConfigError(VARIABLE, redacted(url), f"a reachable Redis ({reason})") from None


def _reason(exc: BaseException, url: str, limit: int = 200) -> str:
    """``exc`` in one line for a message: the URL's password masked, at most ``limit``
    characters (redis-py puts a whole client's repr in some messages)."""
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        reason = reason.replace(password, "***")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"
