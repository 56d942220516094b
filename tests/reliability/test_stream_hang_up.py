"""A client that hangs up in the middle of a stream is noticed at once: the upstream request is
aborted within about one event, short streams and streams not yet begun included. The chat log's
answer record says it is not complete, and why: the client left, the upstream broke off or
timed out, or a shutdown cut it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest
from aiohttp import web


class PacedStream:
    """An upstream stream of ``events`` events ``pause`` seconds apart, after ``delay``; notes
    how many it wrote and when its request was aborted."""

    def __init__(self, events: int, pause: float, delay: float = 0.0) -> None:
        self.events, self.pause, self.delay = events, pause, delay
        self.written = 0
        self.aborted_at: float | None = None

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.sleep(self.delay)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(self.events):
                await response.write(b'data: {"n": %d}\n\n' % i)
                self.written += 1
                await asyncio.sleep(self.pause)
            await response.write(b"data: [DONE]\n\n")
            return response
        except (asyncio.CancelledError, ConnectionError):
            self.aborted_at = time.monotonic()
            raise


async def open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 15\r\n\r\n{"stream":true}'
    )
    await writer.drain()
    return reader, writer


def answer_record(root: Path, within: float = 5.0) -> dict:
    """The answer record of the one call logged under ``root`` (it follows the request's)."""
    path = root / "openai" / "chat" / "chat.log"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        lines = path.read_bytes().splitlines() if path.exists() else []
        if len(lines) >= 2:
            request, answer = map(orjson.loads, lines)
            assert answer["uid"] == request["uid"] and "assistant" in answer
            return answer
        time.sleep(0.02)
    raise AssertionError(f"no answer record in {path} within {within} s")


async def wait_for_abort(stream: PacedStream, within: float) -> float:
    deadline = time.monotonic() + within
    while stream.aborted_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert stream.aborted_at is not None, "the upstream request was never aborted"
    return stream.aborted_at


# The proxy's own server protocol tells of a hang-up by a callback; under uvicorn's (``uvicorn
# openai_forward.app:app``) a task waits on ``receive()``. Both are tested.
SERVERS = pytest.mark.parametrize("http", [None, "httptools"], ids=["aifd", "plain-uvicorn"])


@SERVERS
@pytest.mark.parametrize("events", [3, 40], ids=["short", "long"])
async def test_hang_up_mid_stream_aborts_the_upstream_within_an_event(
    proxy_factory, upstream, events: int, tmp_path: Path, http: str | None
):
    stream = PacedStream(events=events, pause=0.1)
    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(
        http=http, OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=tmp_path
    )
    reader, writer = await open_stream(proxy.port)
    await asyncio.wait_for(reader.readuntil(b"data: "), 5)  # the first event is on its way
    left_at = time.monotonic()
    writer.transport.abort()
    aborted_at = await wait_for_abort(stream, 2)
    assert aborted_at - left_at < 0.5
    assert stream.written <= 3  # the first, and at most the one or two in flight
    answer = answer_record(tmp_path)
    assert answer["status"] == 200
    assert answer["complete"] is False and answer["reason"] == "client left"


@SERVERS
async def test_hang_up_before_the_first_event_aborts_the_upstream(
    proxy_factory, upstream, tmp_path: Path, http: str | None
):
    stream = PacedStream(events=5, pause=0.1, delay=1.0)
    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(
        http=http, OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=tmp_path
    )
    _, writer = await open_stream(proxy.port)
    await asyncio.sleep(0.2)  # the proxy waits for the upstream's head
    left_at = time.monotonic()
    writer.transport.abort()
    aborted_at = await wait_for_abort(stream, 2)
    assert aborted_at - left_at < 0.5
    assert stream.written == 0
    answer = answer_record(tmp_path)  # no answer came: the client left while it was awaited
    assert answer["status"] is None
    assert answer["complete"] is False and answer["reason"] == "client left"


async def read_cut_stream(port: int) -> bytes:
    """A stream the proxy cuts: what arrived before the cut."""
    received = b""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/chat/completions", json={"stream": True}) as r:
                async for chunk in r.aiter_raw():
                    received += chunk
    return received


async def test_an_upstream_that_breaks_off_is_the_reason(proxy_factory, upstream, tmp_path: Path):
    async def breaking(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 0}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # a reset mid-stream
        return response

    upstream.route("/v1/chat/completions", breaking)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=tmp_path)
    received = await asyncio.wait_for(read_cut_stream(proxy.port), 10)
    assert received.startswith(b'data: {"n": 0}')
    answer = answer_record(tmp_path)
    assert answer["status"] == 200
    assert answer["complete"] is False and answer["reason"] == "upstream broke off"


async def test_an_upstream_silent_past_the_read_timeout_is_the_reason(
    proxy_factory, upstream, tmp_path: Path
):
    stream = PacedStream(events=3, pause=5.0)  # silent after its first event
    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, READ_TIMEOUT=0.3, LOG_CHAT="true", LOG_FOLDER=tmp_path
    )
    started = time.monotonic()
    received = await asyncio.wait_for(read_cut_stream(proxy.port), 10)
    assert received.startswith(b'data: {"n": 0}') and time.monotonic() - started < 3
    answer = answer_record(tmp_path)
    assert answer["status"] == 200
    assert answer["complete"] is False and answer["reason"] == "upstream timed out"


async def test_a_stream_cut_by_shutdown_says_so(proxy_factory, upstream, tmp_path: Path):
    stream = PacedStream(events=1000, pause=0.05)
    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, SHUTDOWN_TIMEOUT=0.3, LOG_CHAT="true", LOG_FOLDER=tmp_path
    )
    reader, writer = await open_stream(proxy.port)
    await asyncio.wait_for(reader.readuntil(b"data: "), 5)
    await asyncio.wait_for(asyncio.to_thread(proxy.stop), 10)  # the log is closed after the cut
    writer.close()
    answer = answer_record(tmp_path, within=0.1)  # written before the proxy stopped
    assert answer["status"] == 200
    assert answer["complete"] is False and answer["reason"] == "shutdown"
