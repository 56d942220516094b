"""The Responses API's pure core: cache entries from streams and JSON, replays as event streams,
chat log records and convert's conversations, table-driven."""

from __future__ import annotations

import orjson
import pytest

from openai_forward.cache.tickets import Miss
from openai_forward.chatlog.records import response_record
from openai_forward.kinds import RESPONSES
from openai_forward.kinds.responses import conversation, from_stream, is_whole, to_stream
from openai_forward.sse import event_data, split_stream
from tests.fake_openai import RESPONSE_CALL, RESPONSE_USAGE, response_events, response_object

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON = [(b"content-type", b"application/json")]
TEXT = {"model": "m", "input": "hello there"}
TOOLS = {**TEXT, "tools": [{"type": "function", "name": "get_weather", "parameters": {}}]}


def stream(body: dict = TEXT, end: str = "completed") -> bytes:
    return b"".join(response_events(body, end))


def datas(body: bytes) -> list[dict]:
    return [orjson.loads(d) for d in (event_data(e) for e in split_stream(body)) if d]


def final(body: bytes) -> dict:
    """The response of a stream's last event."""
    return datas(body)[-1]["response"]


@pytest.mark.parametrize("request_body", [TEXT, TOOLS], ids=["text", "function-call"])
def test_a_completed_stream_stores_its_final_response(request_body: dict):
    body = stream(request_body)
    entry = from_stream(body)
    assert entry is not None and orjson.loads(entry) == final(body)


@pytest.mark.parametrize(
    "spell",
    [
        lambda e: e.replace(b"\n", b"\r\n"),
        lambda e: e.split(b"\n", 1)[1],  # no event: line, only data:
        lambda e: e.replace(b"data: ", b"data:"),
        lambda e: e.replace(b'","', b'",\ndata: "', 1),  # data split over two lines
        lambda e: b": keep-alive\n\n" + e,
        lambda e: e + b"data: [DONE]\n\n" if b"response.completed" in e else e,
    ],
    ids=["crlf", "no-event-line", "no-space", "two-data-lines", "comments", "done-after-all"],
)
def test_stream_spellings_store_alike(spell):
    events = response_events(TEXT)
    body = b"".join(events)
    assert from_stream(b"".join(spell(e) for e in events)) == from_stream(body)


@pytest.mark.parametrize("end", ["incomplete", "failed", "error", "none"])
def test_a_stream_that_did_not_complete_is_never_stored(end: str):
    assert from_stream(stream(TEXT, end)) is None


@pytest.mark.parametrize(
    "body",
    [
        stream()[:-30],  # the last event cut
        stream().replace(b'"type":"response.output_text.delta"', b"oops", 1),  # not JSON
        stream().replace(b'{"type":"response.in_progress"', b'{"kind":"x"', 1),  # no type
        b'data: {"error": {"message": "overloaded"}}\n\n',  # a chat-style error
        b"",
    ],
    ids=["cut", "not-json", "untyped-event", "error-document", "empty"],
)
def test_broken_streams_are_never_stored(body: bytes):
    assert from_stream(body) is None


def _without_final_output(events: list[bytes], drop_done: bool = False) -> bytes:
    out = []
    for event in events:
        data = datas(event)[0]
        if data["type"] == "response.completed":
            data["response"].pop("output")
        if drop_done and data["type"] == "response.output_item.done":
            continue
        out.append(b"data: " + orjson.dumps(data) + b"\n\n")
    return b"".join(out)


def test_a_last_event_without_output_is_completed_by_the_items_done_events():
    events = response_events(TOOLS)
    entry = from_stream(_without_final_output(events))
    assert entry is not None and orjson.loads(entry)["output"] == [RESPONSE_CALL]
    # an item that began and never ended: not a whole answer
    assert from_stream(_without_final_output(events, drop_done=True)) is None


