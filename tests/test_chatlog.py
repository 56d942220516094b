"""Chat logs through the real server: the OpenAI SDK as client, the recording upstream, real files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from openai_forward.chatlog import records as records_module
from tests import fake_openai

REAL_KEY = "sk-real-0123456789abcdefSECRET"
FORWARD_KEY = "fk-team-9876543210FORWARD"
HELLO = [{"role": "user", "content": "hello there"}]


def read_records(path: Path, count: int, timeout: float = 5.0) -> list[dict]:
    """The records of ``path`` once it holds ``count`` lines (the writer is a thread: a call's
    records are queued when it ends and reach the file a moment later)."""
    deadline = time.monotonic() + timeout
    lines: list[bytes] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_bytes().splitlines()
            if len(lines) >= count:
                break
        time.sleep(0.02)
    assert len(lines) == count, f"{path}: {len(lines)} lines, expected {count}"
    return [orjson.loads(line) for line in lines]


def pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    """(request, response) by uid, in request order."""
    answers = {r["uid"]: r for r in records if "ip" not in r}
    return [(r, answers[r["uid"]]) for r in records if "ip" in r]


@pytest.fixture
def log_root(tmp_path: Path) -> Path:
    return tmp_path / "Log"


@pytest.fixture
def logging_proxy(proxy_factory, upstream, log_root):
    fake_openai.install(upstream)
    return proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        OPENAI_API_KEY=REAL_KEY,
        FORWARD_KEY=FORWARD_KEY,
        LOG_CHAT="true",
        LOG_FOLDER=str(log_root),
        TZ="UTC",
    )


def sdk(proxy, prefix: str = "") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{proxy.url}{prefix}/v1", api_key=FORWARD_KEY, max_retries=0
    )


async def test_chat_non_stream_and_stream(logging_proxy, log_root):
    before = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    async with sdk(logging_proxy) as ai:
        answer = await ai.chat.completions.create(
            model="gpt-test", messages=HELLO, temperature=0.3, seed=7
        )
        stream = await ai.chat.completions.create(
            model="gpt-test", messages=HELLO, stream=True, top_p=0.5
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert answer.choices[0].message.content == streamed == "echo: hello there"

    records = read_records(log_root / "openai" / "chat" / "chat.log", 4)
    (req1, res1), (req2, res2) = pairs(records)
    assert list(req1) == [
        "messages",
        "model",
        "stream",
        "temperature",
        "seed",
        "tools",
        "ip",
        "uid",
        "key_hash",
        "datetime",
    ]
    assert req1["messages"] == HELLO and req1["model"] == "gpt-test"
    assert req1["stream"] is False and req1["temperature"] == 0.3 and req1["seed"] == 7
    assert req1["tools"] is None and req1["ip"] == "127.0.0.1"
    assert len(req1["key_hash"]) == 24  # the forward key's hash, never the key
    logged_at = datetime.strptime(req1["datetime"], "%Y-%m-%d %H:%M:%S")
    assert 0 <= (logged_at - before).total_seconds() < 10  # TZ=UTC
    assert req2["stream"] is True and req2["top_p"] == 0.5 and "temperature" not in req2
    assert req1["uid"] != req2["uid"]

    assert res1 == {
        "assistant": "echo: hello there",
        "is_tool_calls": False,
        "finish_reason": "stop",
        "uid": req1["uid"],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        "status": 200,
        "cached": False,
        "complete": True,
    }
    assert res2 == {
        "assistant": "echo: hello there",
        "is_tool_calls": False,
        "finish_reason": "stop",
        "uid": req2["uid"],
        "status": 200,
        "cached": False,
        "complete": True,
    }


async def test_two_choices_stream_and_non_stream(logging_proxy, log_root):
    async with sdk(logging_proxy) as ai:
        await ai.chat.completions.create(model="m", messages=HELLO, n=2)
        stream = await ai.chat.completions.create(model="m", messages=HELLO, n=2, stream=True)
        async for _ in stream:
            pass
    for request, response in pairs(read_records(log_root / "openai" / "chat" / "chat.log", 4)):
        assert request["n"] == 2
        assert response["assistant"] == "echo: hello there"
        assert [c["assistant"] for c in response["choices"]] == ["echo: hello there"] * 2
        assert [c["finish_reason"] for c in response["choices"]] == ["stop", "stop"]
        assert response["complete"] is True


async def test_tool_call_stream_joins_arguments(logging_proxy, log_root):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    async with sdk(logging_proxy) as ai:
        await ai.chat.completions.create(model="m", messages=HELLO, tools=tools)
        stream = await ai.chat.completions.create(
            model="m", messages=HELLO, tools=tools, stream=True
        )
        async for _ in stream:
            pass
    expected = [fake_openai.TOOL_CALL]
    for request, response in pairs(read_records(log_root / "openai" / "chat" / "chat.log", 4)):
        assert request["tools"] == tools
        assert response["is_tool_calls"] is True
        assert response["assistant"] == expected
        assert response["finish_reason"] == "tool_calls"
        assert response["complete"] is True


async def test_completion_and_embedding_have_their_own_files(logging_proxy, log_root):
    async with sdk(logging_proxy) as ai:
        await ai.completions.create(model="davinci", prompt="say hi", max_tokens=5)
        await ai.embeddings.create(model="emb", input=["abc", "de"])
    ((request, response),) = pairs(
        read_records(log_root / "openai" / "completion" / "completion.log", 2)
    )
    assert request["prompt"] == "say hi" and request["max_tokens"] == 5
    assert request["model"] == "davinci" and request["stream"] is False
    assert response["assistant"] == "echo: say hi" and response["complete"] is True
    ((request, response),) = pairs(
        read_records(log_root / "openai" / "embedding" / "embedding.log", 2)
    )
    assert request["input"] == ["abc", "de"] and request["model"] == "emb"
    assert response["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    assert response["status"] == 200 and response["complete"] is True
    assert not (log_root / "openai" / "chat").exists()


async def test_cache_hit_is_marked_cached(proxy_factory, upstream, log_root):
    fake_openai.install(upstream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        LOG_CHAT="true",
        LOG_FOLDER=str(log_root),
        CACHE_CHAT_COMPLETION="true",
    )
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x") as ai:
        for _ in range(2):
            await ai.chat.completions.create(
                model="m", messages=HELLO, extra_body={"caching": True}
            )
    (_, first), (_, second) = pairs(read_records(log_root / "openai" / "chat" / "chat.log", 4))
    assert len(upstream.requests) == 1
    assert first["cached"] is False and second["cached"] is True
    assert second["assistant"] == first["assistant"] == "echo: hello there"


async def test_each_prefix_logs_to_its_own_folder(proxy_factory, upstream, log_root):
    fake_openai.install(upstream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=f"{upstream.url},{upstream.url}",
        OPENAI_ROUTE_PREFIX="/,/team/b",
        LOG_CHAT="true",
        LOG_FOLDER=str(log_root),
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for prefix, word in (("", "one"), ("/team/b", "two"), ("/team/b", "three")):
            body = {"model": "m", "messages": [{"role": "user", "content": word}]}
            r = await client.post(f"{prefix}/v1/chat/completions", json=body)
            assert r.status_code == 200
    root = read_records(log_root / "openai" / "chat" / "chat.log", 2)
    team = read_records(log_root / "team_b" / "chat" / "chat.log", 4)
    assert [r["assistant"] for _, r in pairs(root)] == ["echo: one"]
    assert [r["assistant"] for _, r in pairs(team)] == ["echo: two", "echo: three"]


async def test_no_key_anywhere_in_the_working_folder(proxy_factory, upstream, tmp_path):
    fake_openai.install(upstream)

    async def refuses(request: web.Request) -> web.Response:
        # An upstream that quotes the key it got in its error message.
        auth = request.headers.get("Authorization", "")
        return web.json_response({"error": {"message": f"bad key {auth}"}}, status=400)

    upstream.route("/v1/completions", refuses)
    log_root = tmp_path / "Log"
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        OPENAI_API_KEY=REAL_KEY,
        FORWARD_KEY=FORWARD_KEY,
        LOG_CHAT="true",
        LOG_FOLDER=str(log_root),
    )
    leak = [{"role": "user", "content": f"my keys are {FORWARD_KEY} and {REAL_KEY}"}]
    async with sdk(proxy) as ai:
        await ai.chat.completions.create(model="m", messages=leak)
        stream = await ai.chat.completions.create(model="m", messages=leak, stream=True)
        async for _ in stream:
            pass
        await ai.embeddings.create(model="e", input=FORWARD_KEY)
        with pytest.raises(openai.BadRequestError):
            await ai.completions.create(model="m", prompt="x")
    read_records(log_root / "openai" / "chat" / "chat.log", 4)
    read_records(log_root / "openai" / "embedding" / "embedding.log", 2)
    records = read_records(log_root / "openai" / "completion" / "completion.log", 2)
    assert "bad key Bearer ***" in pairs(records)[0][1]["error"]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        content = path.read_bytes()
        assert REAL_KEY.encode() not in content, path
        assert FORWARD_KEY.encode() not in content, path


def truncating(events: list[bytes]):
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await asyncio.sleep(0.05)
        request.transport.close()  # type: ignore[union-attr]
        return response

    return handler


async def test_truncated_upstream_stream_gives_partial_incomplete_record(
    proxy_factory, upstream, log_root
):
    events = [
        fake_openai._chunk("c", "m", {"role": "assistant", "content": "Half"}),
        fake_openai._chunk("c", "m", {"content": " an answer"}),
        b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "lo',  # cut mid-event
    ]
    upstream.route("/v1/chat/completions", truncating(events))
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=str(log_root))
    received = b""
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            body = {"model": "m", "messages": HELLO, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for chunk in r.aiter_raw():
                    received += chunk
    assert received == b"".join(events)  # the relay is untouched by the log
    ((request, response),) = pairs(read_records(log_root / "openai" / "chat" / "chat.log", 2))
    assert request["stream"] is True
    assert response["assistant"] == "Half an answer"
    assert response["finish_reason"] is None
    assert response["complete"] is False and response["status"] == 200


async def test_malformed_stream_is_relayed_and_marked_incomplete(proxy_factory, upstream, log_root):
    events = [
        fake_openai._chunk("c", "m", {"content": "ok"}),
        b"data: {not json}\n\n",
        b": a comment\n\n",
        fake_openai._chunk("c", "m", {"content": "!"}, "stop"),
        b"data: [DONE]\n\n",
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    upstream.route("/v1/chat/completions", handler)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=str(log_root))
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        body = {"model": "m", "messages": HELLO, "stream": True}
        r = await client.post("/v1/chat/completions", json=body)
    assert r.content == b"".join(events)
    ((_, response),) = pairs(read_records(log_root / "openai" / "chat" / "chat.log", 2))
    assert response["assistant"] == "ok!" and response["finish_reason"] == "stop"
    assert response["complete"] is False


async def test_client_hanging_up_and_unreachable_upstream(proxy_factory, upstream, log_root):
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(200):
            await response.write(fake_openai._chunk("c", "m", {"content": f"{i} "}))
            await asyncio.sleep(0.05)
        return response

    upstream.route("/v1/chat/completions", endless)
    proxy = proxy_factory(
        OPENAI_BASE_URL=f"{upstream.url},http://127.0.0.1:9",
        OPENAI_ROUTE_PREFIX="/,/down",
        MAX_RETRIES=0,
        LOG_CHAT="true",
        LOG_FOLDER=str(log_root),
    )
    body = {"model": "m", "messages": HELLO, "stream": True}
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for chunk in r.aiter_raw():
                if b"1 " in chunk:
                    break
        r = await client.post("/down/v1/chat/completions", json=body)
        assert r.status_code == 502
    ((_, gone),) = pairs(read_records(log_root / "openai" / "chat" / "chat.log", 2))
    assert gone["assistant"].startswith("0 1 ") and gone["complete"] is False
    ((_, down),) = pairs(read_records(log_root / "down" / "chat" / "chat.log", 2))
    assert down["status"] is None and down["assistant"] == "" and down["complete"] is False
    assert gone["reason"] == "client left" and down["reason"] == "no answer"


async def test_a_request_is_logged_while_its_answer_runs_and_each_answer_follows_its_request(
    proxy_factory, upstream, log_root
):
    """A long call has its request written while it runs and its answer when it ends, after
    the pair of a shorter call made meanwhile."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return await fake_openai.chat(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(fake_openai._chunk("c", "m", {"role": "assistant", "content": "A"}))
        await release.wait()
        await response.write(fake_openai._chunk("c", "m", {"content": "B"}, finish="stop"))
        await response.write(b"data: [DONE]\n\n")
        return response

    upstream.route("/v1/chat/completions", handler)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=str(log_root))
    path = log_root / "openai" / "chat" / "chat.log"
    slow = {"model": "m", "messages": [{"role": "user", "content": "slow"}], "stream": True}
    fast = {"model": "m", "messages": [{"role": "user", "content": "fast"}]}
    async with (
        httpx.AsyncClient(base_url=proxy.url) as client,
        client.stream("POST", "/v1/chat/completions", json=slow) as streaming,
    ):
        chunks = streaming.aiter_raw()
        assert b"A" in await chunks.__anext__()
        (asked,) = await asyncio.to_thread(read_records, path, 1)
        assert asked["messages"][0]["content"] == "slow" and "ip" in asked
        assert (await client.post("/v1/chat/completions", json=fast)).status_code == 200
        await asyncio.to_thread(read_records, path, 3)
        release.set()
        async for _ in chunks:
            pass
    records = await asyncio.to_thread(read_records, path, 4)
    slow_uid, fast_uid = records[0]["uid"], records[1]["uid"]
    assert [(r["uid"], "ip" in r) for r in records] == [
        (slow_uid, True),
        (fast_uid, True),
        (fast_uid, False),
        (slow_uid, False),
    ]
    assert records[2]["assistant"] == "echo: fast"
    assert records[3]["assistant"] == "AB" and records[3]["complete"] is True


