"""Cost of one request-limit check (``RequestLimiter.check``), per backend and strategy.

For N users on a route limited to 1 per hour, three rounds are timed:

- admit:  each user's first request (admitted; the storage counts it);
- refuse: each user's second request (refused; the storage counts it and the window is read
  for the headers);
- repeat: each user's third request (refused again; answered from the refusal this process
  holds until the window is nearly over, without the storage; the elastic strategy never
  holds, since every refused hit must push its window back).

Wall-clock time is what a request waits; CPU time is what the check takes from the event loop
(with Redis the rest of the wait is the round trip).

    PYTHONPATH=. python benchmarks/ratelimit_check.py [--n 5000] [--redis redis://127.0.0.1:6379/0]

Redis keys go under a private REDIS_KEY_PREFIX and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import time
import uuid

import uvloop

from openai_forward.ratelimit import RequestLimiter, build_limiter
from openai_forward.settings import RATE_LIMIT_STRATEGIES, Settings

ROUNDS = ("admit", "refuse", "repeat")


async def timed(limiter: RequestLimiter, users: list[str]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for user in users:
        await limiter.check(user, "/v1/chat/completions")
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000, help="users (checks per round)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"aifd-bench-{uuid.uuid4().hex[:8]}"
    print("µs per check, wall clock / CPU")
    print(f"{'backend':8} {'strategy':28}" + "".join(f"{r:>16}" for r in ROUNDS))
    try:
        for backend in ("memory://", args.redis):
            for strategy in RATE_LIMIT_STRATEGIES:
                rounds = await measure(backend, strategy, args.n, prefix)
                cells = "".join(f"{f'{wall:.1f} / {cpu:.1f}':>16}" for wall, cpu in rounds)
                print(f"{backend.split('://')[0]:8} {strategy:28}{cells}")
    finally:
        import redis.asyncio

        client = redis.asyncio.from_url(args.redis)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


if __name__ == "__main__":
    uvloop.run(main())
