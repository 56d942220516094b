"""The response cache through the real server, the OpenAI SDK as the client, on every backend."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests import cache_backends, fake_openai
from tests.conftest import RecordingUpstream

cache_env = cache_backends.cache_env  # the fixture: every test here runs once per backend

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello cache"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CACHED = {"caching": True}


@pytest.fixture
def cached(cache_env, proxy_factory, upstream):
    """Start a proxy with the chat and embedding caches on the chosen backend.

    ``cache_env`` comes first so that its Redis prefix is cleaned up after the proxy stopped
    (and flushed its last writes)."""
    fake_openai.install(upstream)

    def start(**env):
        settings = {
            "OPENAI_BASE_URL": upstream.url,
            "CACHE_CHAT_COMPLETION": "true",
            "CACHE_EMBEDDING": "true",
            **cache_env,
        }
        return proxy_factory(**{**settings, **env})

    return start


def sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0)


def calls(upstream: RecordingUpstream, path: str = CHAT) -> int:
    return sum(1 for r in upstream.requests if r.path_qs.startswith(path))


async def chat(ai, stream=False, messages=HELLO, **extra):
    """(x-cache header, text or tool calls) of one SDK call."""
    raw = await ai.chat.completions.with_raw_response.create(
        model="gpt-test", messages=messages, stream=stream, extra_body=CACHED, **extra
    )
    if not stream:
        message = raw.parse().choices[0].message
        return raw.headers.get("x-cache"), message.tool_calls or message.content
    parts = [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
    return raw.headers.get("x-cache"), "".join(parts)


async def slow_chat(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(0.3)
    return await fake_openai.chat(request)


async def test_miss_then_hit_upstream_once(cached, upstream):
    proxy = cached()
    async with sdk(proxy) as ai:
        first = await chat(ai)
        second = await chat(ai)
    assert first == ("MISS", "echo: hello cache")
    assert second == ("HIT", "echo: hello cache")
    assert calls(upstream) == 1
    assert b"caching" not in upstream.requests[0].body  # our field never goes upstream
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        body = {"model": "gpt-test", "messages": HELLO, "caching": True}
        hit = await client.post(CHAT, json=body)
    assert hit.headers["x-cache"] == "HIT" and hit.headers["content-type"] == "application/json"
    assert hit.json()["choices"][0]["message"]["content"] == "echo: hello cache"
    assert hit.json()["usage"]["total_tokens"] == 12
    assert calls(upstream) == 1


async def test_stream_after_non_stream_and_non_stream_after_stream(cached, upstream):
    proxy = cached()
    other = [{"role": "user", "content": "streamed first"}]
    async with sdk(proxy) as ai:
        json_fill = await chat(ai)
        sse_replay = await chat(ai, stream=True)
        sse_fill = await chat(ai, stream=True, messages=other)
        json_replay = await chat(ai, messages=other)
        sse_replay_of_sse = await chat(ai, stream=True, messages=other)
    assert json_fill == ("MISS", "echo: hello cache")
    assert sse_replay == ("HIT", "echo: hello cache")
    assert sse_fill == ("MISS", "echo: streamed first")
    assert json_replay == ("HIT", "echo: streamed first")
    assert sse_replay_of_sse == ("HIT", "echo: streamed first")
    assert calls(upstream) == 2


async def test_stream_replay_is_well_formed_sse(cached, upstream):
    proxy = cached()
    body = {"model": "gpt-test", "messages": HELLO, "caching": True}
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        await client.post(CHAT, json=body)
        options = {"stream": True, "stream_options": {"include_usage": True}}
        replay = await client.post(CHAT, json={**body, **options})
    assert replay.headers["x-cache"] == "HIT"
    assert replay.headers["content-type"].startswith("text/event-stream")
    events = replay.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [orjson.loads(e[len(b"data: ") :]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 12 and chunks[-1]["choices"] == []
    assert calls(upstream) == 1


async def test_tool_calls_replay_both_ways(cached, upstream):
    proxy = cached()
    weather = [{"role": "user", "content": "weather?"}]
    async with sdk(proxy) as ai:
        streamed = await ai.chat.completions.create(
            model="gpt-test", messages=weather, tools=TOOLS, stream=True, extra_body=CACHED
        )
        async for _ in streamed:
            pass
        from_stream = await chat(ai, messages=weather, tools=TOOLS)
        filled = await chat(ai, messages=HELLO, tools=TOOLS)
        async with ai.chat.completions.stream(
            model="gpt-test", messages=HELLO, tools=TOOLS, extra_body=CACHED
        ) as replay:
            final = await replay.get_final_completion()
    expected = [fake_openai.TOOL_CALL]
    assert from_stream[0] == "HIT" and filled[0] == "MISS"
    assert [c.model_dump(exclude_none=True) for c in from_stream[1]] == expected
    assert [c.model_dump(exclude_none=True) for c in filled[1]] == expected
    tool_calls = final.choices[0].message.tool_calls or []
    # The stream helper keeps the delta's "index" on each reassembled call.
    assert [c.model_dump(exclude_none=True, exclude={"index"}) for c in tool_calls] == expected
    assert final.choices[0].finish_reason == "tool_calls"
    assert calls(upstream) == 2


async def test_caching_false_bypasses_but_refreshes_and_default_applies(cached, upstream):
    proxy = cached(DEFAULT_REQUEST_CACHING_VALUE="true")
    async with sdk(proxy) as ai:
        await chat(ai)
        bypass = await ai.chat.completions.with_raw_response.create(
            model="gpt-test", messages=HELLO, extra_body={"caching": False}
        )
        default = await ai.chat.completions.with_raw_response.create(
            model="gpt-test", messages=HELLO
        )
    assert bypass.headers["x-cache"] == "MISS"
    assert default.headers["x-cache"] == "HIT"
    assert calls(upstream) == 2
    assert all(b"caching" not in r.body for r in upstream.requests)


async def test_default_off_needs_the_field(cached, upstream):
    proxy = cached()
    async with sdk(proxy) as ai:
        for _ in range(2):
            await ai.chat.completions.create(model="gpt-test", messages=HELLO)
        hit = await chat(ai)  # the fresh answers were stored all the same
    assert hit[0] == "HIT"
    assert calls(upstream) == 2


async def test_every_answer_field_is_its_own_entry(cached, upstream):
    proxy = cached()
    variants = [{}, {"temperature": 0.5}, {"seed": 7}, {"max_tokens": 9}, {"n": 2}]
    variants += [{"tools": TOOLS}, {"model": "gpt-other"}]
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for variant in variants:
            body = {"model": "gpt-test", "messages": HELLO, "caching": True, **variant}
            r = await client.post(CHAT, json=body)
            assert r.headers["x-cache"] == "MISS", variant
        assert calls(upstream) == len(variants)
        # Same fields in another order, other whitespace, stream options: the same entry.
        reordered = b'{ "caching" : true,\n  "messages" : [ {"content":"hello cache","role":"user"} ],\n  "model":"gpt-test" }'
        r = await client.post(CHAT, content=reordered, headers={"content-type": "application/json"})
    assert r.headers["x-cache"] == "HIT"
    assert calls(upstream) == len(variants)


async def test_embeddings_are_cached(cached, upstream):
    proxy = cached()
    async with sdk(proxy) as ai:
        results = []
        for _ in range(2):
            raw = await ai.embeddings.with_raw_response.create(
                model="e", input=["abc", "de"], extra_body=CACHED
            )
            results.append((raw.headers["x-cache"], [d.embedding for d in raw.parse().data]))
    assert [r[0] for r in results] == ["MISS", "HIT"]
    assert results[0][1] == results[1][1] == [[0.3, 0.5, -0.25], [0.2, 0.5, -0.25]]
    assert calls(upstream, "/v1/embeddings") == 1


async def test_errors_and_broken_streams_are_not_stored(cached, upstream):
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no", "type": "x"}}, status=400)

    async def no_done(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(fake_openai._chunk("c", "m", {"content": "half"}))
        await response.write_eof()
        return response

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(fake_openai._chunk("c", "m", {"content": "half"}))
        await asyncio.sleep(0.05)
        request.transport.close()  # type: ignore[union-attr]
        return response

    proxy = cached()
    body = {"model": "gpt-test", "messages": HELLO, "caching": True, "stream": True}
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for handler in (refuse, no_done, cut):
            upstream.route(CHAT, handler)
            for _ in range(2):
                try:
                    r = await client.post(CHAT, json=body)
                    assert r.headers["x-cache"] == "MISS"
                except httpx.RemoteProtocolError:
                    assert handler is cut
        assert calls(upstream) == 6  # each asked twice: nothing was stored
        upstream.route(CHAT, fake_openai.chat)
        r = await client.post(CHAT, json=body)
    assert r.headers["x-cache"] == "MISS" and b"data: [DONE]" in r.content


async def test_entries_expire_after_ttl(cached, upstream):
    proxy = cached(CACHE_TTL="1")
    async with sdk(proxy) as ai:
        states = [(await chat(ai))[0], (await chat(ai))[0]]
        await asyncio.sleep(1.5)
        states += [(await chat(ai))[0], (await chat(ai))[0]]
    assert states == ["MISS", "HIT", "MISS", "HIT"]
    assert calls(upstream) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_concurrent_identical_misses_call_upstream_once(cached, upstream, stream):
    upstream.route(CHAT, slow_chat)
    proxy = cached()
    async with sdk(proxy) as ai:
        results = await asyncio.gather(*(chat(ai, stream=stream) for _ in range(20)))
    assert calls(upstream) == 1
    assert sorted(r[0] for r in results) == ["HIT"] * 19 + ["MISS"]
    assert {r[1] for r in results} == {"echo: hello cache"}


async def test_entries_survive_a_restart(cached, upstream, cache_env):
    if cache_env["CACHE_BACKEND"] == "MEMORY":
        pytest.skip("MEMORY lives and dies with its process")
    first = cached()
    async with sdk(first) as ai:
        assert (await chat(ai))[0] == "MISS"
    first.stop()
    second = cached()
    async with sdk(second) as ai:
        assert await chat(ai) == ("HIT", "echo: hello cache")
    assert calls(upstream) == 1


async def test_hit_does_not_sleep(cached, upstream):
    proxy = cached()
    async with sdk(proxy) as ai:
        await chat(ai)
        started = time.monotonic()
        hits = [await chat(ai, stream=stream) for stream in (False, True, False, True)]
        elapsed = time.monotonic() - started
    assert {h[0] for h in hits} == {"HIT"}
    assert calls(upstream) == 1
    assert elapsed < 1.0  # the original slept 1-2 s on every hit; four hits here do not


async def test_a_stream_the_cache_cannot_read_releases_the_callers_waiting_on_it(
    cached, upstream, tmp_path
):
    """A 2xx stream ending in [DONE] whose chunks make no sense as a chat answer (choices with
    an index of two types) is relayed whole and not stored, and the identical calls that waited
    for it go upstream themselves instead of waiting forever; the chat log still records it."""

    async def odd(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in ("a", 0):
            part = {"index": index, "delta": {"content": "x"}}
            await response.write(b"data: " + orjson.dumps({"choices": [part]}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    upstream.route(CHAT, odd)
    proxy = cached(LOG_CHAT="true", LOG_FOLDER=str(tmp_path))
    body = {"model": "gpt-test", "messages": HELLO, "caching": True, "stream": True}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
        answers = await asyncio.gather(*(client.post(CHAT, json=body) for _ in range(3)))
    assert [r.headers["x-cache"] for r in answers] == ["MISS"] * 3
    assert all(r.content.endswith(b"data: [DONE]\n\n") for r in answers)
    assert calls(upstream) == 3
    log = tmp_path / "openai" / "chat" / "chat.log"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        not log.exists() or len(log.read_bytes().splitlines()) < 6
    ):
        await asyncio.sleep(0.02)
    assert len(log.read_bytes().splitlines()) == 6
