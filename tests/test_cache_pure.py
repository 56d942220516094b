"""The cache's pure core: keys, stored answers built from JSON or SSE, SSE rendering, expiry."""

from __future__ import annotations

import time

import orjson
import pytest

from openai_forward.cache.keys import cache_key, without_caching_field
from openai_forward.cache.store import pack, unpack
from openai_forward.kinds.chat import chat_from_sse, chat_to_sse, is_document, wants_usage
from openai_forward.sse import EventSplitter, event_data
from tests.fake_openai import TOOL_CALL, _chunk

BASE = "http://upstream"
ROUTE = "/v1/chat/completions"
REQUEST = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0.2,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "seed": 1,
    "max_tokens": 10,
    "n": 1,
}


def key(payload: dict, base: str = BASE, route: str = ROUTE, query: bytes = b"") -> bytes:
    return cache_key(base, route, query, payload)


def test_key_ignores_key_order_and_whitespace():
    compact = orjson.dumps(REQUEST)
    spaced = b'{ "n" : 1,\n "seed": 1, "max_tokens":10, "temperature" :0.2, "messages": [ {"content": "hi", "role":"user"} ],\n "tools": [{"function": {"parameters": {"type": "object"}, "name": "f"}, "type": "function"}], "model": "gpt-test" }'
    assert key(orjson.loads(compact)) == key(orjson.loads(spaced))
    assert len(key(REQUEST)) == 32


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.3),
        ("tools", []),
        ("seed", 2),
        ("max_tokens", 11),
        ("n", 2),
        ("model", "gpt-other"),
        ("messages", [{"role": "user", "content": "hi!"}]),
        ("user", "someone"),
    ],
)
def test_key_changes_with_every_answer_field(field: str, value: object):
    assert key({**REQUEST, field: value}) != key(REQUEST)


def test_key_ignores_delivery_fields_and_changes_with_target_route_query():
    same = {**REQUEST, "stream": True, "stream_options": {"include_usage": True}, "caching": True}
    assert key(same) == key(REQUEST)
    assert key(REQUEST, base="http://other") != key(REQUEST)
    assert key(REQUEST, route="/azure/v1/chat/completions") != key(REQUEST)
    assert key(REQUEST, query=b"api-version=2") != key(REQUEST)


def test_caching_field_removed_and_usage_option():
    body = without_caching_field({**REQUEST, "caching": True})
    assert body is not None and orjson.loads(body) == REQUEST
    assert without_caching_field(REQUEST) is None  # the client's body goes as it came
    assert wants_usage({"stream_options": {"include_usage": True}})
    assert not wants_usage({"stream_options": None}) and not wants_usage({})


def sse(*chunks: bytes, done: bool = True) -> bytes:
    return b"".join(chunks) + (b"data: [DONE]\n\n" if done else b"")


TEXT_STREAM = sse(
    _chunk("c1", "m", {"role": "assistant", "content": ""}),
    _chunk("c1", "m", {"content": "Hello"}),
    b": keep-alive comment\n\n",
    _chunk("c1", "m", {"content": " world"}),
    _chunk("c1", "m", {}, "stop"),
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"total_tokens":3}}\n\n',
)


