"""Request limits on Redis, through the proxy: the counters are those of ``limits`` itself, the
Sentinel and cluster URLs work, and a frozen Redis costs a request one timeout at most."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import httpx
import pytest

from openai_forward.ratelimit import build_limiter, check_startup
from openai_forward.settings import ConfigError, Settings
from tests.support import RedisProcess, free_port

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
# The proxy's peer is 127.0.0.1, trusted by default: this header names the user.
USER = "203.0.113.7"

# A process counting with nothing but limits: its async Redis storage on redis-py and one of its
# strategies, under the proxy's key prefix (<REDIS_KEY_PREFIX>:limits:<strategy>). Prints how
# many of its hits were admitted.
LIMITS_ALONE = """
import asyncio, sys
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import STRATEGIES

url, prefix, strategy, limit, user, route, hits = sys.argv[1:]

async def main():
    storage = RedisStorage(
        "async+" + url, implementation="redispy", key_prefix=f"{prefix}:limits:{strategy}"
    )
    limiter = STRATEGIES[strategy](storage)
    admitted = [await limiter.hit(parse(limit), user, route) for _ in range(int(hits))]
    print(sum(admitted))

asyncio.run(main())
"""


def hits_of_limits_alone(redis_server, strategy: str, limit: str, hits: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", LIMITS_ALONE, redis_server.url, redis_server.prefix,
         strategy, limit, USER, CHAT, str(hits)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return int(result.stdout)


def settings(**env: str) -> Settings:
    return Settings.from_env(env, env_file=None)


async def statuses(proxy, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        headers = {"X-Forwarded-For": USER}
        return [(await client.post(CHAT, json=BODY, headers=headers)).status_code for _ in range(n)]


@pytest.mark.redis
@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
async def test_counters_are_shared_with_limits_own_storage(
    proxy_factory, upstream, redis_server, strategy: str
):
    """Another process limiting with ``limits`` alone and the proxy admit exactly 5 together."""
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        GLOBAL_RATE_LIMIT="5/minute",
        RATE_LIMIT_STRATEGY=strategy,
        REQ_RATE_LIMIT_BACKEND=redis_server.url,
        REDIS_KEY_PREFIX=redis_server.prefix,
    )
    assert hits_of_limits_alone(redis_server, strategy, "5/minute", 2) == 2
    assert await statuses(proxy, 5) == [200, 200, 200, 429, 429]
    assert hits_of_limits_alone(redis_server, strategy, "5/minute", 2) == 0
    assert len(upstream.requests) == 3


@pytest.mark.redis
async def test_sentinel_url(proxy_factory, upstream, redis_process, tmp_path_factory):
    master = redis_process()
    directory = tmp_path_factory.mktemp("sentinel")
    config = directory / "sentinel.conf"
    config.write_text(f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
    sentinel = RedisProcess(directory, "--sentinel", config=config).start()
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        check_startup(settings(REQ_RATE_LIMIT_BACKEND=url, GLOBAL_RATE_LIMIT="2/minute"))
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url, GLOBAL_RATE_LIMIT="2/minute", REQ_RATE_LIMIT_BACKEND=url
        )
        assert await statuses(proxy, 3) == [200, 200, 429]
    finally:
        sentinel.kill()


@pytest.mark.redis
async def test_a_frozen_sentinel_is_passed_over(
    proxy_factory, upstream, redis_process, tmp_path_factory
):
    """The first sentinel named answers nothing (SIGSTOP): the first request waits for one
    socket timeout, and the next sentinel is asked; then limits work at full speed."""
    master = redis_process()
    sentinels = []
    for _ in range(2):
        directory = tmp_path_factory.mktemp("sentinel")
        config = directory / "sentinel.conf"
        config.write_text(f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
        sentinels.append(RedisProcess(directory, "--sentinel", config=config).start())
    try:
        addresses = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in sentinels)
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url,
            GLOBAL_RATE_LIMIT="3/minute",
            REQ_RATE_LIMIT_BACKEND=f"redis+sentinel://{addresses}/mymaster",
            RATE_LIMIT_FAIL_OPEN="false",  # a failed check would be a 503
        )
        sentinels[0].freeze()
        start = time.monotonic()
        assert await statuses(proxy, 1) == [200]
        assert time.monotonic() - start < 2.5  # one socket timeout (1 s), then the next one
        start = time.monotonic()
        assert await statuses(proxy, 2) == [200, 200]
        assert time.monotonic() - start < 1.0
        # A refusal reads the window from a replica: its client asks the sentinels afresh.
        assert await statuses(proxy, 1) == [429]
    finally:
        for sentinel in sentinels:
            sentinel.kill()


@pytest.fixture
def redis_cluster(redis_process, tmp_path_factory) -> str:
    """A Redis cluster of one node holding every slot: its ``redis+cluster://`` URL."""
    import redis

    nodes = tmp_path_factory.mktemp("cluster") / "nodes.conf"
    node = redis_process(
        "--cluster-enabled", "yes", "--cluster-config-file", str(nodes),
        "--cluster-port", str(free_port()),
    )  # fmt: skip
    with redis.Redis(port=node.port) as client:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
    return f"redis+cluster://127.0.0.1:{node.port}"


