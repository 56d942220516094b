"""A fast mock of an OpenAI-style upstream, for benchmarks.

It is a bare asyncio protocol on uvloop with the httptools parser (both come with
``uvicorn[standard]``), so that it costs far less CPU per request than the proxy under test.
Request bodies are never parsed as JSON: a stream is recognised by the bytes ``"stream": true``.

Routes (any prefix before them is ignored):

- ``POST .../chat/completions``: a ``chat.completion`` object with ``usage``; with
  ``"stream": true`` in the body, an SSE stream of ``chat.completion.chunk`` events ending in
  ``data: [DONE]``.
- ``POST .../embeddings``: an embedding ``list`` object with ``usage``.
- ``GET /healthz`` and ``GET .../models``: small JSON answers.

Query parameters, passed through unchanged by a transparent proxy:

- ``events=N``: number of chunk events in a stream (default 20), ``[DONE]`` not counted.
- ``delay_ms=D``: pause before each event (default 0: the whole stream is written at once).
- ``dims=N``: length of the embedding vector (default 1536).
- ``status=S``: answer with status S and an OpenAI-style error body (to test failure paths).

Usage: ``python benchmarks/mock_upstream.py --port 9000 [--host 127.0.0.1]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
from collections import deque
from typing import cast
from urllib.parse import parse_qsl

import httptools

CREATED = 1_700_000_000
MODEL = b"gpt-3.5-turbo"
MAX_EVENTS = 100_000
MAX_DELAY_MS = 60_000
MAX_DIMS = 100_000

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests"}


def _head(status: int, content_type: bytes, length: int | None, extra: bytes = b"") -> bytes:
    reason = REASONS.get(status, b"Error" if status >= 400 else b"OK")
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n"
        b"x-request-id: req_mock\r\nopenai-processing-ms: 1\r\n%s\r\n"
    ) % (status, reason, content_type, framing, extra)


def _json_response(status: int, body: bytes) -> bytes:
    return _head(status, b"application/json", len(body)) + body


CHAT_BODY = (
    b'{"id":"chatcmpl-mock","object":"chat.completion","created":%d,"model":"%s",'
    b'"choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! How can I help you today?"},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21},'
    b'"system_fingerprint":"fp_mock"}'
) % (CREATED, MODEL)
CHAT_RESPONSE = _json_response(200, CHAT_BODY)
HEALTH_RESPONSE = _json_response(200, b'{"status":"ok"}')
MODELS_RESPONSE = _json_response(
    200, b'{"object":"list","data":[{"id":"%s","object":"model","owned_by":"mock"}]}' % MODEL
)
NOT_FOUND_RESPONSE = _json_response(
    404, b'{"error":{"message":"no such route","type":"invalid_request_error","code":null}}'
)
STREAM_HEAD = _head(200, b"text/event-stream", None, b"cache-control: no-cache\r\n")
LAST_CHUNK = b"0\r\n\r\n"


def _chunked(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(delta: bytes, finish: bytes) -> bytes:
    return (
        b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":%d,'
        b'"model":"%s","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":%s,'
        b'"logprobs":null,"finish_reason":%s}]}\n\n'
    ) % (CREATED, MODEL, delta, finish)


@functools.lru_cache(maxsize=64)
def stream_events(count: int) -> tuple[bytes, ...]:
    """HTTP chunks of a stream of ``count`` events plus ``[DONE]`` and the last chunk."""
    events = []
    for i in range(count):
        if i == 0:
            delta = b'{"role":"assistant","content":""}'
        elif i == count - 1:
            delta = b"{}"
        else:
            delta = b'{"content":" word%d"}' % i
        events.append(_chunked(_event(delta, b'"stop"' if i == count - 1 else b"null")))
    events.append(_chunked(b"data: [DONE]\n\n"))
    return (*events, LAST_CHUNK)


@functools.lru_cache(maxsize=16)
def embedding_response(dims: int) -> bytes:
    vector = b",".join(b"%.6f" % (((i * 7919) % 2000) / 1000 - 1) for i in range(dims))
    body = (
        b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[%s]}],'
        b'"model":"text-embedding-3-small","usage":{"prompt_tokens":5,"total_tokens":5}}'
    ) % vector
    return _json_response(200, body)


@functools.lru_cache(maxsize=16)
def error_response(status: int) -> bytes:
    body = b'{"error":{"message":"mock error %d","type":"mock_error","code":"mock"}}' % status
    return _json_response(status, body)


def _int_param(params: dict[str, str], name: str, default: int, upper: int) -> int:
    try:
        return max(0, min(int(params.get(name, default)), upper))
    except ValueError:
        return default


class Request:
    __slots__ = ("body", "keep_alive", "method", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.body: list[bytes] = []
        self.keep_alive = True


class MockProtocol(asyncio.Protocol):
    """One client connection. Requests are answered in order (pipelining is queued)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current = Request()
        self.pending: deque[Request] = deque()
        self.streaming: asyncio.Task[None] | None = None

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(error_response(400))
                self.transport.close()

    # httptools callbacks ----------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_body(self, body: bytes) -> None:
        self.current.body.append(body)

    def on_message_complete(self) -> None:
        request, self.current = self.current, Request()
        request.method = self.parser.get_method()
        request.keep_alive = self.parser.should_keep_alive()
        if self.streaming is None:
            self.answer(request)
        else:
            self.pending.append(request)

    # answering --------------------------------------------------------------------------------
    def answer(self, request: Request) -> None:
        transport = self.transport
        if transport is None:
            return
        url = request.url
        path, _, query = url.partition(b"?")
        params = dict(parse_qsl(query.decode("latin-1"))) if query else {}
        status = _int_param(params, "status", 200, 599)
        if status >= 300:
            transport.write(error_response(status))
        elif path.endswith(b"/chat/completions"):
            body = b"".join(request.body)
            if b'"stream": true' in body or b'"stream":true' in body:
                count = _int_param(params, "events", 20, MAX_EVENTS)
                delay = _int_param(params, "delay_ms", 0, MAX_DELAY_MS) / 1000
                chunks = stream_events(count)
                if delay <= 0:
                    transport.write(STREAM_HEAD + b"".join(chunks))
                else:
                    self.streaming = asyncio.ensure_future(self.paced(request, chunks, delay))
                    return
            else:
                transport.write(CHAT_RESPONSE)
        elif path.endswith(b"/embeddings"):
            transport.write(embedding_response(_int_param(params, "dims", 1536, MAX_DIMS)))
        elif path == b"/healthz":
            transport.write(HEALTH_RESPONSE)
        elif path.endswith(b"/models"):
            transport.write(MODELS_RESPONSE)
        else:
            transport.write(NOT_FOUND_RESPONSE)
        self.finish(request)

    async def paced(self, request: Request, chunks: tuple[bytes, ...], delay: float) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(STREAM_HEAD)
        # Every event is preceded by the delay; [DONE] and the last chunk follow the last event.
        for chunk in chunks[:-2]:
            await asyncio.sleep(delay)
            if transport.is_closing():
                return
            transport.write(chunk)
        if transport.is_closing():
            return
        transport.write(chunks[-2] + chunks[-1])
        self.streaming = None
        self.finish(request)

    def finish(self, request: Request) -> None:
        if not request.keep_alive:
            if self.transport is not None:
                self.transport.close()
            return
        while self.pending and self.streaming is None:
            self.answer(self.pending.popleft())


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    print(f"mock upstream listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
