"""A client that hangs up in the middle of a stream is noticed at once: the upstream request is
aborted within about one event, short streams and streams not yet begun included."""

from __future__ import annotations

import asyncio
import time

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


async def wait_for_abort(stream: PacedStream, within: float) -> float:
    deadline = time.monotonic() + within
    while stream.aborted_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert stream.aborted_at is not None, "the upstream request was never aborted"
    return stream.aborted_at


@pytest.mark.parametrize("events", [3, 40], ids=["short", "long"])
async def test_hang_up_mid_stream_aborts_the_upstream_within_an_event(
    proxy_factory, upstream, events: int
):
    stream = PacedStream(events=events, pause=0.1)
    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true")
    reader, writer = await open_stream(proxy.port)
    await asyncio.wait_for(reader.readuntil(b"data: "), 5)  # the first event is on its way
    left_at = time.monotonic()
    writer.transport.abort()
    aborted_at = await wait_for_abort(stream, 2)
    assert aborted_at - left_at < 0.5
    assert stream.written <= 3  # the first, and at most the one or two in flight


async def test_hang_up_before_the_first_event_aborts_the_upstream(proxy_factory, upstream):
    stream = PacedStream(events=5, pause=0.1, delay=1.0)
    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    _, writer = await open_stream(proxy.port)
    await asyncio.sleep(0.2)  # the proxy waits for the upstream's head
    left_at = time.monotonic()
    writer.transport.abort()
    aborted_at = await wait_for_abort(stream, 2)
    assert aborted_at - left_at < 0.5
    assert stream.written == 0
