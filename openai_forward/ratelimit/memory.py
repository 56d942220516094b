"""In-process counters for ``REQ_RATE_LIMIT_BACKEND=memory://``, behind ``limits``' async
storage interface, so ``limits``' strategies run on them unchanged.

Why not ``limits.aio.storage.MemoryStorage``: after each hit it starts a sweep over every key
whenever the previous sweep has finished, which in a serving event loop is every request, so
the cost of a check grows with the number of users: with 10 000 users, fixed window, about
2 ms of CPU per check against 10 µs here (``benchmarks/ratelimit_check.py --part storages``,
figures in docs/ratelimit.md). Here keys leave through a heap of deadlines, one entry per key,
so a check costs O(log n). No operation awaits inside, so each one is atomic on the event loop
without locks.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow


class MemoryCounters(
    Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}  # fixed and sliding windows
        self._hits: dict[str, deque[float]] = {}  # moving windows: hit times, oldest first
        self._expires: dict[str, float] = {}  # key -> epoch second it expires
        self._deadlines: list[tuple[float, str]] = []  # heap; at most one entry per key

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return ()  # nothing here can be lost

    def _now(self) -> float:
        """The current time, after dropping every key that expired before it."""
        now = time.time()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            expires = self._expires.get(key)
            if expires is not None and expires > now:  # pushed back since: requeue
                heapq.heappush(heap, (expires, key))
            else:
                self._forget(key)
        return now

    def _expire_at(self, key: str, when: float) -> None:
        if key not in self._expires:
            heapq.heappush(self._deadlines, (when, key))
        self._expires[key] = when

    def _forget(self, key: str) -> None:
        self._counts.pop(key, None)
        self._hits.pop(key, None)
        self._expires.pop(key, None)

    # Fixed window (and the two counters of a sliding window).

    async def incr(self, key: str, expiry: float, amount: int = 1, *, elastic: bool = False) -> int:
        """Add ``amount``; a new key expires ``expiry`` seconds from now, and with ``elastic``
        every increment moves the expiry to ``expiry`` seconds from now."""
        now = self._now()
        count = self._counts.get(key, 0) + amount
        self._counts[key] = count
        if elastic or key not in self._expires:
            self._expire_at(key, now + expiry)
        return count

    async def get(self, key: str) -> int:
        self._now()
        return self._counts.get(key, 0)

    async def get_expiry(self, key: str) -> float:
        now = self._now()
        return self._expires.get(key, now)

    async def clear(self, key: str) -> None:
        self._forget(key)  # its heap entry, if any, finds nothing when it comes due

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        count = len(self._expires)
        self._counts.clear()
        self._hits.clear()
        self._expires.clear()
        self._deadlines.clear()
        return count

    # Moving window: the times of the hits in the last ``expiry`` seconds.

    def _window(self, key: str, expiry: int, now: float) -> deque[float]:
        hits = self._hits.get(key)
        if hits is None:
            return deque()
        while hits and hits[0] < now - expiry:
            hits.popleft()
        return hits

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        now = self._now()
        hits = self._window(key, expiry, now)
        if len(hits) + amount > limit:
            return False
        hits.extend([now] * amount)
        self._hits[key] = hits
        self._expire_at(key, now + expiry)
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = self._now()
        hits = self._window(key, expiry, now)
        return (hits[0], len(hits)) if hits else (now, 0)

    # Sliding window counter: the weighted count of the previous and the current window.

    def _sliding(self, key: str, expiry: int, now: float) -> tuple[str, int, float, int, float]:
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous = self._counts.get(previous_key, 0)
        previous_ttl = (1 - ((now - expiry) / expiry) % 1) * expiry if previous else 0.0
        current_ttl = (1 - (now / expiry) % 1) * expiry + expiry
        return current_key, previous, previous_ttl, self._counts.get(current_key, 0), current_ttl

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        now = self._now()
        current_key, previous, previous_ttl, current, _ = self._sliding(key, expiry, now)
        if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
            return False
        # The current window's counter is still needed as the next window's previous one.
        self._counts[current_key] = current + amount
        if current_key not in self._expires:
            self._expire_at(current_key, now + 2 * expiry)
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        now = self._now()
        _, previous, previous_ttl, current, current_ttl = self._sliding(key, expiry, now)
        return previous, previous_ttl, current, current_ttl

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        for window_key in self.sliding_window_keys(key, expiry, time.time()):
            self._forget(window_key)