def tool_stream() -> bytes:
    args = TOOL_CALL["function"]["arguments"]  # type: ignore[index]
    first = {"index": 0, "id": "call_1", "type": "function"}
    first["function"] = {"name": "get_weather", "arguments": ""}
    parts = [_chunk("c2", "m", {"role": "assistant", "content": None})]
    parts.append(_chunk("c2", "m", {"tool_calls": [first]}))
    for i in range(0, len(args), 5):
        parts.append(_chunk("c2", "m", {"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 5]}}]}))  # fmt: skip
    parts.append(_chunk("c2", "m", {}, "tool_calls"))
    return sse(*parts)


def test_text_stream_assembles_to_a_chat_completion():
    answer = orjson.loads(chat_from_sse(TEXT_STREAM) or b"null")
    assert answer["object"] == "chat.completion"
    assert answer["id"] == "c1" and answer["model"] == "m"
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert answer["usage"] == {"total_tokens": 3}


def test_tool_call_stream_assembles_tool_calls():
    answer = orjson.loads(chat_from_sse(tool_stream()) or b"null")
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [TOOL_CALL]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "spell",
    [
        lambda event: b"event: message\n" + event,  # a named event: two lines
        lambda event: event.replace(b"data: ", b"data:"),  # no space after the colon
        lambda event: event.replace(b'","', b'",\ndata: "', 1),  # data split over two lines
        lambda event: b"id: 7\r\n" + event.replace(b"\n\n", b"\r\n\r\n"),
    ],
)
def test_stream_spellings_assemble_alike(spell):
    events = [event + b"\n\n" for event in TEXT_STREAM.split(b"\n\n") if event]
    assert chat_from_sse(b"".join(spell(event) for event in events)) == chat_from_sse(TEXT_STREAM)


def test_long_stream_with_logprobs_assembles_every_piece():
    """Thousands of deltas: every text piece and every logprob kept, in order."""
    words = [f"w{i} " for i in range(3000)]

    def event(i: int, word: str) -> bytes:
        choice = {
            "index": 0,
            "delta": {"content": word},
            "logprobs": {"content": [{"token": word, "logprob": -i}]},
            "finish_reason": None,
        }
        return b"data: " + orjson.dumps({"id": "c9", "model": "m", "choices": [choice]}) + b"\n\n"

    first = _chunk("c9", "m", {"role": "assistant", "content": None})  # null, then text
    body = sse(first, *(event(i, w) for i, w in enumerate(words)), _chunk("c9", "m", {}, "stop"))
    choice = orjson.loads(chat_from_sse(body) or b"null")["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "".join(words)}
    assert [item["token"] for item in choice["logprobs"]["content"]] == words
    assert choice["finish_reason"] == "stop"


def test_several_choices_and_crlf_terminators():
    body = sse(
        _chunk("c3", "m", {"role": "assistant", "content": "a"}, index=0),
        _chunk("c3", "m", {"role": "assistant", "content": "b"}, index=1),
        _chunk("c3", "m", {"content": "A"}, "stop", index=0),
        _chunk("c3", "m", {"content": "B"}, "length", index=1),
    ).replace(b"\n\n", b"\r\n\r\n")
    choices = orjson.loads(chat_from_sse(body) or b"null")["choices"]
    assert [(c["message"]["content"], c["finish_reason"]) for c in choices] == [
        ("aA", "stop"),
        ("bB", "length"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        sse(_chunk("c", "m", {"content": "cut"}), done=False),  # no [DONE]
        sse(_chunk("c", "m", {"content": "x"}))[:-20],  # truncated mid-event
        sse(b'data: {"error": {"message": "overloaded"}}\n\n'),
        sse(b"data: {not json\n\n"),
        sse(),  # [DONE] and nothing else
        b"",
    ],
)
def test_broken_streams_are_never_stored(body: bytes):
    assert chat_from_sse(body) is None


@pytest.mark.parametrize(
    "body, list_field, stored",
    [
        (b'{"object":"chat.completion","choices":[]}', "choices", True),
        (b'{"error":{"message":"bad"},"choices":[]}', "choices", False),
        (b'{"object":"chat.completion","choices":[', "choices", False),
        (b"[1, 2]", "choices", False),
        (b'{"object":"list","data":[{"embedding":[0.1]}]}', "data", True),
        (b'{"object":"list"}', "data", False),
        # the list key only past the first 512 bytes: parsed, and judged the same way
        (b'{"id":"' + b"x" * 600 + b'","choices":[]}', "choices", True),
        (b'{"id":"' + b"x" * 600 + b'","choices":[],"error":{}}', "choices", False),
        (
            b'{"object":"list","data":[{"embedding":[' + b"0.5," * 40000 + b"1]}]}\n",
            "data",
            True,
        ),
    ],
)
def test_json_answers_stored_verbatim_only_when_whole(body, list_field, stored):
    assert is_document(body, list_field) is stored


def events(stream: bytes) -> list[bytes]:
    splitter = EventSplitter()
    found = splitter.feed(stream)
    assert splitter.flush() == b""  # every event is terminated
    return [d for d in (event_data(e) for e in found) if d is not None]


def test_rendered_stream_is_well_formed_and_reassembles_to_the_same_answer():
    stored = chat_from_sse(tool_stream())
    assert stored is not None
    rendered = chat_to_sse(stored)
    data = events(rendered)
    assert data[-1] == b"[DONE]"
    first = orjson.loads(data[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert orjson.loads(data[-2])["choices"][0]["finish_reason"] == "tool_calls"
    assert orjson.loads(chat_from_sse(rendered) or b"null") == orjson.loads(stored)


def test_rendered_stream_of_a_json_answer_with_usage_when_asked():
    answer = {
        "id": "c9",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "system_fingerprint": "fp",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    body = orjson.dumps(answer)
    plain = [orjson.loads(d) for d in events(chat_to_sse(body))[:-1]]
    with_usage = [orjson.loads(d) for d in events(chat_to_sse(body, include_usage=True))[:-1]]
    assert [c["choices"][0]["delta"] for c in plain] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi there"},
        {},
    ]
    assert all(c["system_fingerprint"] == "fp" and c["id"] == "c9" for c in plain)
    assert "usage" not in plain[-1]
    assert with_usage[-1] == {**plain[-1], "choices": [], "usage": answer["usage"]}
    back = orjson.loads(chat_from_sse(chat_to_sse(body, True)) or b"null")
    assert back["choices"][0]["message"]["content"] == "Hi there"
    assert back["usage"] == answer["usage"]


def test_extra_delta_fields_such_as_reasoning_survive_both_ways():
    body = sse(
        _chunk("r", "m", {"role": "assistant", "reasoning_content": "think"}),
        _chunk("r", "m", {"reasoning_content": "ing"}),
        _chunk("r", "m", {"content": "42"}, "stop"),
    )
    stored = chat_from_sse(body)
    message = orjson.loads(stored or b"null")["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "42", "reasoning_content": "thinking"}
    again = orjson.loads(chat_from_sse(chat_to_sse(stored or b"")) or b"null")
    assert again["choices"][0]["message"] == message


def test_pack_unpack_with_expiry():
    assert unpack(pack(b"answer", None)) == (b"answer", False)
    assert unpack(pack(b"answer", 60)) == (b"answer", False)
    expired = pack(b"answer", 0.001)
    time.sleep(0.01)
    assert unpack(expired) == (None, True)
    assert unpack(b"\x09" + pack(b"answer", None)[1:]) == (None, True)  # unknown format
    assert unpack(b"x") == (None, True)