@pytest.mark.redis
async def test_cluster_url(proxy_factory, upstream, redis_cluster: str):
    url = redis_cluster
    for strategy in ("fixed-window-elastic-expiry", "sliding-window-counter"):
        env = {"GLOBAL_RATE_LIMIT": "2/minute", "RATE_LIMIT_STRATEGY": strategy}
        check_startup(settings(**env, REQ_RATE_LIMIT_BACKEND=url))
        proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, REQ_RATE_LIMIT_BACKEND=url, **env)
        assert await statuses(proxy, 3) == [200, 200, 429], strategy


@pytest.mark.redis
@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_a_frozen_redis_costs_one_timeout_then_limits_resume(
    proxy_factory, upstream, redis_process, caplog, fail_open: bool
):
    caplog.set_level(logging.INFO, logger="openai_forward.ratelimit")
    redis = redis_process()
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        REQ_RATE_LIMIT_BACKEND=redis.url,
        GLOBAL_RATE_LIMIT="3/minute",
        RATE_LIMIT_FAIL_OPEN=str(fail_open).lower(),
    )
    expected = 200 if fail_open else 503
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:

        async def timed() -> tuple[int, float]:
            start = time.monotonic()
            response = await client.post(CHAT, json=BODY)
            return response.status_code, time.monotonic() - start

        assert (await timed())[0] == 200
        redis.freeze()  # SIGSTOP: connections stay open, nothing answers
        try:
            first, waited = await timed()
            assert first == expected
            assert waited < 2.0  # one Redis timeout (1 s), not a hang
            second, at_once = await timed()
            assert second == expected and at_once < 0.5  # Redis is left alone for a while
        finally:
            redis.thaw()
        await asyncio.sleep(1.1)
        after = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and after[-1:] != [429]:
            after.append((await timed())[0])
    # The counter kept the first request; the one sent while frozen may have counted too
    # (Redis read it on waking), so one or two more are admitted, then refused.
    assert after[-1] == 429 and set(after[:-1]) == {200} and len(after) in (2, 3), after
    assert any(
        "storage unavailable (TimeoutError: no answer in 1 s)" in r.getMessage()
        for r in caplog.records
    )
    assert any("is back" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis+sentinel://:s3cret@127.0.0.1:{port}", "expected a usable Redis URL"),
        ("redis+sentinel://:s3cret@127.0.0.1:{port}/mymaster", "(MasterNotFoundError: "),
        ("redis+cluster://:s3cret@127.0.0.1:{port}", "(RedisClusterException: "),
    ],
)
def test_startup_check_of_sentinel_and_cluster_urls(url: str, expected: str):
    url = url.format(port=free_port())
    with pytest.raises(ConfigError) as info:
        check_startup(settings(REQ_RATE_LIMIT_BACKEND=url, GLOBAL_RATE_LIMIT="1/second"))
    message = str(info.value)
    assert message.startswith("REQ_RATE_LIMIT_BACKEND='redis+") and expected in message
    assert "s3cret" not in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_an_unreachable_redis_fails_open_or_closed_whatever_the_scheme(scheme: str):
    for fail_open, expected in (("true", None), ("false", 503)):
        env = {
            "REQ_RATE_LIMIT_BACKEND": f"{scheme}://127.0.0.1:{free_port()}",
            "GLOBAL_RATE_LIMIT": "1/second",
            "RATE_LIMIT_FAIL_OPEN": fail_open,
        }
        limiter = build_limiter(settings(**env))
        assert limiter is not None
        await limiter.open()
        try:
            refusal = await limiter.check("u", CHAT)
            assert (refusal and refusal.status) == expected
        finally:
            await limiter.close()


async def test_more_requests_in_flight_than_redis_connections(
    proxy_factory, upstream, redis_server
):
    """Past the pool's 100 connections, a limit check waits for a free one instead of failing
    (redis-py's default pool refuses at once, which here would admit unchecked)."""
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        REQ_RATE_LIMIT='{"/v1/models": "150/minute"}',
        REQ_RATE_LIMIT_BACKEND=redis_server.url,
        REDIS_KEY_PREFIX=redis_server.prefix,
        RATE_LIMIT_FAIL_OPEN="false",
    )
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=proxy.url, limits=limits, timeout=20) as client:
        answers = await asyncio.gather(*(client.get("/v1/models") for _ in range(160)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 150 + [429] * 10
