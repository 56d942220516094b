"""Cost of one request-limit check: ``RequestLimiter.check`` timed in a loop, per backend and
strategy, for an admitted request (the common case) and a refused one (which also reads the
window to fill the headers).

    PYTHONPATH=. python benchmarks/ratelimit_check.py [--n 10000] [--users 1000]
                                                      [--redis redis://127.0.0.1:6379/0]

Keys go under a private REDIS_KEY_PREFIX and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import time
import uuid

import uvloop

from openai_forward.ratelimit import build_limiter
from openai_forward.settings import RATE_LIMIT_STRATEGIES, Settings


async def measure(
    backend: str, strategy: str, n: int, users: int, prefix: str
) -> tuple[float, float]:
    settings = Settings.from_env(
        {
            "GLOBAL_RATE_LIMIT": f"{10 * n}/hour",  # never full: every check admits
            "REQ_RATE_LIMIT": '{"/v1/full": "1/hour"}',  # full after one: every check refuses
            "RATE_LIMIT_STRATEGY": strategy,
            "REQ_RATE_LIMIT_BACKEND": backend,
            "REDIS_KEY_PREFIX": prefix,
        },
        env_file=None,
    )
    limiter = build_limiter(settings)
    assert limiter is not None
    await limiter.open()
    try:
        results = []
        for route in ("/v1/chat/completions", "/v1/full"):
            for _ in range(100):  # warm up: connections, scripts, keys
                await limiter.check("warm-up", route)
            start = time.perf_counter()
            for i in range(n):
                await limiter.check(f"user-{i % users}", route)
            results.append((time.perf_counter() - start) / n * 1e6)
        return results[0], results[1]
    finally:
        await limiter.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"aifd-bench-{uuid.uuid4().hex[:8]}"
    print(f"{'backend':10} {'strategy':28} {'admit µs':>9} {'refuse µs':>10}")
    try:
        for backend in ("memory://", args.redis):
            for strategy in RATE_LIMIT_STRATEGIES:
                admit, refuse = await measure(backend, strategy, args.n, args.users, prefix)
                name = backend.split("://")[0]
                print(f"{name:10} {strategy:28} {admit:9.1f} {refuse:10.1f}")
    finally:
        import redis.asyncio

        client = redis.asyncio.from_url(args.redis)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


if __name__ == "__main__":
    uvloop.run(main())
