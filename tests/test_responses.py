"""The Responses API through the real proxy, the OpenAI SDK as the client: the cache, the chat
log and ``aifd convert``."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest

from tests import fake_openai
from tests.conftest import RecordingUpstream
from tests.test_chatlog import pairs, read_records
from tests.test_convert import run_convert

RESPONSES = "/v1/responses"
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
CACHED = {"caching": True}
CALL = {k: fake_openai.RESPONSE_CALL[k] for k in ("type", "call_id", "name", "arguments")}


@pytest.fixture
def start(proxy_factory, upstream, tmp_path):
    """A proxy that caches (MEMORY) and logs (``tmp_path/Log``) Responses calls."""
    fake_openai.install(upstream)

    def start(**env):
        settings = {
            "OPENAI_BASE_URL": upstream.url,
            "OPENAI_API_KEY": "sk-real-secret",
            "CACHE_CHAT_COMPLETION": "true",
            "LOG_CHAT": "true",
            "LOG_FOLDER": str(tmp_path / "Log"),
            "TZ": "UTC",
        }
        return proxy_factory(**{**settings, **env})

    return start


def sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-client", max_retries=0)


def calls(upstream: RecordingUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path_qs.startswith(RESPONSES))


def said(response) -> object:
    """A response's text, or its function calls."""
    found = [item.model_dump(include=set(CALL)) for item in response.output]
    return found if response.output[0].type == "function_call" else response.output_text


async def create(ai, text: str, tools=None, **extra):
    """(X-Cache, response id, text or calls) of a non-stream call."""
    more = {"tools": tools} if tools else {}
    raw = await ai.responses.with_raw_response.create(
        model="gpt-test", input=text, extra_body=CACHED, **more, **extra
    )
    response = raw.parse()
    return raw.headers.get("x-cache"), response.id, said(response)


async def create_stream(ai, text: str, tools=None):
    """(X-Cache, event types, the completed event's response) of a stream call."""
    more = {"tools": tools} if tools else {}
    raw = await ai.responses.with_raw_response.create(
        model="gpt-test", input=text, stream=True, extra_body=CACHED, **more
    )
    events = [event async for event in raw.parse()]
    assert events[-1].type == "response.completed"
    return raw.headers.get("x-cache"), [e.type for e in events], events[-1].response


async def helper(ai, text: str, tools=None):
    """(response id, text or calls) assembled by the SDK's stream helper."""
    more = {"tools": tools} if tools else {}
    async with ai.responses.stream(
        model="gpt-test", input=text, extra_body=CACHED, **more
    ) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        response = await stream.get_final_response()
    assert "".join(deltas) == response.output_text
    return response.id, said(response)


async def test_non_stream_miss_then_hit_upstream_once(start, upstream):
    proxy = start()
    async with sdk(proxy) as ai:
        first = await create(ai, "hello cache")
        second = await create(ai, "hello cache")
    assert first[0] == "MISS" and second[0] == "HIT"
    assert first[1:] == second[1:] and first[2] == "echo: hello cache"  # the same response id
    assert calls(upstream) == 1
    assert b"caching" not in upstream.requests[0].body
    assert upstream.requests[0].headers["Authorization"] == "Bearer sk-real-secret"


async def test_stream_miss_then_hit_upstream_once(start, upstream):
    proxy = start()
    async with sdk(proxy) as ai:
        cache, kinds, filled = await create_stream(ai, "hello stream")
        again, replayed_kinds, replayed = await create_stream(ai, "hello stream")
    assert (cache, again) == ("MISS", "HIT")
    assert replayed.model_dump() == filled.model_dump()
    assert replayed.output_text == "echo: hello stream"
    # The replay has the events of the API, the text in one delta instead of one per word.
    assert replayed_kinds == [k for i, k in enumerate(kinds) if k != kinds[i - 1]]
    assert calls(upstream) == 1


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["text", "function-call"])
async def test_stream_after_non_stream_and_the_reverse(start, upstream, tools):
    proxy = start()
    async with sdk(proxy) as ai:
        json_fill = await create(ai, "json first", tools)
        helper_replay = await helper(ai, "json first", tools)
        stream_replay = await create_stream(ai, "json first", tools)
        sse_fill = await create_stream(ai, "stream first", tools)
        json_replay = await create(ai, "stream first", tools)
        helper_of_stream = await helper(ai, "stream first", tools)
    assert json_fill[2] == ([CALL] if tools else "echo: json first")
    assert json_replay[2] == ([CALL] if tools else "echo: stream first")
    assert json_fill[0] == "MISS" and helper_replay == json_fill[1:]
    assert stream_replay[0] == "HIT" and stream_replay[2].id == json_fill[1]
    assert sse_fill[0] == "MISS" and json_replay[0] == "HIT"
    assert json_replay[1] == sse_fill[2].id == helper_of_stream[0]
    assert json_replay[2] == helper_of_stream[1] == said(sse_fill[2])
    assert calls(upstream) == 2


