"""What each RATE_LIMIT_STRATEGY does over time, with short windows, on every backend.

The limiter is driven directly (a check takes microseconds, so the timeline is crisp); the
road through the proxy is covered in test_ratelimit.py, and counting together with ``limits``'
own Redis storage in test_redis_limits.py. Each timeline is chosen so that the strategy's answer
differs from a plain fixed window's at one step at least.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from openai_forward.ratelimit import RequestLimiter, build_limiter
from openai_forward.settings import Settings
from tests import ratelimit_backends

limit_env = ratelimit_backends.limit_env
MakeLimiter = Callable[[str, str], Awaitable[RequestLimiter]]


@pytest.fixture
async def make_limiter(limit_env: dict[str, str]) -> AsyncIterator[MakeLimiter]:
    opened: list[RequestLimiter] = []

    async def make(limit: str, strategy: str) -> RequestLimiter:
        env = {**limit_env, "GLOBAL_RATE_LIMIT": limit, "RATE_LIMIT_STRATEGY": strategy}
        limiter = build_limiter(Settings.from_env(env, env_file=None))
        assert limiter is not None
        await limiter.open()
        opened.append(limiter)
        return limiter

    yield make
    for limiter in opened:
        await limiter.close()


async def admitted(limiter: RequestLimiter, n: int, user: str = "u") -> list[bool]:
    return [await limiter.check(user, "/v1/chat/completions") is None for _ in range(n)]


async def at(t0: float, offset: float) -> None:
    await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))


async def test_fixed_window(make_limiter: MakeLimiter):
    limiter = await make_limiter("3/second", "fixed-window")
    t0 = time.monotonic()
    assert await admitted(limiter, 4) == [True, True, True, False]
    await at(t0, 1.25)  # the window (from the first hit) is over: a full new one
    assert await admitted(limiter, 4) == [True, True, True, False]


async def test_fixed_window_elastic_expiry(make_limiter: MakeLimiter):
    limiter = await make_limiter("3/second", "fixed-window-elastic-expiry")
    t0 = time.monotonic()
    assert await admitted(limiter, 4) == [True, True, True, False]
    await at(t0, 0.5)
    assert await admitted(limiter, 1) == [False]  # window now ends at 1.5
    await at(t0, 1.2)
    assert await admitted(limiter, 1) == [False]  # a fixed window would admit; ends at 2.2
    await at(t0, 2.5)  # quiet for longer than a window
    assert await admitted(limiter, 4) == [True, True, True, False]


async def test_moving_window(make_limiter: MakeLimiter):
    limiter = await make_limiter("3/second", "moving-window")
    t0 = time.monotonic()
    assert await admitted(limiter, 1) == [True]
    await at(t0, 0.5)
    assert await admitted(limiter, 1) == [True]
    await at(t0, 0.6)
    assert await admitted(limiter, 2) == [True, False]
    await at(t0, 1.2)  # the first hit left the last second; the two others did not
    assert await admitted(limiter, 2) == [True, False]
    # users have windows of their own
    assert await admitted(limiter, 4, user="v") == [True, True, True, False]


async def test_sliding_window_counter(make_limiter: MakeLimiter):
    limiter = await make_limiter("3/2second", "sliding-window-counter")
    # Start just after a window boundary (the memory backend's windows are aligned to the
    # clock, Redis's to the first hit), so both weigh the previous window alike below.
    await asyncio.sleep(2 - time.time() % 2 + 0.05)
    t0 = time.monotonic()
    assert await admitted(limiter, 4) == [True, True, True, False]
    # 0.3 s into the next window the previous one still weighs ~85%: floor(3 * 0.85) = 2 in
    # use, so one more is admitted where a fixed window would admit three.
    await at(t0, 2.3)
    assert await admitted(limiter, 2) == [True, False]


@pytest.mark.parametrize("strategy", ["fixed-window", "fixed-window-elastic-expiry"])
async def test_several_limits_count_in_order_and_stop_at_the_first_full_one(
    make_limiter: MakeLimiter, strategy: str
):
    """``2/second;3/minute``: the second limit counts only what the first let through, so after
    a refusal by the first a new second admits once more before the minute's limit refuses."""
    limiter = await make_limiter("2/second;3/minute", strategy)
    t0 = time.monotonic()
    assert await admitted(limiter, 3) == [True, True, False]  # the minute has counted 2
    await at(t0, 1.3)
    assert await admitted(limiter, 1) == [True]  # 3 of 3 per minute
    refusal = await limiter.check("u", "/v1/chat/completions")
    assert refusal is not None
    assert "3 per 1 minute" in refusal.message  # refused by the minute, not the second