@pytest.mark.parametrize(
    "body, whole",
    [
        (orjson.dumps(response_object(TEXT)), True),
        (orjson.dumps(response_object(TOOLS)), True),
        (orjson.dumps(response_object(TEXT, "incomplete")), False),
        (orjson.dumps(response_object(TEXT, "failed")), False),
        (orjson.dumps(response_object(TEXT, "queued")), False),  # background
        (orjson.dumps({**response_object(TEXT), "error": {"message": "x"}}), False),
        (orjson.dumps({**response_object(TEXT), "object": "chat.completion"}), False),
        (orjson.dumps({**response_object(TEXT), "output": None}), False),
        (b'{"error": {"message": "bad", "type": "invalid_request_error"}}', False),
        (orjson.dumps(response_object(TEXT))[:-1], False),
        (b"[]", False),
    ],
)
def test_json_answers_stored_only_when_completed(body: bytes, whole: bool):
    assert is_whole(body) is whole


MESSAGE_WITH_EVERYTHING = {
    "type": "message",
    "id": "msg_9",
    "status": "completed",
    "role": "assistant",
    "content": [
        {
            "type": "output_text",
            "text": "See [1].",
            "annotations": [
                {
                    "type": "url_citation",
                    "url": "https://x",
                    "start_index": 4,
                    "end_index": 7,
                    "title": "x",
                }
            ],
            "logprobs": [{"token": "See", "logprob": -0.1, "bytes": [83], "top_logprobs": []}],
        },
        {"type": "refusal", "refusal": "I can't add more."},
    ],
}
REASONING = {
    "type": "reasoning",
    "id": "rs_1",
    "summary": [{"type": "summary_text", "text": "Think."}],
}
SEARCH = {
    "type": "web_search_call",
    "id": "ws_1",
    "status": "completed",
    "action": {"type": "search", "query": "q"},
}


@pytest.mark.parametrize(
    "output",
    [
        [response_object(TEXT)["output"][0]],
        [RESPONSE_CALL],
        [REASONING, SEARCH, MESSAGE_WITH_EVERYTHING, RESPONSE_CALL],
        [],
    ],
    ids=["text", "function-call", "every-item", "no-output"],
)
def test_a_replayed_stream_is_well_formed_and_stores_the_same_response(output: list):
    stored = {**response_object(TEXT), "output": output}
    replay = to_stream(orjson.dumps(stored), {"stream": True})
    events = datas(replay)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for raw in split_stream(replay):  # every event named as its type
        assert raw.startswith(b"event: " + orjson.loads(event_data(raw) or b"")["type"].encode())
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    assert events[0]["response"]["id"] == stored["id"]
    assert events[-1] == {
        "type": "response.completed",
        "sequence_number": len(events) - 1,
        "response": stored,
    }
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert added == list(range(len(output))) and done == output
    assert orjson.loads(from_stream(replay) or b"null") == stored


def test_a_replay_sends_text_and_arguments_as_deltas():
    stored = {**response_object(TEXT), "output": [MESSAGE_WITH_EVERYTHING, RESPONSE_CALL]}
    events = datas(to_stream(orjson.dumps(stored), {}))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    by_type = {e["type"]: e for e in events}  # the last of each type
    assert events[2]["item"] == {**MESSAGE_WITH_EVERYTHING, "status": "in_progress", "content": []}
    text_part = events[3]
    assert (text_part["item_id"], text_part["output_index"], text_part["content_index"]) == (
        "msg_9",
        0,
        0,
    )
    assert events[3]["part"] == {
        **MESSAGE_WITH_EVERYTHING["content"][0],
        "text": "",
        "annotations": [],
        "logprobs": [],
    }
    assert by_type["response.output_text.delta"]["delta"] == "See [1]."
    assert by_type["response.output_text.delta"]["logprobs"][0]["token"] == "See"
    assert by_type["response.refusal.done"]["refusal"] == "I can't add more."
    call = by_type["response.function_call_arguments.delta"]
    assert (call["item_id"], call["output_index"], call["delta"]) == (
        "fc_1",
        1,
        RESPONSE_CALL["arguments"],
    )
    assert events[12]["item"] == {**RESPONSE_CALL, "arguments": "", "status": "in_progress"}


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_a_miss_stores_a_stream_however_it_was_cut(size: int):
    body = stream(TOOLS)
    settled = []
    assert RESPONSES.cache is not None
    miss = Miss(lambda *args: settled.append(args), b"k", None, RESPONSES.cache)
    miss.start(200, SSE)
    for i in range(0, len(body), size):
        miss.feed(body[i : i + size])
    miss.close(True)
    assert settled == [(b"k", None, from_stream(body))] and settled[0][2] is not None


