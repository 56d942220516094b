"""Cost of a request-limit check, in µs, wall clock / CPU.

``storages``: the in-process counters, ``limits``' own ``MemoryStorage`` against ours
(``MemoryCounters``), with 10 and 10 000 users. Each user is counted once first (so the storage
holds one key per user), then 20 000 hits go round the users through the strategy, with the
event loop yielding between two hits as a serving loop does (other requests run there).

``limiter``: ``RequestLimiter.check`` per backend and strategy. For N users on a route limited
to 1 per hour, three rounds are timed:

- admit:  each user's first request (admitted; the storage counts it);
- refuse: each user's second request (refused; the storage counts it and the window is read
  for the headers);
- repeat: each user's third request (refused again; answered from the refusal this process
  holds until the window is nearly over, without the storage; the elastic strategy never
  holds, since every refused hit must push its window back).

CPU time is what a check takes from the event loop (with Redis the rest of the wall-clock wait
is the round trip).

    PYTHONPATH=. python benchmarks/ratelimit_check.py [--part storages|limiter|all]
        [--n 5000] [--redis redis://127.0.0.1:6379/0]

Redis keys go under a private REDIS_KEY_PREFIX and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import uvloop
from limits import parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter

from openai_forward.ratelimit import RequestLimiter, build_limiter
from openai_forward.ratelimit.memory import MemoryCounters
from openai_forward.settings import RATE_LIMIT_STRATEGIES, Settings

ROUTE = "/v1/chat/completions"
ROUNDS = ("admit", "refuse", "repeat")
STORAGES: dict[str, type[Storage]] = {
    "limits MemoryStorage": MemoryStorage,
    "ours (MemoryCounters)": MemoryCounters,
}
WINDOWS: dict[str, type[RateLimiter]] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
}
USERS = (10, 10_000)
HITS = 20_000
REPEAT = 3


async def storage_check(
    storage_class: type[Storage], window: type[RateLimiter], users: int
) -> tuple[float, float]:
    storage = storage_class()
    strategy = window(storage)
    item = parse("1000000/hour")  # every hit is admitted: the cost of counting, not refusing
    names = [f"user-{i}" for i in range(users)]
    for name in names:
        await strategy.hit(item, name, ROUTE)
        await asyncio.sleep(0)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(HITS):
        await strategy.hit(item, names[i % users], ROUTE)
        await asyncio.sleep(0)  # as in a serving loop, other tasks run between two checks
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    await storage.reset()
    return wall / HITS * 1e6, cpu / HITS * 1e6


async def compare_storages() -> None:
    print(f"µs per check, wall clock / CPU, median of {REPEAT} runs of {HITS} hits")
    print(f"{'storage':22} {'strategy':14}" + "".join(f"{f'{n} users':>18}" for n in USERS))
    for label, storage_class in STORAGES.items():
        for window_name, window in WINDOWS.items():
            cells = []
            for users in USERS:
                runs = [await storage_check(storage_class, window, users) for _ in range(REPEAT)]
                wall = statistics.median(run[0] for run in runs)
                cpu = statistics.median(run[1] for run in runs)
                cells.append(f"{f'{wall:.1f} / {cpu:.1f}':>18}")
            print(f"{label:22} {window_name:14}" + "".join(cells))


async def timed(limiter: RequestLimiter, users: list[str]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for user in users:
        await limiter.check(user, ROUTE)
    n = len(users)
    return (time.perf_counter() - start) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def measure(backend: str, strategy: str, n: int, prefix: str) -> list[tuple[float, float]]:
    env = {
        "GLOBAL_RATE_LIMIT": "1/hour",
        "RATE_LIMIT_STRATEGY": strategy,
        "REQ_RATE_LIMIT_BACKEND": backend,
        "REDIS_KEY_PREFIX": prefix,
    }
    limiter = build_limiter(Settings.from_env(env, env_file=None))
    assert limiter is not None
    await limiter.open()
    try:
        await timed(limiter, [f"warm-up-{i}" for i in range(100)])  # connections, scripts
        users = [f"user-{i}" for i in range(n)]
        return [await timed(limiter, users) for _ in ROUNDS]
    finally:
        await limiter.close()


async def compare_backends(n: int, redis_url: str) -> None:
    prefix = f"aifd-bench-{uuid.uuid4().hex[:8]}"
    print(f"RequestLimiter.check, µs per check, wall clock / CPU, {n} users")
    print(f"{'backend':8} {'strategy':28}" + "".join(f"{r:>16}" for r in ROUNDS))
    try:
        for backend in ("memory://", redis_url):
            for strategy in RATE_LIMIT_STRATEGIES:
                rounds = await measure(backend, strategy, n, prefix)
                cells = "".join(f"{f'{wall:.1f} / {cpu:.1f}':>16}" for wall, cpu in rounds)
                print(f"{backend.split('://')[0]:8} {strategy:28}{cells}")
    finally:
        import redis.asyncio

        client = redis.asyncio.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("storages", "limiter", "all"), default="all")
    parser.add_argument("--n", type=int, default=5000, help="users of the limiter part")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    if args.part in ("storages", "all"):
        await compare_storages()
    if args.part in ("limiter", "all"):
        if args.part == "all":
            print()
        await compare_backends(args.n, args.redis)


if __name__ == "__main__":
    uvloop.run(main())
