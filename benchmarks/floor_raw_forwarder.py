"""The floor forwarder with aiohttp replaced by a bare asyncio + httptools client: for comparison
only, to show what the upstream client costs (``--targets floor,floor-raw`` in ``run.py``).

Same CLI, environment and behaviour as ``floor_forwarder.py``: read the body, POST it to
``OPENAI_BASE_URL`` + path (+ query), relay status, content type and body as they arrive. The
client keeps idle connections per host:port, writes head and body in one ``transport.write``,
parses the response with ``httptools.HttpResponseParser`` (Content-Length, chunked, 1xx), and
applies back-pressure on long bodies (pause/resume reading).

Not a product: plain http:// only (no TLS), no proxies, timeouts, retries, redirects or
decompression, and a client that hangs up mid-stream leaks its upstream connection.

    OPENAI_BASE_URL=http://127.0.0.1:9000 python benchmarks/floor_raw_forwarder.py --port 9101
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools

BASE = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000").rstrip("/")
SMALL_BODY = 256 * 1024  # whole-body future at or below this Content-Length
HIGH_WATER = 1 << 20  # pause reading when this much streamed body is buffered
state: dict[str, Any] = {}


class UpstreamClosed(ConnectionError):
    pass


class Exchange:
    """The state of one request/response; outlives the connection's return to the pool."""

    __slots__ = ("body", "conn", "done", "error", "head", "parts", "queue", "queued", "waiter")

    def __init__(self, conn: Conn) -> None:
        self.conn: Conn | None = conn
        self.head: asyncio.Future = asyncio.get_running_loop().create_future()
        self.body: asyncio.Future | None = None  # whole-body future for small bodies
        self.parts: list[bytes] = []
        self.queue: deque = deque()
        self.queued = 0
        self.waiter: asyncio.Future | None = None
        self.done = False
        self.error: BaseException | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        for fut in (self.head, self.body):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self.wake()

    async def next_chunk(self) -> bytes | None:
        while not self.queue:
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        item = self.queue.popleft()
        self.queued -= len(item)
        conn = self.conn
        if conn is not None and conn.paused and self.queued <= HIGH_WATER // 4:
            conn.resume()
            if self.done:
                self.conn = None  # the connection went back to the pool
        return item


class Response:
    __slots__ = ("_ex", "headers", "status")

    def __init__(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._ex = ex
        self.status = status
        self.headers = headers

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    async def chunks(self):
        """Yield body chunks as they arrive (one chunk for a small Content-Length body)."""
        ex = self._ex
        if ex.body is not None:
            body = await ex.body
            if body:
                yield body
            return
        while True:
            item = await ex.next_chunk()
            if item is None:
                return
            yield item


class Conn(asyncio.Protocol):
    """One upstream HTTP/1.1 connection; one exchange at a time, no pipelining."""

    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.release_on_resume = False
        self.ex: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []

    # asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.ex is None:  # bytes while idle: protocol violation, drop the connection
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamClosed("unexpected upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        ex = self.ex
        if ex is not None and not ex.done:
            with contextlib.suppress(httptools.HttpParserError):  # a body ending at EOF ends here
                self.parser.feed_data(b"")
            if not ex.done:
                ex.fail(exc or UpstreamClosed("upstream closed the connection"))
        self.ex = None

    # request ----------------------------------------------------------------------------------
    def send(self, data: bytes) -> asyncio.Future:
        ex = self.ex = Exchange(self)
        self.headers = []
        self.transport.write(data)
        return ex.head

    def resume(self) -> None:
        self.paused = False
        if not self.closed:
            self.transport.resume_reading()
            if self.release_on_resume:
                self.release_on_resume = False
                self.pool.release(self)

    def _fail(self, exc: BaseException) -> None:
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.conn = None
            ex.fail(exc)
        self.transport.close()

    # httptools callbacks -----------------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        pass  # reason phrase; the code comes from get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 1xx interim response: discard, the real head follows
            self.headers = []
            return
        ex = self.ex
        length = None
        chunked = False
        for k, v in self.headers:
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        if length is not None and not chunked and length <= SMALL_BODY:
            ex.body = asyncio.get_running_loop().create_future()
        if not ex.head.done():
            ex.head.set_result(Response(ex, status, self.headers))

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex.body is not None:
            ex.parts.append(body)
            return
        ex.queue.append(body)
        ex.queued += len(body)
        ex.wake()
        if ex.queued > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        ex, self.ex = self.ex, None
        ex.done = True
        if ex.body is not None:
            if not ex.body.done():
                ex.body.set_result(b"".join(ex.parts))
            ex.parts = []
        else:
            ex.wake()
        if self.parser.should_keep_alive() and not self.closed:
            if self.paused:
                self.release_on_resume = True  # the reader still drains this exchange
            else:
                ex.conn = None
                self.pool.release(self)
        else:
            ex.conn = None
            self.transport.close()


class Pool:
    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[Conn]] = {}

    async def acquire(self, host: str, port: int) -> Conn:
        key = (host, port)
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Conn(self, key), host, port)
        return conn

    def release(self, conn: Conn) -> None:
        if not conn.closed:
            self.idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: Conn) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()


_split = urlsplit(BASE)
UP_HOST = _split.hostname or "127.0.0.1"
UP_PORT = _split.port or 80
UP_PREFIX = _split.path
HOST_HEADER = (UP_HOST if UP_PORT == 80 else f"{UP_HOST}:{UP_PORT}").encode()
if _split.scheme != "http":
    raise SystemExit("raw_floor supports plain http:// upstreams only")


async def request(method: str, target: bytes, body: bytes) -> Response:
    head = (
        b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nAccept: */*\r\n\r\n"
    ) % (method.encode(), target, HOST_HEADER, len(body))
    conn = await state["pool"].acquire(UP_HOST, UP_PORT)
    return await conn.send(head + body)


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["pool"] = Pool()
                await send({"type": "lifespan.startup.complete"})
            else:
                state["pool"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = (await receive())["body"]
    target = (UP_PREFIX + scope["path"]).encode() + (
        b"?" + scope["query_string"] if scope["query_string"] else b""
    )
    r = await request(scope["method"], target, body)
    ctype = r.header(b"content-type", b"application/json")
    await send(
        {
            "type": "http.response.start",
            "status": r.status,
            "headers": [(b"content-type", ctype)],
        }
    )
    async for chunk in r.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    from floor_forwarder import main

    main(app, __doc__)
