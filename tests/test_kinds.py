"""The registry of API kinds: one entry per kind, and what the cache, the chat log and convert
read from it."""

from __future__ import annotations

import pytest

from openai_forward.cache.keys import cache_key
from openai_forward.chatlog.records import request_record
from openai_forward.exchange import call_kind
from openai_forward.kinds import (
    BY_NAME,
    CHAT,
    COMPLETION,
    EMBEDDING,
    KINDS,
    RESPONSES,
    cached_kinds,
    converted_kinds,
    kind_of,
)
from openai_forward.settings import Settings


@pytest.mark.parametrize(
    "route, name",
    [
        ("/v1/chat/completions", "chat"),
        ("/team/b/v1/chat/completions", "chat"),
        ("/v1/completions", "completion"),
        ("/v1/embeddings", "embedding"),
        ("/v1/responses", "responses"),
        ("/azure/openai/v1/responses", "responses"),
        # other routes under the same names are not calls of the kind
        ("/v1/responses/resp_1", None),
        ("/v1/responses/resp_1/cancel", None),
        ("/v1/responses/resp_1/input_items", None),
        ("/v1/responses/input_tokens", None),
        ("/v1/chat/completions/chatcmpl-1", None),
        ("/v1/models", None),
        ("/v1/files", None),
        ("/v1/realtime", None),
        ("/", None),
    ],
)
def test_a_route_has_the_kind_its_end_names(route: str, name: str | None):
    kind = kind_of(route)
    assert (kind.name if kind else None) == name
    assert call_kind(route) is kind  # the forwarder's question, the same answer


def test_each_kind_is_one_entry():
    assert KINDS == (CHAT, COMPLETION, EMBEDDING, RESPONSES)
    assert BY_NAME == {"chat": CHAT, "completion": COMPLETION, "embedding": EMBEDDING, "responses": RESPONSES}  # fmt: skip
    for field in ("name", "suffix"):
        assert len({getattr(kind, field) for kind in KINDS}) == len(KINDS)
    assert len({kind.log.folder for kind in KINDS}) == len(KINDS)
    assert [kind.log.folder for kind in KINDS] == ["chat", "completion", "embedding", "responses"]
    for kind in KINDS:
        assert kind.log.head[0] == kind.prompt  # the prompt leads every request record
        assert repr(kind) == f"<Kind {kind.name}>"


@pytest.mark.parametrize(
    "kind, cached, streams, converted, keep",
    [
        (CHAT, True, True, True, 8 << 20),
        (COMPLETION, False, False, False, 8 << 20),
        (EMBEDDING, True, False, False, 64 << 10),
        (RESPONSES, True, True, True, 8 << 20),
    ],
)
def test_what_each_feature_gets_from_a_kind(kind, cached, streams, converted, keep):
    assert (kind.cache is not None) is cached
    if kind.cache is not None:
        assert (kind.cache.from_stream is not None) is streams
        assert (kind.cache.to_stream is not None) is streams
    assert (kind.conversation is not None) is converted
    assert kind.log.keep_bytes == keep


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, set()),
        ({"CACHE_CHAT_COMPLETION": "true"}, {CHAT, RESPONSES}),
        ({"CACHE_EMBEDDING": "true"}, {EMBEDDING}),
        (
            {"CACHE_CHAT_COMPLETION": "true", "CACHE_EMBEDDING": "true"},
            {CHAT, RESPONSES, EMBEDDING},
        ),
    ],
)
def test_the_cache_switches_turn_on_their_kinds(env: dict, expected: set):
    settings = Settings.from_env(environ={"OPENAI_BASE_URL": "http://x", **env}, env_file=None)
    assert cached_kinds(settings) == expected


def test_convert_converts_the_conversations():
    assert converted_kinds() == (CHAT, RESPONSES)


@pytest.mark.parametrize(
    "payload, allowed",
    [
        ({}, True),
        ({"store": True}, True),
        ({"store": False}, True),
        ({"previous_response_id": None}, True),
        ({"previous_response_id": "resp_1"}, False),
        ({"conversation": "conv_1"}, False),
        ({"conversation": {"id": "conv_1"}}, False),
        ({"background": True}, False),
        ({"background": False}, True),
        ({"prompt": {"id": "pmpt_1"}}, False),  # the template's current version: may change
        ({"prompt": {"id": "pmpt_1", "version": None}}, False),
        ({"prompt": {"id": "pmpt_1", "version": "2"}}, True),
    ],
)
def test_which_responses_requests_the_cache_may_answer(payload: dict, allowed: bool):
    body = {"model": "m", "input": "hi", **payload}
    assert RESPONSES.cache is not None and RESPONSES.cache.allows(body) is allowed
    for kind in (CHAT, EMBEDDING):  # chat and embeddings have no state upstream
        assert kind.cache is not None and kind.cache.allows(body)


RESPONSE_REQUEST = {
    "model": "gpt-test",
    "input": [{"role": "user", "content": "hi"}],
    "instructions": "be brief",
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    "temperature": 0.2,
}


@pytest.mark.parametrize(
    "field, value",
    [
        ("input", "hi"),
        ("instructions", "be long"),
        ("model", "gpt-other"),
        ("tools", []),
        ("temperature", 0.3),
        ("text", {"format": {"type": "json_object"}}),
        ("reasoning", {"effort": "high"}),
        ("top_p", 0.5),
        ("max_output_tokens", 9),
        ("tool_choice", "required"),
        ("include", ["reasoning.encrypted_content"]),
        ("store", False),
        ("store", True),  # apart from a request without the field: the same, but not the same bytes
        ("metadata", {"a": "b"}),
    ],
)
def test_a_responses_key_changes_with_every_answer_field(field: str, value: object):
    def key(payload: dict) -> bytes:
        return cache_key("http://up", "/v1/responses", b"", payload)

    assert key({**RESPONSE_REQUEST, field: value}) != key(RESPONSE_REQUEST)
    delivery = {"stream": True, "stream_options": {"include_obfuscation": False}, "caching": True}
    assert key({**RESPONSE_REQUEST, **delivery}) == key(RESPONSE_REQUEST)


def test_a_responses_request_record_in_a_fixed_order():
    payload = {
        "store": False,
        "tools": [{"type": "function", "name": "f"}],
        "max_output_tokens": 50,
        "input": [{"role": "user", "content": "hi"}],
        "reasoning": {"effort": "low"},
        "caching": True,  # ours: never recorded
        "metadata": {"x": 1},  # not a field the record keeps
        "model": "m",
        "temperature": 0.5,
    }
    record = request_record(RESPONSES, payload, "10.0.0.1", "uid-1", "kh")
    assert list(record) == [
        "input",
        "instructions",
        "model",
        "stream",
        "temperature",
        "max_output_tokens",
        "reasoning",
        "store",
        "tools",
        "ip",
        "uid",
        "key_hash",
    ]
    assert record["instructions"] is None and record["stream"] is False
    plain = request_record(
        RESPONSES, {"input": "hi", "model": "m", "stream": True}, "ip", "u", None
    )
    assert plain == {
        "input": "hi",
        "instructions": None,
        "model": "m",
        "stream": True,
        "tools": None,
        "ip": "ip",
        "uid": "u",
    }
