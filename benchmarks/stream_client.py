"""A light load generator for SSE streams (chat completions with ``"stream": true``).

K connections each run streams back to back over HTTP/1.1 keep-alive until a time limit or a
total count is reached, whichever comes first. It is a bare asyncio protocol with the httptools
response parser, so that the client costs little CPU next to the proxy under test.

Every stream is checked: status 2xx, the body ends with ``data: [DONE]``, and (unless
``--any-event-count``) exactly ``--events`` events came before it. The result is one JSON object
on stdout (``streams``, ``events``, ``errors``, ``streams_per_s``, durations, first error seen).

Usage::

    python benchmarks/stream_client.py --url http://127.0.0.1:8000/v1/chat/completions \
        --concurrency 64 --duration 5 --events 20 --delay-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

DONE = b"data: [DONE]"
MAX_BODY = 16 * 1024 * 1024


def chat_body(content: str, *, stream: bool, caching: bool | None = None) -> bytes:
    """A small chat completion request body (key order fixed, no JSON library needed)."""
    text = json.dumps(content)
    extra = "" if caching is None else f', "caching": {str(caching).lower()}'
    return (
        f'{{"model": "gpt-3.5-turbo", "messages": [{{"role": "user", "content": {text}}}], '
        f'"stream": {str(stream).lower()}{extra}}}'
    ).encode()


class StreamError(Exception):
    pass


class _Response:
    """State of one response being parsed."""

    __slots__ = ("body", "done", "framed", "parser", "size", "status")

    def __init__(self, protocol: ClientProtocol) -> None:
        self.parser = httptools.HttpResponseParser(protocol)
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0
        self.framed = False  # Content-Length or Transfer-Encoding seen
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None or response.done.done():
            return
        if response.status and not response.framed and exc is None:
            response.done.set_result(None)  # a body delimited by the end of the connection
        else:
            response.done.set_exception(StreamError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            if not response.done.done():
                response.done.set_exception(StreamError(f"bad HTTP response: {exc}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            assert self.response is not None
            self.response.framed = True

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.status = self.response.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response.size += len(body)
        if response.size > MAX_BODY:
            if not response.done.done():
                response.done.set_exception(StreamError("response body too large"))
            return
        response.body.append(body)

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if not response.parser.should_keep_alive():
            self.closed = True
        if not response.done.done():
            response.done.set_result(None)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        response = self.response = _Response(self)
        self.transport.write(request)
        try:
            await response.done
        finally:
            self.response = None
        return response.status, b"".join(response.body)


@dataclass
class Result:
    streams: int = 0
    events: int = 0
    errors: int = 0
    first_error: str | None = None
    durations: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message


def check_stream(status: int, body: bytes, events: int | None) -> int:
    """Validate one stream; return its number of data events before ``[DONE]``."""
    if not 200 <= status < 300:
        raise StreamError(f"status {status}: {body[:200]!r}")
    if not body.rstrip().endswith(DONE):
        raise StreamError(f"stream does not end with data: [DONE]: ...{body[-120:]!r}")
    # A well-formed stream has exactly one "data:" field at the start of each event.
    count = body.count(b"\ndata:") + (1 if body.startswith(b"data:") else 0) - 1
    if events is not None and count != events:
        raise StreamError(f"expected {events} events before [DONE], got {count}")
    return count


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


async def run_load(
    url: str,
    *,
    concurrency: int,
    duration: float,
    max_streams: int,
    events: int | None,
    make_body: Callable[[int], bytes],
    stream_timeout: float = 30.0,
    bearer: str = "sk-bench",
) -> Result:
    """Run streams on ``concurrency`` connections until ``duration`` s or ``max_streams``."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer {bearer}\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    result = Result()
    deadline = loop.time() + duration
    issued = 0

    async def worker() -> None:
        nonlocal issued
        protocol: ClientProtocol | None = None
        while loop.time() < deadline and issued < max_streams:
            issued += 1
            body = make_body(issued)
            request = head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(stream_timeout):
                    if protocol is None or protocol.closed:
                        _, protocol = await loop.create_connection(ClientProtocol, host, port)
                    status, payload = await protocol.exchange(request)
                result.events += check_stream(status, payload, events)
            except (OSError, TimeoutError, StreamError) as exc:
                result.fail(f"{type(exc).__name__}: {exc}")
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.close()
                protocol = None
                continue
            result.streams += 1
            result.durations.append(time.perf_counter() - started)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(result: Result, elapsed: float) -> dict[str, object]:
    return {
        "streams": result.streams,
        "events": result.events,
        "errors": result.errors,
        "first_error": result.first_error,
        "elapsed_s": round(elapsed, 4),
        "streams_per_s": round(result.streams / elapsed, 2) if elapsed > 0 else 0.0,
        "duration_p50_ms": _ms(percentile(result.durations, 50)),
        "duration_p99_ms": _ms(percentile(result.durations, 99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Bounded SSE stream load generator.")
    parser.add_argument("--url", required=True, help="full URL, query string included")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (upper bound)")
    parser.add_argument("--max-streams", type=int, default=1_000_000, help="count bound")
    parser.add_argument("--events", type=int, default=20, help="events expected per stream")
    parser.add_argument(
        "--any-event-count", action="store_true", help="only check the [DONE] ending"
    )
    parser.add_argument(
        "--body",
        choices=["fixed", "vary", "cached"],
        default="fixed",
        help="fixed body; a different message per stream; fixed body with caching: true",
    )
    parser.add_argument("--tag", default="", help="text mixed into varying bodies")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-stream timeout (s)")
    parser.add_argument("--bearer", default="sk-bench", help="the Authorization bearer token")
    args = parser.parse_args()

    if args.body == "vary":

        def make_body(n: int) -> bytes:
            return chat_body(f"stream {args.tag} {n}", stream=True, caching=True)

    else:
        fixed = chat_body(
            "Say hello.", stream=True, caching=True if args.body == "cached" else None
        )

        def make_body(n: int) -> bytes:
            return fixed

    async def go() -> dict[str, object]:
        started = time.perf_counter()
        result = await run_load(
            args.url,
            concurrency=args.concurrency,
            duration=args.duration,
            max_streams=args.max_streams,
            events=None if args.any_event_count else args.events,
            make_body=make_body,
            stream_timeout=args.timeout,
            bearer=args.bearer,
        )
        return summarize(result, time.perf_counter() - started)

    try:
        import uvloop
    except ImportError:
        summary = asyncio.run(go())
    else:
        summary = uvloop.run(go())
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0 if summary["errors"] == 0 and summary["streams"] else 1


if __name__ == "__main__":
    sys.exit(main())
