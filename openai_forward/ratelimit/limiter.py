"""The request limiter the forwarder calls before anything goes upstream (SPEC §7.1)."""

from __future__ import annotations

import logging
import time

from limits import RateLimitItem

from openai_forward.ratelimit.rules import UNAVAILABLE, Refusal, Rules, refusal
from openai_forward.ratelimit.storage import Backend, open_backend
from openai_forward.settings import Settings

logger = logging.getLogger("openai_forward.ratelimit")

# After a storage failure the storage is left alone this long (requests are admitted or refused
# at once without waiting on it); then the next request tries it again.
RETRY_STORAGE_AFTER = 1.0
WARN_EVERY = 60.0


class RequestLimiter:
    """Counts requests per user and route in the configured storage.

    A request is counted against every limit of its route in order and refused by the first
    one that is full (later limits are then not counted). Hits are atomic in the storage, so
    processes sharing a Redis admit exactly the configured number between them.
    """

    def __init__(self, settings: Settings, rules: Rules) -> None:
        self._settings = settings
        self._rules = rules
        self._fail_open = settings.rate_limit_fail_open
        self._backend: Backend | None = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._down_until = 0.0  # monotonic time before which the storage is not tried
        self._warned_at = -WARN_EVERY

    async def open(self) -> None:
        self._backend = open_backend(self._settings)
        self._errors = self._backend.errors

    async def close(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()

    async def check(self, user: str, route: str) -> Refusal | None:
        """Count one request of ``user`` on ``route``; a :class:`Refusal` if it must not pass."""
        route, items = self._rules.for_route(route)
        if not items:
            return None
        if self._down_until and time.monotonic() < self._down_until:
            return None if self._fail_open else UNAVAILABLE
        assert self._backend is not None, "RequestLimiter.check before open"
        strategy = self._backend.strategy
        try:
            for item in items:
                if not await strategy.hit(item, user, route):
                    return await self._refuse(item, user, route)
        except self._errors as exc:
            return self._storage_failed(exc)
        if self._down_until:
            self._down_until = 0.0
            logger.warning("Rate limit storage is back: requests are limited again")
        return None

    async def _refuse(self, item: RateLimitItem, user: str, route: str) -> Refusal:
        assert self._backend is not None
        stats = await self._backend.strategy.get_window_stats(item, user, route)
        return refusal(item, stats.reset_time, stats.remaining, time.time())

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