def test_a_stream_cut_in_two_anywhere_is_stored_alike():
    body = stream(TEXT)
    expected = from_stream(body)
    assert RESPONSES.cache is not None and expected is not None
    settled: list[bytes | None] = []
    for cut in range(1, len(body)):
        miss = Miss(lambda *args: settled.append(args[2]), b"k", None, RESPONSES.cache)
        miss.start(200, SSE)
        miss.feed(body[:cut])
        miss.feed(body[cut:])
        miss.close(True)
    assert settled == [expected] * (len(body) - 1)


def record(body: bytes, headers=SSE, status: int = 200, **options) -> dict:
    options.setdefault("complete", True)
    found = response_record(RESPONSES, "u", status, headers, body, **options)
    assert found.pop("uid") == "u" and found.pop("cached") is False
    return found


TEXT_RECORD = {
    "assistant": "echo: hello there",
    "is_tool_calls": False,
    "response_id": "?",
    "response_status": "completed",
    "usage": RESPONSE_USAGE,
    "status": 200,
    "complete": True,
}
CALL = {k: RESPONSE_CALL[k] for k in ("type", "call_id", "name", "arguments")}
# The order of a record's fields (uid and cached, always there, left out)
ORDER = ["assistant", "is_tool_calls", "content", "reasoning", "response_id", "response_status"]
ORDER += ["incomplete_reason", "usage", "status", "complete", "error", "truncated"]


@pytest.mark.parametrize(
    "request_body, end, expected",
    [
        (TEXT, "completed", {}),
        (TOOLS, "completed", {"assistant": [CALL], "is_tool_calls": True}),
        (
            TEXT,
            "incomplete",
            {
                "response_status": "incomplete",
                "incomplete_reason": "max_output_tokens",
                "complete": False,
            },
        ),
        (
            TEXT,
            "failed",
            {"response_status": "failed", "error": "The model failed", "complete": False},
        ),
        (
            TEXT,
            "error",
            {
                "response_status": "in_progress",
                "usage": None,
                "error": "overloaded",
                "complete": False,
            },
        ),
        (TEXT, "none", {"response_status": "in_progress", "usage": None, "complete": False}),
        (
            TOOLS,
            "none",
            {
                "assistant": [CALL],
                "is_tool_calls": True,
                "response_status": "in_progress",
                "usage": None,
                "complete": False,
            },
        ),
    ],
)
def test_stream_records(request_body: dict, end: str, expected: dict):
    body = stream(request_body, end)
    wanted = {**TEXT_RECORD, "response_id": datas(body)[0]["response"]["id"], **expected}
    wanted = {k: v for k, v in wanted.items() if v is not None or k != "usage"}
    found = record(body)
    assert found == wanted
    assert list(found) == [name for name in ORDER if name in found]
    # Every event's bytes split over lines differently: the same record.
    assert record(body.replace(b"\n", b"\r\n")) == found


def test_a_stream_cut_mid_event_records_what_arrived():
    body = stream(TEXT, "none")
    cut = body[: body.index(b"event: response.output_text.done") + 50]  # inside the done event
    found = record(cut, complete=False)
    assert found["assistant"] == "echo: hello there" and found["complete"] is False


