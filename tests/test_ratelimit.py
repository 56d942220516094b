"""Request limits through the real proxy, on every backend.

Each test that takes ``limit_env`` runs once on ``memory://`` and once on the real Redis
(under a key prefix of its own), like ``limits`` runs one suite over its storages.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest

from tests import fake_openai, ratelimit_backends
from tests.conftest import ProxyServer, RecordingUpstream

limit_env = ratelimit_backends.limit_env

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def limited(proxy_factory, upstream, limit_env):
    """Start a proxy in front of the fake OpenAI upstream with ``limit_env`` and ``env``."""

    def start(**env: str) -> ProxyServer:
        fake_openai.install(upstream)
        return proxy_factory(OPENAI_BASE_URL=upstream.url, **limit_env, **env)

    return start


def upstream_count(upstream: RecordingUpstream, path: str = CHAT) -> int:
    return sum(1 for r in upstream.requests if r.path_qs.split("?")[0] == path)


async def test_over_the_limit_429_with_headers_and_nothing_upstream(limited, upstream):
    proxy = limited(REQ_RATE_LIMIT=orjson.dumps({CHAT: "3/minute"}).decode())
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        statuses = [(await client.post(CHAT, json=BODY)).status_code for _ in range(3)]
        before = time.time()
        refused = await client.post(CHAT, json=BODY)
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json() == {
        "error": {
            "message": "Rate limit exceeded: 3 per 1 minute",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }
    }
    headers = refused.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit"] == "3"
    assert headers["x-ratelimit-remaining"] == "0"
    # X-RateLimit-Reset is the epoch second the window resets, Retry-After the wait until then
    reset = int(headers["x-ratelimit-reset"])
    assert before <= reset <= before + 61
    assert abs(reset - (before + int(headers["retry-after"]))) <= 2
    assert upstream_count(upstream) == 3


async def test_openai_sdk_raises_rate_limit_error_with_the_message(limited, upstream):
    proxy = limited(GLOBAL_RATE_LIMIT="1/minute", FORWARD_KEY="fk-team", OPENAI_API_KEY="sk-real")
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="fk-team", max_retries=0
    ) as ai:
        await ai.chat.completions.create(**BODY)  # type: ignore[call-overload]
        with pytest.raises(openai.RateLimitError) as info:
            await ai.chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert info.value.status_code == 429
    assert info.value.message.endswith("Rate limit exceeded: 1 per 1 minute")
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == "Rate limit exceeded: 1 per 1 minute"
    assert info.value.body["type"] == "rate_limit_error"
    assert upstream_count(upstream) == 1


async def test_users_are_counted_apart(limited, upstream, limit_env):
    proxy = limited(GLOBAL_RATE_LIMIT="2/minute", FORWARD_KEY="fk-alice,fk-bob")
    alice = {"Authorization": "Bearer fk-alice"}
    bob = {"Authorization": "Bearer fk-bob"}
    async with httpx.AsyncClient(base_url=proxy.url) as client:

        async def status(headers: dict[str, str]) -> int:
            return (await client.post(CHAT, json=BODY, headers=headers)).status_code

        assert [await status(alice) for _ in range(3)] == [200, 200, 429]
        assert [await status(bob) for _ in range(3)] == [200, 200, 429]
        # no key: the client address is the user
        assert [await status({}) for _ in range(3)] == [200, 200, 429]
        # a key that is not a forward key is the client's own: still identified by address
        assert await status({"Authorization": "Bearer sk-own"}) == 429
    assert upstream_count(upstream) == 6
    if "REDIS_KEY_PREFIX" in limit_env:  # forward keys reach Redis only as hashes
        import redis.asyncio as aioredis

        client = aioredis.from_url(limit_env["REQ_RATE_LIMIT_BACKEND"])
        try:
            keys = [k async for k in client.scan_iter(match=limit_env["REDIS_KEY_PREFIX"] + "*")]
        finally:
            await client.aclose()
        assert len(keys) == 3
        assert not any(b"fk-" in key for key in keys)
        assert any(b"127.0.0.1" in key for key in keys)


async def test_route_limits_and_the_global_fallback(limited, upstream):
    proxy = limited(
        REQ_RATE_LIMIT=orjson.dumps({CHAT: "2/minute", "/v1/embeddings": "1/minute"}).decode(),
        GLOBAL_RATE_LIMIT="3/minute",
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:

        async def statuses(path: str, n: int, method: str = "POST") -> list[int]:
            body = {"model": "e", "input": "x"} if "embeddings" in path else BODY
            return [(await client.request(method, path, json=body)).status_code for _ in range(n)]

        assert await statuses(CHAT, 3) == [200, 200, 429]
        assert await statuses("/v1/embeddings", 2) == [200, 429]
        # every other route falls back to the global limit, with a counter per route
        assert await statuses("/v1/models", 4, "GET") == [200, 200, 200, 429]
        assert await statuses("/v1/completions", 4) == [200, 200, 200, 429]
        # spellings the upstream reads as the same route count on the same counter
        assert await statuses("/v1/chat/complet%69ons", 1) == [429]
        assert await statuses(CHAT + "/", 1) == [429]
        refused = await client.post("/v1/chat/complet%69ons", json=BODY)
    assert refused.json()["error"]["message"] == "Rate limit exceeded: 2 per 1 minute"
    assert upstream_count(upstream) == 2


async def test_routes_are_named_with_their_prefix(proxy_factory, upstream):
    fake_openai.install(upstream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        OPENAI_ROUTE_PREFIX="/openai",
        REQ_RATE_LIMIT=orjson.dumps({"/openai/v1/chat/completions": "1/minute"}).decode(),
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        first = await client.post("/openai" + CHAT, json=BODY)
        second = await client.post("/openai" + CHAT, json=BODY)
        other = [(await client.get("/openai/v1/models")).status_code for _ in range(3)]
    assert (first.status_code, second.status_code) == (200, 429)
    assert other == [200, 200, 200]  # no global limit: unlimited


async def test_several_limits_all_apply(limited, upstream):
    proxy = limited(REQ_RATE_LIMIT=orjson.dumps({CHAT: "2/second;3/minute"}).decode())
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        burst = [await client.post(CHAT, json=BODY) for _ in range(3)]
        await asyncio.sleep(1.1)
        later = [await client.post(CHAT, json=BODY) for _ in range(2)]
    assert [r.status_code for r in burst] == [200, 200, 429]
    assert burst[2].json()["error"]["message"] == "Rate limit exceeded: 2 per 1 second"
    assert [r.status_code for r in later] == [200, 429]
    assert later[1].json()["error"]["message"] == "Rate limit exceeded: 3 per 1 minute"
    assert later[1].headers["x-ratelimit-limit"] == "3"
    assert upstream_count(upstream) == 3


async def test_healthz_is_never_limited(limited):
    proxy = limited(GLOBAL_RATE_LIMIT="1/minute")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        statuses = [(await client.get("/healthz")).status_code for _ in range(5)]
    assert statuses == [200] * 5


@pytest.mark.parametrize("trusted", [True, False])
async def test_x_forwarded_for_counts_only_from_trusted_proxies(limited, upstream, trusted):
    # The test client connects from 127.0.0.1; 10.255.255.1 is only a name in the config.
    proxy = limited(
        GLOBAL_RATE_LIMIT="1/minute",
        FORWARDED_ALLOW_IPS="127.0.0.1" if trusted else "10.255.255.1",
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:

        async def status(address: str) -> int:
            headers = {"X-Forwarded-For": address}
            return (await client.post(CHAT, json=BODY, headers=headers)).status_code

        first = await status("203.0.113.7")
        second = await status("198.51.100.9")
        third = await status("203.0.113.7")
    if trusted:  # each forwarded address is a user of its own
        assert (first, second, third) == (200, 200, 429)
    else:  # a client cannot pick a new identity by sending the header
        assert (first, second, third) == (200, 429, 429)


async def test_a_concurrent_burst_admits_exactly_the_limit(limited, upstream):
    proxy = limited(GLOBAL_RATE_LIMIT="30/minute")
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=proxy.url, limits=limits, timeout=30) as client:
        responses = await asyncio.gather(*(client.post(CHAT, json=BODY) for _ in range(100)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 30
    assert statuses.count(429) == 70
    assert upstream_count(upstream) == 30


@pytest.mark.redis
async def test_a_client_hammering_after_its_refusal_costs_the_storage_nothing(
    proxy_factory, upstream, redis_server
):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        GLOBAL_RATE_LIMIT="2/minute",
        REQ_RATE_LIMIT_BACKEND=redis_server.url,
        REDIS_KEY_PREFIX=redis_server.prefix,
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        responses = [await client.post(CHAT, json=BODY) for _ in range(30)]
    assert [r.status_code for r in responses] == [200, 200] + [429] * 28
    resets = {r.headers["x-ratelimit-reset"] for r in responses[2:]}
    assert len(resets) == 1  # the same window throughout
    assert {r.json()["error"]["message"] for r in responses[2:]} == {
        "Rate limit exceeded: 2 per 1 minute"
    }
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url)
    try:
        keys = [k async for k in client.scan_iter(match=redis_server.prefix + "*")]
        counts = [int(await client.get(k)) for k in keys]
    finally:
        await client.aclose()
    # two admitted and the first refusal were counted; the 27 repeats never reached Redis
    assert counts == [3]
    assert upstream_count(upstream) == 2