async def test_previous_response_id_is_never_answered_from_the_cache(start, upstream):
    proxy = start()
    async with sdk(proxy) as ai:
        first = await create(ai, "turn one")
        follow = [await create(ai, "turn two", previous_response_id=first[1]) for _ in range(2)]
    assert [f[0] for f in follow] == ["MISS", "MISS"]
    assert follow[0][1] != follow[1][1]  # two responses the upstream made
    assert calls(upstream) == 3
    assert orjson.loads(upstream.requests[2].body)["previous_response_id"] == first[1]


@pytest.mark.parametrize(
    "fields, cached",
    [
        ({"conversation": "conv_1"}, False),
        ({"background": True}, False),
        ({"prompt": {"id": "pmpt_1", "variables": {"x": "y"}}}, False),
        ({"prompt": {"id": "pmpt_1", "version": "3"}}, True),
        ({"store": False}, True),
        ({"store": True}, True),
    ],
)
async def test_state_upstream_and_side_effects_keep_a_request_out(start, upstream, fields, cached):
    proxy = start()
    body = {"model": "gpt-test", "input": "hi", "caching": True, **fields}
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        found = [(await client.post(RESPONSES, json=body)).headers["x-cache"] for _ in range(2)]
    assert found == (["MISS", "HIT"] if cached else ["MISS", "MISS"])
    assert calls(upstream) == (1 if cached else 2)


async def test_store_is_part_of_the_key(start, upstream):
    """A stored response's id can be fetched and continued upstream: a request that stores is
    answered only from an entry a stored response filled, and one with ``store: false`` only
    from an entry of its own kind."""
    proxy = start()
    async with sdk(proxy) as ai:
        stored = await create(ai, "remember me")
        unstored = [await create(ai, "remember me", store=False) for _ in range(2)]
        stored_again = await create(ai, "remember me")
    assert [stored[0], stored_again[0]] == ["MISS", "HIT"] and stored_again[1] == stored[1]
    assert [u[0] for u in unstored] == ["MISS", "HIT"] and unstored[0][1] != stored[1]
    assert calls(upstream) == 2


@pytest.mark.parametrize(
    "end, cut",
    [("incomplete", False), ("failed", False), ("error", False), ("none", False), ("none", True)],
    ids=["incomplete", "failed", "error-event", "no-last-event", "cut"],
)
async def test_only_completed_answers_are_stored(start, upstream, end: str, cut: bool):
    """Streams that did not end with response.completed, and JSON answers that are not
    completed responses (``incomplete``, ``failed``), are relayed and not stored."""
    upstream.route(RESPONSES, fake_openai.responses_ending(end, cut))
    proxy = start()
    stream = {"model": "gpt-test", "input": "streamed", "caching": True, "stream": True}
    whole = {"model": "gpt-test", "input": "whole", "caching": True}
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for _ in range(2):
            try:
                r = await client.post(RESPONSES, json=stream)
                assert r.headers["x-cache"] == "MISS"
            except httpx.RemoteProtocolError:
                assert cut
        found = [(await client.post(RESPONSES, json=whole)).headers["x-cache"] for _ in range(2)]
    assert found == (["MISS", "MISS"] if end in ("incomplete", "failed") else ["MISS", "HIT"])
    assert calls(upstream) == 2 + found.count("MISS")