def test_a_stream_too_long_to_keep_gets_its_end_from_the_tail():
    """The head holds the first deltas; the tail starts mid-event and holds the last event,
    whose response has the whole output, the usage and the status."""
    body = stream(TEXT)
    head, tail = body[:700], body[-(len(body) - 900) :]
    found = record(head, tail=tail, truncated=True, complete=True)
    assert found["assistant"] == "echo: hello there" and found["usage"] == RESPONSE_USAGE
    assert found["response_status"] == "completed"
    assert found["truncated"] is True and found["complete"] is False


def test_reasoning_and_text_beside_a_call():
    stored = {
        **response_object(TEXT),
        "output": [REASONING, MESSAGE_WITH_EVERYTHING, RESPONSE_CALL],
    }
    for body, headers in ((orjson.dumps(stored), JSON), (to_stream(orjson.dumps(stored), {}), SSE)):
        found = record(body, headers)
        assert found["assistant"] == [CALL] and found["is_tool_calls"] is True
        assert found["content"] == "See [1]." and found["reasoning"] == "Think."
    deltas = b"".join(
        b"data: " + orjson.dumps(e) + b"\n\n"
        for e in (
            {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "Thi"},
            {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "nk."},
            {"type": "response.output_text.delta", "output_index": 1, "delta": "A"},
            {"type": "response.output_text.delta", "delta": "?"},  # says not where: kept first
        )
    )
    found = record(deltas, complete=False)
    assert (found["assistant"], found["reasoning"]) == ("?A", "Think.")


@pytest.mark.parametrize(
    "body, status, expected",
    [
        (response_object(TEXT), 200, {}),
        (response_object(TOOLS), 200, {"assistant": [CALL], "is_tool_calls": True}),
        (
            {
                **response_object(TEXT),
                "status": "incomplete",
                "incomplete_details": {"reason": "content_filter"},
            },
            200,
            {
                "response_status": "incomplete",
                "incomplete_reason": "content_filter",
                "complete": False,
            },
        ),
        (
            {"error": {"message": "No such response", "type": "invalid_request_error"}},
            404,
            {
                "assistant": "",
                "response_id": None,
                "response_status": None,
                "usage": None,
                "status": 404,
                "error": "No such response",
            },
        ),
        (
            [1],
            200,
            {
                "assistant": "",
                "response_id": None,
                "response_status": None,
                "usage": None,
                "complete": False,
            },
        ),
    ],
)
def test_json_records(body, status: int, expected: dict):
    wanted = {**TEXT_RECORD, "response_id": None, **expected}
    if isinstance(body, dict) and "id" in body:
        wanted["response_id"] = body["id"]
    found = record(orjson.dumps(body), JSON, status)
    assert found == {k: v for k, v in wanted.items() if v is not None or k != "usage"}


@pytest.mark.parametrize(
    "request_record, messages",
    [
        ({"input": "hi", "instructions": None}, [{"user": "hi"}]),
        ({"input": "hi", "instructions": "be brief"}, [{"system": "be brief"}, {"user": "hi"}]),
        (
            {
                "input": [
                    {"role": "developer", "content": "dev"},
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "a"}],
                    },
                    {"role": "assistant", "content": "b"},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "42"},
                    {"type": "item_reference", "id": "msg_1"},
                    "junk",
                ]
            },
            [
                {"developer": "dev"},
                {"user": [{"type": "input_text", "text": "a"}]},
                {"assistant": "b"},
                {
                    "assistant": [
                        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
                    ]
                },
                {"tool": "42"},
                {"item_reference": {"type": "item_reference", "id": "msg_1"}},
            ],
        ),
        ({"input": None}, []),
    ],
)
def test_conversation_of_a_request_record(request_record: dict, messages: list):
    assert conversation(request_record) == messages
