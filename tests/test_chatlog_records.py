"""Records built from raw answers: the pure core of the chat log, table-driven."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import orjson
import pytest

from openai_forward.cache.tickets import Miss
from openai_forward.chatlog import AnswerObserver, Asked, ChatLog
from openai_forward.chatlog.records import request_record, response_record
from openai_forward.exchange import Call
from openai_forward.kinds import CHAT, COMPLETION, EMBEDDING
from openai_forward.kinds.chat import chat_from_sse
from openai_forward.settings import Target

SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]


def sse(*chunks: dict | bytes, done: bool = True, sep: bytes = b"\n\n") -> bytes:
    out = b"".join(c if isinstance(c, bytes) else b"data: " + orjson.dumps(c) + sep for c in chunks)
    return out + (b"data: [DONE]" + sep if done else b"")


def delta(index: int = 0, finish: str | None = None, **fields) -> dict:
    return {"choices": [{"index": index, "delta": fields, "finish_reason": finish}]}


def tool(index: int, **fields) -> dict:
    return {"index": index, **fields}


CHAT_STREAMS = [
    pytest.param(
        sse(
            delta(role="assistant", content=""),
            delta(content="Hi"),
            delta(content=" you"),
            delta(finish="stop"),
        ),
        {"assistant": "Hi you", "is_tool_calls": False, "finish_reason": "stop"},
        id="text",
    ),
    pytest.param(
        sse(delta(content="a"), delta(content="b"), sep=b"\r\n\r\n"),
        {"assistant": "ab", "is_tool_calls": False, "finish_reason": None},
        id="crlf",
    ),
    pytest.param(
        b'data:{"choices":[{"delta":{"content":"no space, no index"}}]}\n\n',
        {"assistant": "no space, no index", "is_tool_calls": False, "finish_reason": None},
        id="compact",
    ),
    pytest.param(
        sse(delta(content="x"), done=False) + b'data: {"choices": [{"delta": {"content": "y"}}]}',
        {"assistant": "xy", "is_tool_calls": False, "finish_reason": None},
        id="last-event-unterminated",
    ),
    pytest.param(
        sse(
            delta(
                tool_calls=[
                    tool(0, id="a", type="function", function={"name": "f", "arguments": ""})
                ]
            ),
            delta(
                tool_calls=[
                    tool(1, id="b", type="function", function={"name": "g", "arguments": '{"y'})
                ]
            ),
            delta(tool_calls=[tool(0, function={"arguments": '{"x": '})]),
            delta(
                tool_calls=[
                    tool(0, function={"arguments": "1}"}),
                    tool(1, function={"arguments": '": 2}'}),
                ]
            ),
            delta(finish="tool_calls"),
        ),
        {
            "assistant": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x": 1}'},
                },
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "g", "arguments": '{"y": 2}'},
                },
            ],
            "is_tool_calls": True,
            "finish_reason": "tool_calls",
        },
        id="two-tool-calls-interleaved",
    ),
    pytest.param(
        sse(
            delta(content="Let me check."),
            delta(tool_calls=[tool(0, id="a", function={"name": "f", "arguments": "{}"})]),
        ),
        {
            "assistant": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
            "is_tool_calls": True,
            "finish_reason": None,
            "content": "Let me check.",
        },
        id="text-and-tool-call",
    ),
    pytest.param(
        sse(
            delta(function_call={"name": "f", "arguments": "{"}),
            delta(function_call={"arguments": "}"}),
            delta(finish="function_call"),
        ),
        {
            "assistant": [
                {"id": None, "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
            "is_tool_calls": True,
            "finish_reason": "function_call",
        },
        id="legacy-function-call",
    ),
    pytest.param(
        sse(
            delta(reasoning_content="think"),
            delta(reasoning_content="ing"),
            delta(content="42"),
        ),
        {
            "assistant": "42",
            "is_tool_calls": False,
            "finish_reason": None,
            "reasoning": "thinking",
        },
        id="reasoning",
    ),
]


@pytest.mark.parametrize("body, expected", CHAT_STREAMS)
def test_chat_stream_assembly(body: bytes, expected: dict):
    record = response_record(CHAT, "u", 200, SSE, body, complete=True)
    summary = {k: v for k, v in record.items() if k not in ("uid", "status", "cached", "complete")}
    assert summary == expected
    assert record["complete"] is True
    # The same events with CRLF boundaries give the same record.
    general = response_record(CHAT, "u", 200, SSE, body.replace(b"\n", b"\r\n"), complete=True)
    assert general == record


@pytest.mark.parametrize(
    "body", [p.values[0] for p in CHAT_STREAMS if chat_from_sse(p.values[0]) is not None]
)
def test_a_stream_read_from_the_cache_entry_made_of_it_gives_the_same_record(body: bytes):
    """Beside the cache, the chat log reads a whole stream from the entry the cache assembled
    of it (``assembled``), which must say what the stream said."""
    call = Call(Target("http://x", "/", "openai"), CHAT, "/v1/chat/completions", {}, b"", "", None)
    miss = Miss(lambda *settled: None, b"k", None, CHAT.cache, call)  # type: ignore[arg-type]
    miss.start(200, SSE)
    miss.feed(body)
    miss.close(True)
    assert call.assembled == chat_from_sse(body) is not None
    from_entry = response_record(CHAT, "u", 200, SSE, body, complete=True, assembled=call.assembled)
    assert from_entry == response_record(CHAT, "u", 200, SSE, body, complete=True)
    # Only a stream read whole is read from its entry: a truncated one keeps its own reading.
    kept = response_record(CHAT, "u", 200, SSE, body[:40], complete=True, truncated=True)
    cut = response_record(
        CHAT, "u", 200, SSE, body[:40], complete=True, truncated=True, assembled=call.assembled
    )
    assert cut == kept and cut["complete"] is False


def test_choices_usage_and_error_in_stream():
    body = sse(
        delta(0, content="A"),
        delta(1, content="B"),
        delta(1, content="b", finish="stop"),
        delta(0, content="a", finish="length"),
        {"choices": [], "usage": {"total_tokens": 9}},
    )
    record = response_record(CHAT, "u", 200, SSE, body, complete=True)
    assert record["assistant"] == "Aa" and record["finish_reason"] == "length"
    assert [c["assistant"] for c in record["choices"]] == ["Aa", "Bb"]
    assert record["usage"] == {"total_tokens": 9}

    broken = sse(delta(content="par"), {"error": {"message": "overloaded"}}, done=False)
    record = response_record(CHAT, "u", 200, SSE, broken, complete=True)
    assert record["assistant"] == "par" and record["error"] == "overloaded"


@pytest.mark.parametrize(
    "body, complete",
    [
        (sse(delta(content="a"), b"data: {oops\n\n", delta(content="b")), False),
        (sse(delta(content="a"), b"data: [1, 2]\n\n", delta(content="b")), False),
        (sse(delta(content="a"), b": keep-alive\n\nevent: ping\n\n", delta(content="b")), True),
    ],
)
def test_malformed_events_are_skipped_and_mark_the_record(body: bytes, complete: bool):
    record = response_record(CHAT, "u", 200, SSE, body, complete=True)
    assert record["assistant"] == "ab" and record["complete"] is complete


def test_non_stream_answers_and_errors():
    body = orjson.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"total_tokens": 3},
        }
    )
    record = response_record(CHAT, "u", 200, JSON, body, complete=True)
    assert record == {
        "assistant": "hi",
        "is_tool_calls": False,
        "finish_reason": "stop",
        "uid": "u",
        "usage": {"total_tokens": 3},
        "status": 200,
        "cached": False,
        "complete": True,
    }
    gz = response_record(
        CHAT,
        "u",
        200,
        [*JSON, (b"content-encoding", b"gzip")],
        gzip.compress(body),
        complete=True,
    )
    assert gz == record
    hit = response_record(CHAT, "u", 200, [*JSON, (b"x-cache", b"HIT")], body, complete=True)
    assert hit["cached"] is True

    error = orjson.dumps({"error": {"message": "model not found", "type": "invalid_request_error"}})
    record = response_record(CHAT, "u", 404, JSON, error, complete=True)
    assert record["status"] == 404 and record["error"] == "model not found"
    assert record["assistant"] == "" and record["complete"] is True
    record = response_record(
        CHAT, "u", 502, [(b"content-type", b"text/html")], b"<h1>Bad</h1>", complete=True
    )
    assert record["error"] == "<h1>Bad</h1>"

    text = orjson.dumps({"choices": [{"index": 0, "text": "done", "finish_reason": "stop"}]})
    record = response_record(COMPLETION, "u", 200, JSON, text, complete=True)
    assert record["assistant"] == "done" and record["finish_reason"] == "stop"
    stream = sse(
        {"choices": [{"index": 0, "text": "do"}]}, {"choices": [{"index": 0, "text": "ne"}]}
    )
    assert response_record(COMPLETION, "u", 200, SSE, stream, complete=True)["assistant"] == "done"

    none = response_record(CHAT, "u", None, [], b"", complete=False)
    assert none["status"] is None and none["assistant"] == "" and none["complete"] is False


def test_an_answer_cut_on_its_way_says_why():
    body = sse({"choices": [{"index": 0, "delta": {"content": "Hal"}}]})
    cut = response_record(CHAT, "u", 200, SSE, body, complete=False, reason="client left")
    assert cut["assistant"] == "Hal" and cut["complete"] is False
    assert cut["reason"] == "client left"
    assert list(cut)[-2:] == ["complete", "reason"]  # right after complete
    # No reason when it reached the client whole (an answer that is not complete for what it
    # holds says so in its own fields), nor when none is known.
    whole = response_record(CHAT, "u", 200, SSE, body, complete=True, reason="client left")
    assert "reason" not in whole
    assert "reason" not in response_record(CHAT, "u", 200, SSE, body, complete=False)


def test_embedding_usage_without_parsing_vectors():
    vectors = [{"object": "embedding", "index": i, "embedding": [0.125] * 1536} for i in range(40)]
    body = orjson.dumps(
        {"object": "list", "data": vectors, "usage": {"prompt_tokens": 40, "total_tokens": 40}}
    )
    record = response_record(EMBEDDING, "u", 200, JSON, body, complete=True)
    assert record == {
        "uid": "u",
        "usage": {"prompt_tokens": 40, "total_tokens": 40},
        "status": 200,
        "cached": False,
        "complete": True,
    }


def _call(kind, payload) -> Call:
    return Call(Target("http://x", "/", "openai"), kind, "/v1/x", payload, b"", "1.2.3.4", None)


async def test_an_answer_too_long_to_keep_is_marked_truncated(tmp_path: Path):
    """Past its kind's keep_bytes the observer keeps only the end: the record says so, with the text that
    was kept, and the usage and finish reason from the tail."""
    chatlog = ChatLog(tmp_path, None, [])
    await chatlog.open()
    observer = chatlog.request(_call(CHAT, {"model": "m", "messages": [], "stream": True}))
    observer.start(200, SSE)
    event = sse(delta(content="x" * 1000), done=False)
    for _ in range(CHAT.log.keep_bytes // len(event) + 200):
        observer.feed(event)
    observer.feed(sse(delta(finish="stop"), {"choices": [], "usage": {"total_tokens": 1}}))
    observer.close(True)

    embedding = chatlog.request(_call(EMBEDDING, {"model": "e", "input": "x"}))
    embedding.start(200, JSON)
    body = orjson.dumps({"data": [{"embedding": [0.5] * 200_000}], "usage": {"total_tokens": 2}})
    for i in range(0, len(body), 65536):
        embedding.feed(body[i : i + 65536])
    embedding.close(True)
    await asyncio.wait_for(chatlog.close(), 10)

    chat = [orjson.loads(x) for x in (tmp_path / "openai/chat/chat.log").read_bytes().splitlines()]
    request, response = chat
    assert request["ip"] == "1.2.3.4" and len(request["datetime"]) == 19
    assert response["truncated"] is True and response["complete"] is False
    assert response["finish_reason"] == "stop" and response["usage"] == {"total_tokens": 1}
    assert len(response["assistant"]) > CHAT.log.keep_bytes // 2
    lines = (tmp_path / "openai/embedding/embedding.log").read_bytes().splitlines()
    response = orjson.loads(lines[1])
    assert response["usage"] == {"total_tokens": 2}
    assert response["complete"] is True and "truncated" not in response  # vectors never logged


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [{"index": [1], "delta": {"content": "x"}}]},
        {"choices": [{"index": None, "delta": {"content": "x", "tool_calls": "no"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": {}, "function": "f"}, 3]}}]},
        {"choices": [{"delta": {"content": "x", "function_call": [1]}}], "usage": [1]},
        {"choices": [{"delta": ["x"]}, "junk", None]},
        {"choices": {"0": "x"}, "error": ["weird"]},
    ],
)
def test_odd_shapes_never_break_a_record(chunk: dict):
    record = response_record(CHAT, "u", 200, SSE, sse(chunk), complete=True)
    assert record["uid"] == "u" and isinstance(record["assistant"], str | list)


def _record(assistant, finish_reason, **rest) -> list[tuple[str, object]]:
    fields = {"assistant": assistant, "is_tool_calls": False, "finish_reason": finish_reason}
    fields.update(uid="u1", **rest)
    return list({**fields, "status": 200, "cached": False, "complete": True}.items())


@pytest.mark.parametrize(
    "answer, expected",
    [
        (
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"total_tokens": 3},
            },
            _record("Hi", "stop", usage={"total_tokens": 3}),
        ),
        (
            {"choices": [{"message": {"role": "assistant", "content": "", "refusal": None}}]},
            _record("", None),
        ),
        (
            {"choices": [{"message": {"content": "no usage"}, "finish_reason": None}], "usage": 7},
            _record("no usage", None),
        ),
    ],
)
def test_the_usual_chat_answer_gives_its_record_in_a_fixed_key_order(answer, expected):
    """The record is the line written to the log: its keys come in a fixed order."""
    record = response_record(CHAT, "u1", 200, JSON, orjson.dumps(answer), complete=True)
    assert list(record.items()) == expected


def test_request_record_keeps_the_asked_fields_in_a_fixed_order_whatever_the_body_order():
    payload = {
        "seed": 7,
        "user": "u-1",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "caching": True,  # ours: never recorded
        "model": "m",
        "metadata": {"x": 1},  # not a field the record keeps
        "max_tokens": 5,
    }
    record = request_record(CHAT, payload, "10.0.0.1", "uid-1", None)
    assert list(record) == [
        "messages",
        "model",
        "stream",
        "temperature",
        "max_tokens",
        "seed",
        "user",
        "tools",
        "ip",
        "uid",
    ]
    assert record["stream"] is False and record["tools"] is None and record["seed"] == 7
    plain = request_record(EMBEDDING, {"input": "a", "model": "e"}, "ip", "u", "kh")
    assert plain == {"input": "a", "model": "e", "ip": "ip", "uid": "u", "key_hash": "kh"}


@pytest.mark.parametrize(
    "ended, reason",
    [
        (asyncio.CancelledError("client left"), "client left"),  # the hang-up watch's cancel
        (asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded"), "shutdown"),
    ],
)
def test_an_observer_closed_without_a_reason_takes_the_one_of_what_ended_the_answer(
    ended: BaseException, reason: str
):
    """A caller that closes from its ``finally`` without a reason (the cache's replay of a hit):
    the exception on its way out says why."""
    submitted = []

    class Log:
        def submit(self, path: str, render) -> None:
            submitted.append(render)

    asked = Asked(CHAT, {"messages": []}, "127.0.0.1", "u", None, 0.0)
    observer = AnswerObserver(Log(), "p", asked)  # type: ignore[arg-type]
    observer.start(200, [])
    with pytest.raises(type(ended)):
        try:
            raise ended
        finally:
            observer.close(False)
    (render,) = submitted
    record = render()
    assert record["complete"] is False and record["reason"] == reason
