"""The request limiter the forwarder calls before anything goes upstream."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import TYPE_CHECKING

from openai_forward.ratelimit.rules import UNAVAILABLE, Refusal, Rules, refusal
from openai_forward.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from limits import RateLimitItem

    from openai_forward.ratelimit.storage import Backend

logger = logging.getLogger("openai_forward.ratelimit")

# After a storage failure the storage is left alone this long (requests are admitted or refused
# at once without waiting on it); then the next request tries it again.
RETRY_STORAGE_AFTER = 1.0
WARN_EVERY = 60.0
# A refused user stays refused until its window resets; this process answers the repeats itself
# until this long before that reset (Redis reports whole seconds and clocks differ a little),
# so a client hammering after its refusal costs the storage nothing.
HOLD_MARGIN = 1.0


class RequestLimiter:
    """Counts requests per user and route in the configured storage.

    A request is counted against every limit of its route in order and refused by the first
    one that is full (later limits are then not counted). Hits are atomic in the storage, so
    processes sharing a Redis admit exactly the configured number between them.

    Refusals are held in this process until shortly before the window resets (not with the
    elastic strategy, where every refused hit must push the window back): holding only ever
    refuses, so it cannot let more through.
    """

    def __init__(self, settings: Settings, rules: Rules) -> None:
        self._settings = settings
        self._rules = rules
        self._routes = rules.routes  # looked up directly first: the usual route is named there
        self._fail_open = settings.rate_limit_fail_open
        self._backend: Backend | None = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._down_until = 0.0  # monotonic time before which the storage is not tried
        self._warned_at = -WARN_EVERY
        self._hold = settings.rate_limit_strategy != "fixed-window-elastic-expiry"
        self._held: dict[tuple[str, str], tuple[float, float, RateLimitItem]] = {}
        self._held_heap: list[tuple[float, tuple[str, str]]] = []  # (held until, key)

    async def open(self) -> None:
        from openai_forward.ratelimit.storage import open_backend  # limits, and redis-py for Redis

        self._backend = open_backend(self._settings)
        self._errors = self._backend.errors

    async def close(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()

    async def check(self, user: str, route: str) -> Refusal | None:
        """Count one request of ``user`` on ``route``; a :class:`Refusal` if it must not pass."""
        items = self._routes.get(route)
        if items is None:
            route, items = self._rules.for_route(route)
        if not items:
            return None
        if self._held:
            held = self._held.get((user, route))
            if held is not None and held[0] > (now := time.time()):
                return refusal(held[2], held[1], 0, now)
        if self._down_until and time.monotonic() < self._down_until:
            return None if self._fail_open else UNAVAILABLE
        backend = self._backend
        assert backend is not None, "RequestLimiter.check before open"
        try:
            if backend.timeout is None:
                found = await self._count(items, user, route)
            else:
                found = await self._count_within(backend.timeout, items, user, route)
        except self._errors as exc:
            return self._storage_failed(exc)
        if self._down_until:
            self._down_until = 0.0
            logger.info("Rate limit storage is back: requests are limited again")
        return found

    async def _count_within(
        self, seconds: float, items: Sequence[RateLimitItem], user: str, route: str
    ) -> Refusal | None:
        """``_count``, failed with a ``TimeoutError`` that says so (asyncio's has no message)
        if the storage has not answered in ``seconds``. (A Redis backend's errors take in
        ``OSError``, so ``TimeoutError``.)"""
        try:
            async with asyncio.timeout(seconds):
                return await self._count(items, user, route)
        except TimeoutError:
            raise TimeoutError(f"no answer in {seconds:g} s") from None

    async def _count(self, items: Sequence[RateLimitItem], user: str, route: str) -> Refusal | None:
        assert self._backend is not None
        for item in items:
            if not await self._backend.strategy.hit(item, user, route):
                return await self._refuse(item, user, route)
        return None

    async def _refuse(self, item: RateLimitItem, user: str, route: str) -> Refusal:
        assert self._backend is not None
        stats = await self._backend.strategy.get_window_stats(item, user, route)
        now = time.time()
        if self._hold and stats.reset_time - HOLD_MARGIN > now:
            self._remember(user, route, item, stats.reset_time, now)
        return refusal(item, stats.reset_time, stats.remaining, now)

    def _remember(
        self, user: str, route: str, item: RateLimitItem, reset: float, now: float
    ) -> None:
        heap = self._held_heap
        while heap and heap[0][0] <= now:  # forget the holds that are over
            until, key = heapq.heappop(heap)
            if self._held.get(key, (None,))[0] == until:
                del self._held[key]
        until = reset - HOLD_MARGIN
        self._held[user, route] = (until, reset, item)
        heapq.heappush(heap, (until, (user, route)))

    def _storage_failed(self, exc: BaseException) -> Refusal | None:
        now = time.monotonic()
        self._down_until = now + RETRY_STORAGE_AFTER
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            outcome = (
                "admitting requests without limits"
                if self._fail_open
                else "refusing requests (RATE_LIMIT_FAIL_OPEN=false)"
            )
            # The exception names host and port at most, never the URL's password.
            logger.warning(
                "Rate limit storage unavailable (%s: %s): %s until it is back",
                type(exc).__name__,
                exc,
                outcome,
            )
        return None if self._fail_open else UNAVAILABLE
