"""Where the counters live (in-process or Redis, behind ``limits``' async storage interface)
and the strategy on them.

Redis is reached through our own pipelined client (:mod:`openai_forward.resp`).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.storage import Storage
from limits.aio.strategies import STRATEGIES as LIMITS_STRATEGIES
from limits.aio.strategies import FixedWindowRateLimiter, RateLimiter

from openai_forward.ratelimit.memory import MemoryCounters
from openai_forward.ratelimit.redis_counters import FixedWindowHits, RedisCounters
from openai_forward.resp import RedisClient, RedisError, Script
from openai_forward.resp_wire import Parser, RedisReplyError, Reply, encode, handshake
from openai_forward.resp_wire import parse_url as parse_redis_url
from openai_forward.settings import ConfigError, Settings, redacted

# A Redis call that takes longer than this counts as a failure (fail open or closed) instead of
# holding the request: a dead Redis host must not hang the proxy.
REDIS_TIMEOUT = 1.0

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
        if isinstance(storage, RedisCounters):
            script = Script(storage.client, _ELASTIC_INCR)
            prefixed = storage.prefixed_key

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
    # All of a request's hits in one call, where the storage and strategy allow it: the first
    # limit the request is over, else None. Otherwise ``strategy.hit`` is called per limit.
    hit_all: FixedWindowHits | None = None


def is_redis(url: str) -> bool:
    return not url.startswith("memory://")


def open_backend(settings: Settings) -> Backend:
    """The storage named by ``REQ_RATE_LIMIT_BACKEND`` with the configured strategy on it.

    Nothing is connected yet: the Redis connection opens on first use.
    """
    url = settings.req_rate_limit_backend
    storage: Storage
    if not is_redis(url):
        storage = MemoryCounters()

        async def close() -> None:
            pass

        errors: tuple[type[BaseException], ...] = ()
    else:
        # One pipelined connection per process; a call unanswered in REDIS_TIMEOUT fails (and
        # is never retried: it may have counted).
        client = RedisClient(url, timeout=REDIS_TIMEOUT, connect_timeout=REDIS_TIMEOUT)
        # The strategy is part of the prefix: strategies keep different Redis types under
        # the same key, and a changed RATE_LIMIT_STRATEGY must not meet WRONGTYPE errors.
        prefix = f"{settings.redis_key_prefix}:limits:{settings.rate_limit_strategy}"
        storage = RedisCounters(client, prefix)
        close = client.close
        errors = (RedisError,)
        strategy = settings.rate_limit_strategy
        if strategy in ("fixed-window", "fixed-window-elastic-expiry"):
            hits = FixedWindowHits(storage, elastic=strategy == "fixed-window-elastic-expiry")
            return Backend(STRATEGIES[strategy](storage), errors, close, hits)
    return Backend(STRATEGIES[settings.rate_limit_strategy](storage), errors, close)


def ping_redis(url: str, timeout: float = 2.0) -> None:
    """Raise ``ConfigError`` naming ``REQ_RATE_LIMIT_BACKEND`` unless Redis answers PING
    (after AUTH and SELECT from the URL).

    Runs once in the CLI before any worker starts, so a blocking socket is right here.
    """
    variable, shown = "REQ_RATE_LIMIT_BACKEND", redacted(url)
    try:
        address = parse_redis_url(url)
    except ValueError:
        raise ConfigError(variable, shown, "a URL like redis://host:6379/0") from None
    commands = [*handshake(address), encode(("PING",))]
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            sock.connect(address.path)
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            if address.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=address.host)
        with sock:
            sock.sendall(b"".join(commands))
            parser, replies = Parser(), list[Reply]()
            while len(replies) < len(commands):
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                replies += parser.feed(data)
        for reply in replies:
            if isinstance(reply, RedisReplyError):
                raise reply
    except (RedisError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}".strip()
        password = address.password
        if password:
            reason = reason.replace(password, "***")
        raise ConfigError(variable, shown, f"a reachable Redis ({reason})") from None