async def test_concurrent_calls_of_any_length_each_get_one_request_then_one_answer(
    proxy_factory, upstream, log_root
):
    # Calls ending before, during and after the writer's batches (it gathers for 20 ms)
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        await asyncio.sleep(int(body["messages"][0]["content"]) % 7 * 0.01)
        return await fake_openai.chat(request)

    upstream.route("/v1/chat/completions", handler)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=str(log_root))
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:

        async def call(i: int) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": str(i)}]}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200

        for start in range(0, 120, 40):
            await asyncio.gather(*[call(i) for i in range(start, start + 40)])
    records = await asyncio.to_thread(read_records, log_root / "openai" / "chat" / "chat.log", 240)
    seen: dict[str, list[bool]] = {}
    for record in records:
        seen.setdefault(record["uid"], []).append("ip" in record)
    assert len(seen) == 120
    assert all(kinds == [True, False] for kinds in seen.values())  # request first, once each
    answers = sorted(r["assistant"] for _, r in pairs(records))
    assert answers == sorted(f"echo: {i}" for i in range(120))


async def test_records_are_written_by_shutdown(proxy_factory, upstream, log_root):
    fake_openai.install(upstream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=str(log_root))
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for i in range(20):
            body = {"model": "m", "messages": [{"role": "user", "content": str(i)}]}
            await client.post("/v1/chat/completions", json=body)
    proxy.stop()
    lines = (log_root / "openai" / "chat" / "chat.log").read_bytes().splitlines()
    assert len(lines) == 40
    assert [r["assistant"] for _, r in pairs([orjson.loads(x) for x in lines])] == [
        f"echo: {i}" for i in range(20)
    ]


