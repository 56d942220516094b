"""The cache when things go wrong (a backend that dies, a first call that fails), when it is off
or only partly on, and who may read it."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from aiohttp import web

from tests import fake_openai

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "caching": True}


@pytest.mark.redis
async def test_redis_gone_degrades_to_miss_then_recovers(
    proxy_factory, upstream, redis_process, caplog
):
    fake_openai.install(upstream)
    redis = redis_process()
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        CACHE_CHAT_COMPLETION="true",
        CACHE_BACKEND="REDIS",
        CACHE_ROOT_PATH_OR_URL=redis.url,
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        states = [(await client.post(CHAT, json=BODY)).headers["x-cache"] for _ in range(2)]
        await asyncio.sleep(0.1)  # let the first answer's write finish
        redis.kill()
        with caplog.at_level(logging.WARNING, logger="openai_forward.cache"):
            down = [await client.post(CHAT, json=BODY) for _ in range(3)]
        assert [r.status_code for r in down] == [200, 200, 200]
        assert [r.headers["x-cache"] for r in down] == ["MISS"] * 3
        assert all(r.json()["choices"][0]["message"]["content"] == "echo: hi" for r in down)
        warnings = [r for r in caplog.records if "Cache read on REDIS failed" in r.message]
        assert len(warnings) == 1  # logged once, not once per request
        redis.start()  # same port, empty
        await asyncio.sleep(3.2)  # the cache stays aside for 3 s after a failure
        back = [(await client.post(CHAT, json=BODY)).headers["x-cache"] for _ in range(2)]
    assert states == ["MISS", "HIT"]
    assert back == ["MISS", "HIT"]
    assert sum(1 for r in upstream.requests if r.path_qs == CHAT) == 1 + 3 + 1


async def test_followers_of_a_failed_first_call_go_upstream(proxy_factory, upstream):
    async def slow_failure(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({"error": {"message": "busy", "type": "server"}}, status=500)

    upstream.route(CHAT, slow_failure)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, CACHE_CHAT_COMPLETION="true", MAX_RETRIES="0"
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        answers = await asyncio.gather(*(client.post(CHAT, json=BODY) for _ in range(5)))
        assert [r.status_code for r in answers] == [500] * 5
        assert all(r.headers["x-cache"] == "MISS" for r in answers)
        assert len(upstream.requests) == 5  # the first and, after it failed, the four others
        upstream.route(CHAT, fake_openai.chat)
        again = [(await client.post(CHAT, json=BODY)).headers["x-cache"] for _ in range(2)]
    assert again == ["MISS", "HIT"]


async def test_cache_off_leaves_requests_alone(proxy_factory, upstream):
    fake_openai.install(upstream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.post(CHAT, json=BODY)
    assert r.status_code == 200 and "x-cache" not in r.headers
    assert b'"caching":true' in upstream.requests[0].body  # no cache, no body rewriting


async def test_uncached_routes_lose_the_field_but_get_no_header(proxy_factory, upstream):
    fake_openai.install(upstream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CACHE_EMBEDDING="true")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        chat = [await client.post(CHAT, json=BODY) for _ in range(2)]
        embedding = {"model": "e", "input": "x", "caching": True}
        embed = await client.post("/v1/embeddings", json=embedding)
    assert all(r.status_code == 200 and "x-cache" not in r.headers for r in chat)
    assert embed.headers["x-cache"] == "MISS"
    assert all(b"caching" not in r.body for r in upstream.requests)
    assert sum(1 for r in upstream.requests if r.path_qs == CHAT) == 2


async def test_a_store_that_cannot_open_leaves_the_process_serving(
    proxy_factory, upstream, tmp_path, caplog
):
    import plyvel

    fake_openai.install(upstream)
    (tmp_path / "cache").mkdir()
    held = plyvel.DB(str(tmp_path / "cache" / "leveldb"), create_if_missing=True)
    try:
        with caplog.at_level(logging.ERROR, logger="openai_forward.cache"):
            proxy = proxy_factory(
                OPENAI_BASE_URL=upstream.url,
                CACHE_CHAT_COMPLETION="true",
                CACHE_BACKEND="LEVELDB",
                CACHE_ROOT_PATH_OR_URL=str(tmp_path),
            )
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            answers = [await client.post(CHAT, json=BODY) for _ in range(2)]
    finally:
        held.close()
    assert [r.status_code for r in answers] == [200, 200]
    # Single flight still works without a store, but nothing is kept between calls.
    assert [r.headers["x-cache"] for r in answers] == ["MISS", "MISS"]
    assert any("runs without it" in r.message for r in caplog.records)


async def test_with_forward_keys_only_their_holders_read_the_cache(proxy_factory, upstream):
    fake_openai.install(upstream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        OPENAI_API_KEY="sk-real-secret",
        FORWARD_KEY="fk-team",
        CACHE_CHAT_COMPLETION="true",
    )

    async def ask(client: httpx.AsyncClient, key: str | None) -> str:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        r = await client.post(CHAT, json=BODY, headers=headers)
        assert r.status_code == 200
        return r.headers["x-cache"]

    async with httpx.AsyncClient(base_url=proxy.url) as client:
        states = [await ask(client, key) for key in ("fk-team", "fk-team", "sk-own", None)]
    # A stranger's own key (or none) goes to the upstream, which alone can judge it.
    assert states == ["MISS", "HIT", "MISS", "MISS"]
    assert [r.headers.get("Authorization") for r in upstream.requests] == [
        "Bearer sk-real-secret",
        "Bearer sk-own",
        None,
    ]


async def test_compressed_answers_are_relayed_but_not_stored(proxy_factory, upstream):
    import gzip

    async def gzipped(request: web.Request) -> web.Response:
        answer = await fake_openai.chat(request)
        assert isinstance(answer, web.Response) and answer.body is not None
        return web.Response(
            body=gzip.compress(bytes(answer.body)),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    upstream.route(CHAT, gzipped)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CACHE_CHAT_COMPLETION="true")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        answers = [await client.post(CHAT, json=BODY) for _ in range(2)]
    assert [r.json()["choices"][0]["message"]["content"] for r in answers] == ["echo: hi"] * 2
    assert [r.headers["x-cache"] for r in answers] == ["MISS", "MISS"]
    assert len(upstream.requests) == 2
