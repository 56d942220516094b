"""The response cache: a repeated request is answered without the upstream.

:meth:`ResponseCache.begin` gives each cacheable call a ticket. What a kind's answers look like,
how a stream of them ends and how an entry is replayed is the kind's own
(:class:`openai_forward.kinds.CacheRules`). A hit replays the stored answer (JSON, or SSE for a
stream request, whichever form filled the entry). A miss watches the relayed
answer and stores it once it is whole and 2xx. Identical misses in one process are coalesced:
the first call goes upstream, the others wait for its answer (single flight). The backend is a
byte store chosen by ``CACHE_BACKEND`` (:mod:`openai_forward.cache.store`); when it fails at run
time the cache steps aside for a few seconds and requests go upstream as misses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

from openai_forward.cache.keys import cache_key, without_caching_field
from openai_forward.cache.store import (
    ON_DISK,
    Store,
    build_store,
    check_driver,
    pack,
    store_path,
    unpack,
)
from openai_forward.cache.tickets import Bypass, Hit, Miss, Ticket
from openai_forward.exchange import Call
from openai_forward.kinds import Kind, cached_kinds
from openai_forward.settings import ConfigError, Settings

__all__ = ["ResponseCache", "Ticket", "build_cache", "check_startup"]

logger = logging.getLogger("openai_forward.cache")

STEP_ASIDE_SECONDS = 3.0  # after a backend failure, how long the cache is not asked
WARN_EVERY_SECONDS = 30.0
MAX_PENDING_WRITES = 1024  # answers waiting for a slow backend; past this new ones are dropped


class ResponseCache:
    def __init__(
        self,
        store: Store,
        kinds: frozenset[Kind],
        read_by_default: bool,
        ttl: float | None,
        *,
        members_only: bool = False,
    ) -> None:
        self.store = store
        self._kinds = kinds
        self._read_by_default = read_by_default
        self._ttl = ttl
        # With forward keys configured, only their holders are answered from the cache: anyone
        # else is forwarded with their own key, and only the upstream can judge that key.
        self._members_only = members_only
        self._flights: dict[bytes, asyncio.Future[bytes | None]] = {}
        # Answers handed to the backend and not yet written: served from here meanwhile, so a
        # request right after a miss is a hit on every backend.
        self._writing: dict[bytes, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._aside_until = 0.0
        self._warned_at = -math.inf
        self._unwarned = 0

    async def open(self) -> None:
        try:
            await self.store.open()
        except Exception as exc:  # the boundary: whatever the driver raises
            self._aside_until = math.inf
            logger.error(
                "The %s cache cannot be opened (%s: %s); this process runs without it",
                self.store.name,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        try:
            await self.store.close()
        except Exception as exc:
            logger.warning("Closing the %s cache failed: %s", self.store.name, exc)

    async def begin(self, call: Call) -> Ticket | None:
        """The call's ticket (may wait for an identical call in flight), or None when its kind
        is not cached. A call its kind keeps out of the cache (a Responses call that continues a
        stored one, say) gets a ticket that neither reads nor stores. Rewrites ``call.body``
        without the ``caching`` field: while the cache is on, every call of an openai-type
        target comes here, so that field of ours does not reach the upstream."""
        payload = call.payload
        body = without_caching_field(payload)
        if body is not None:
            call.body = body
        rules = call.kind.cache if call.kind in self._kinds else None
        if rules is None:
            return None
        if not rules.allows(payload):
            return Bypass()
        flag = payload.get("caching")
        key = cache_key(call.target.base_url, call.route, call.query, payload)
        reads = flag if isinstance(flag, bool) else self._read_by_default
        if not reads or (self._members_only and call.user is None):
            # It may not read, but its fresh answer refreshes the entry.
            return Miss(self._settle, key, None, rules, call)
        answer = self._writing.get(key)
        if answer is None and key not in self._flights:
            answer = await self._read(key)
            if answer is None:
                answer = self._writing.get(key)  # stored while we were reading
        if answer is None:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = asyncio.get_running_loop().create_future()
                return Miss(self._settle, key, flight, rules, call)
            # Shielded: a follower that goes away must not cancel the others' wait.
            answer = await asyncio.shield(flight)
            if answer is None:
                # The first call got no storable answer. Followers go upstream together rather
                # than one after another: an error is likely to repeat, and queueing them would
                # multiply the wait.
                return Miss(self._settle, key, None, rules, call)
        return Hit(answer, rules, payload)

    def _settle(
        self, key: bytes, flight: asyncio.Future[bytes | None] | None, answer: bytes | None
    ) -> None:
        if answer is not None and len(self._writing) < MAX_PENDING_WRITES:
            self._writing[key] = answer
            self._spawn(self._write(key, answer))
        if flight is not None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.done():
                flight.set_result(answer)

    async def _read(self, key: bytes) -> bytes | None:
        if time.monotonic() < self._aside_until:
            return None
        try:
            value = await self.store.get(key)
        except Exception as exc:  # the boundary: a cache failure is a miss, never an error
            self._trouble("read", exc)
            return None
        if value is None:
            return None
        answer, expired = unpack(value)
        if expired:
            self._spawn(self._delete(key))
        return answer

    async def _write(self, key: bytes, answer: bytes) -> None:
        try:
            if time.monotonic() >= self._aside_until:
                await self.store.set(key, pack(answer, self._ttl), self._ttl)
        except Exception as exc:
            self._trouble("write", exc)
        finally:
            if self._writing.get(key) is answer:
                del self._writing[key]

    async def _delete(self, key: bytes) -> None:
        try:
            await self.store.delete(key)
        except Exception as exc:
            self._trouble("delete", exc)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _trouble(self, action: str, exc: Exception) -> None:
        now = time.monotonic()
        self._aside_until = max(self._aside_until, now + STEP_ASIDE_SECONDS)
        if now - self._warned_at < WARN_EVERY_SECONDS:
            self._unwarned += 1
            return
        more = f" ({self._unwarned} more failures since the last warning)" if self._unwarned else ""
        logger.warning(
            "Cache %s on %s failed (%s: %s); requests go upstream for %g s%s",
            action,
            self.store.name,
            type(exc).__name__,
            exc,
            STEP_ASIDE_SECONDS,
            more,
        )
        self._warned_at = now
        self._unwarned = 0


def build_cache(settings: Settings) -> ResponseCache | None:
    if not settings.cache_enabled:
        return None
    return ResponseCache(
        build_store(settings),
        cached_kinds(settings),
        settings.default_request_caching_value,
        settings.cache_ttl,
        members_only=bool(settings.forward_keys),
    )


def check_startup(settings: Settings) -> None:
    """Raise ``ConfigError`` if the configured backend or its driver cannot be used.

    An on-disk store is opened and closed once here, so a folder that cannot hold it (or a
    LevelDB/RocksDB folder another process holds) stops start-up with one clear line.
    """
    if not settings.cache_enabled:
        return
    check_driver(settings.cache_backend)
    if settings.cache_backend == "REDIS":
        from openai_forward.cache.redis_store import require_driver

        require_driver()  # redis-py is an extra, imported only for this backend
    if settings.cache_backend in ON_DISK:
        store = build_store(settings)
        try:
            store.probe()  # type: ignore[attr-defined]
        except Exception as exc:
            raise ConfigError(
                "CACHE_ROOT_PATH_OR_URL",
                settings.cache_root_path_or_url,
                f"a folder where the {settings.cache_backend} cache can live "
                f"({store_path(settings)}: {' '.join(str(exc).split())})",
            ) from None