def test_unwritable_log_folder_stops_start_up_with_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    (tmp_path / ".env").write_text("LOG_CHAT=true\nLOG_FOLDER=file/Log\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LOG_"))}
    result = subprocess.run(
        [sys.executable, "-m", "openai_forward", "run", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "aifd: LOG_FOLDER='file/Log': expected a folder this user can create (Not a directory)"
    )


async def test_a_stream_beside_the_cache_is_logged_as_without_it(
    proxy_factory, upstream, tmp_path, monkeypatch
):
    """With the cache on, the chat log reads a stream from the entry the cache assembled of it
    rather than assembling it again: the records are those of a log without the cache, for
    text in two choices, a tool call and a Responses stream."""
    fake_openai.install(upstream)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    records = []
    streams_read = []  # how many answers the chat log read from their own bytes
    read_answer = records_module._read_answer

    def counted(*args):
        streams_read.append(args[0].name)
        return read_answer(*args)

    monkeypatch.setattr(records_module, "_read_answer", counted)
    for cache in ("false", "true"):
        root = tmp_path / f"cache-{cache}"
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url,
            LOG_CHAT="true",
            LOG_FOLDER=str(root),
            CACHE_CHAT_COMPLETION=cache,
        )
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x") as ai:
            for options in ({"n": 2}, {"tools": tools}):
                stream = await ai.chat.completions.create(
                    model="m", messages=HELLO, stream=True, **options
                )
                async for _ in stream:
                    pass
            async with ai.responses.stream(model="m", input="hello there") as events:
                await events.get_final_response()
        chat = pairs(read_records(root / "openai" / "chat" / "chat.log", 4))
        responses = pairs(read_records(root / "openai" / "responses" / "responses.log", 2))
        answers = [answer for _, answer in chat + responses]
        for answer in answers:
            assert answer.pop("uid") and answer["complete"] is True
        assert answers[2].pop("response_id").startswith("resp_")  # the fake's counter
        records.append(answers)
    without_cache, with_cache = records
    assert with_cache == without_cache
    assert streams_read == ["chat", "chat", "responses"]  # without the cache only
    assert [len(a["choices"]) for a in with_cache[:1]] == [2]
    assert with_cache[1]["is_tool_calls"] is True
    assert with_cache[2]["assistant"] == "echo: hello there"
