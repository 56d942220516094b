"""Client input never produces a 5xx: every body a JSON parser accepts (and some it does not) is
forwarded untouched or answered with a 4xx, on every route the cache and the chat log read, with
both on; the chat log keeps an answer record for every request record of an answered call.

Property tests (hypothesis) against the real server: the proxy and a recording upstream each run
in a thread of their own, so that the test itself can be synchronous, as hypothesis wants."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ProxyServer, RecordingUpstream, make_settings

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
}


class ThreadedUpstream:
    """The recording upstream on an event loop of its own thread."""

    def __init__(self) -> None:
        self.server = RecordingUpstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RecordingUpstream:
        async def answer(request: web.Request) -> web.Response:
            return web.json_response(CHAT_ANSWER)

        for route in ROUTES:
            self.server.route(route, answer)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self.server

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    log_folder = tmp_path_factory.mktemp("log")
    with ThreadedUpstream() as upstream:
        proxy = ProxyServer(
            make_settings(
                {
                    "OPENAI_BASE_URL": upstream.url,
                    "LOG_CHAT": "true",
                    "LOG_FOLDER": str(log_folder),
                    "CACHE_CHAT_COMPLETION": "true",
                    "CACHE_EMBEDDING": "true",
                    "MAX_RETRIES": "0",
                }
            )
        ).start()
        try:
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                yield client, upstream, log_folder
        finally:
            proxy.stop()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# The fields the cache and the chat log read, with values of any type.
FIELDS = [
    "model", "messages", "prompt", "input", "instructions", "stream", "caching", "tools",
    "temperature", "n", "stream_options", "previous_response_id", "store", "functions",
]  # fmt: skip
feature_bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
raw_bodies = st.sampled_from(
    [
        b"[" * 5000 + b"]" * 5000,  # deeper than the parsers go
        b'{"model": ' * 300 + b"1" + b"}" * 300,
        b'{"model": "m", "n": ' + b"9" * 5000 + b"}",  # a huge number
        b'{"model": "m", "caching": true, "n": -9223372036854775809}',  # past 64 bits
        b'{"model": "a", "model": "b", "caching": true, "caching": false}',  # duplicate keys
        b'{"model": "\\ud800", "messages": [{"content": "\\udfff"}]}',  # lone surrogates
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}]',  # cut short
        b"\xff\xfe not json",
        b"",
        b"null",
        b'"a string"',
    ]
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # any integer; lone surrogates as \ud800 escapes


def check_forwarded(client: httpx.Client, upstream: RecordingUpstream, route: str, body: bytes):
    before = len(upstream.requests)
    answer = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code < 500, (route, body[:200], answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert answer.json()["error"]["message"]
        return
    if answer.headers.get("x-cache") == "HIT":
        assert len(upstream.requests) == before
        return
    sent = upstream.requests[-1].body
    if sent != body:  # the cache takes its `caching` field out, and nothing else
        parsed = json.loads(body)
        assert isinstance(parsed, dict) and "caching" in parsed
        assert json.loads(sent) == {k: v for k, v in parsed.items() if k != "caching"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), payload=feature_bodies)
def test_any_json_object_is_forwarded_or_refused_cleanly(hostile_env, route: str, payload: dict):
    client, upstream, _ = hostile_env
    check_forwarded(client, upstream, route, dumps(payload))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=raw_bodies | json_values.map(dumps))
def test_any_body_is_forwarded_or_refused_cleanly(hostile_env, route: str, body: bytes):
    client, upstream, _ = hostile_env
    check_forwarded(client, upstream, route, body)


def test_every_logged_request_has_its_answer(hostile_env):
    """Runs after the property tests of this module: each call that was answered left a request
    record and an answer record, never one without the other."""
    client, _, log_folder = hostile_env
    client.post("/v1/chat/completions", json={"model": "m", "messages": []})  # one at least
    deadline = time.monotonic() + 5
    while True:
        records = [
            orjson.loads(line)
            for path in log_folder.rglob("*.log")
            for line in path.read_bytes().splitlines()
        ]
        asked = {r["uid"] for r in records if "complete" not in r}  # answers say if complete
        answered = {r["uid"] for r in records if "complete" in r}
        if asked <= answered or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert asked, "no request was logged"
    assert asked <= answered, f"{len(asked - answered)} request records without an answer"