async def test_the_key_covers_the_fields_that_change_the_answer(start, upstream):
    proxy = start()
    base = {"model": "gpt-test", "input": "hi", "caching": True}
    variants = [
        {},
        {"instructions": "be brief"},
        {"temperature": 0.5},
        {"tools": TOOLS},
        {"text": {"format": {"type": "json_object"}}},
        {"reasoning": {"effort": "low"}},
        {"top_p": 0.5},
        {"max_output_tokens": 50},
        {"tool_choice": "none"},
        {"model": "gpt-other"},
        {"input": [{"role": "user", "content": "hi"}]},
    ]
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for variant in variants:
            r = await client.post(RESPONSES, json={**base, **variant})
            assert r.headers["x-cache"] == "MISS", variant
        spelled = b'{"caching":true , "input":"hi",\n "model":"gpt-test", "stream_options": {}}'
        r = await client.post(
            RESPONSES, content=spelled, headers={"content-type": "application/json"}
        )
    assert r.headers["x-cache"] == "HIT"
    assert calls(upstream) == len(variants)


async def test_records_and_convert_of_responses_calls(start, upstream, tmp_path):
    proxy = start(FORWARD_KEY="fk-team")
    instructions = "be brief"
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="fk-team", max_retries=0
    ) as ai:
        text = await ai.responses.create(
            model="gpt-test", input="hello log", instructions=instructions, temperature=0.2
        )
        async with ai.responses.stream(
            model="gpt-test",
            input=[{"role": "user", "content": "weather?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            extra_body=CACHED,
        ) as stream:
            await stream.get_final_response()
        hit = await ai.responses.create(
            model="gpt-test",
            input=[{"role": "user", "content": "weather?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            extra_body=CACHED,
        )
    upstream.route(RESPONSES, fake_openai.responses_ending("incomplete"))
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        body = {"model": "gpt-test", "input": "long", "stream": True, "max_output_tokens": 5}
        await client.post(RESPONSES, json=body, headers={"Authorization": "Bearer fk-team"})
    log = tmp_path / "Log" / "openai" / "responses" / "responses.log"
    records = read_records(log, 8)
    (q1, a1), (q2, a2), (q3, a3), (q4, a4) = pairs(records)

    assert list(q1) == [
        "input",
        "instructions",
        "model",
        "stream",
        "temperature",
        "tools",
        "ip",
        "uid",
        "key_hash",
        "datetime",
    ]
    assert (q1["input"], q1["instructions"], q1["temperature"]) == ("hello log", instructions, 0.2)
    assert q1["stream"] is False and q1["tools"] is None
    assert a1 == {
        "assistant": "echo: hello log",
        "is_tool_calls": False,
        "response_id": text.id,
        "response_status": "completed",
        "uid": q1["uid"],
        "usage": fake_openai.RESPONSE_USAGE,
        "status": 200,
        "cached": False,
        "complete": True,
    }
    assert q2["stream"] is True and q2["tools"] == TOOLS
    assert q2["input"] == [{"role": "user", "content": "weather?"}]
    assert a2["assistant"] == [CALL] and a2["is_tool_calls"] is True
    assert a2["complete"] is True and a2["cached"] is False
    assert a3 == {**a2, "uid": q3["uid"], "cached": True} and a3["response_id"] == hit.id
    assert q4["max_output_tokens"] == 5
    assert a4["response_status"] == "incomplete" and a4["complete"] is False
    assert a4["incomplete_reason"] == "max_output_tokens"
    proxy.stop()

    result = await asyncio.to_thread(run_convert, tmp_path)
    assert result.returncode == 0, result.stderr
    line = "Log/responses_openai.json: 3 conversation(s) (1 without a complete answer left out)"
    assert line in result.stderr
    entries = orjson.loads((tmp_path / "Log" / "responses_openai.json").read_bytes())
    assert entries[0] == {
        "datetime": q1["datetime"],
        "ip": "127.0.0.1",
        "model": "gpt-test",
        "temperature": 0.2,
        "messages": [{"system": instructions}, {"user": "hello log"}],
        "tools": None,
        "is_tool_calls": False,
        "assistant": "echo: hello log",
    }
    for entry in entries[1:]:
        assert entry["messages"] == [{"user": "weather?"}] and entry["tools"] == TOOLS
        assert entry["is_tool_calls"] is True and entry["assistant"] == [CALL]
    assert not (tmp_path / "Log" / "chat_openai.json").exists()
