"""The HTTP/1.1 client toward one upstream origin.

Keep-alive connections are pooled per origin; each is an asyncio protocol whose responses are
parsed by httptools, the parser uvicorn uses on the other side. A request goes out in one write
(head and body), a response's body is handed on as the socket delivers it, and nothing is done that
a reverse proxy does not need: no redirects, no cookies, no decompression, no automatic headers
beyond ``Host`` and the body's length.

It speaks plain TCP and TLS (with SNI, verified against the system's trust store), directly or
through an HTTP proxy: absolute-form requests for ``http://`` origins, a ``CONNECT`` tunnel for
``https://`` ones. Timeouts: one for connecting (TCP, proxy tunnel and TLS handshake together) and
one for silence (before the response head, and between two reads of the body), as in SPEC §2.

Failures are :class:`ClientError` subclasses carrying a short reason that never holds anything
from the request (so no key).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

# Streamed body bytes held for a slow reader before the upstream socket stops being read.
HIGH_WATER = 256 * 1024
# An idle connection older than this is not reused (many servers drop theirs after 5-75 s).
IDLE_EXPIRY = 15.0
MAX_IDLE = 256  # idle connections kept per origin
FRESH = 1.0  # a streamed upload only reuses a connection idle for less than this
COPY_LIMIT = 64 * 1024  # request bodies up to this size are joined to the head: one write
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ClientError(Exception):
    """A failed exchange; ``str()`` is a short reason safe to show the client."""


class ConnectError(ClientError):
    """No connection could be made (refused, unreachable, DNS, TLS, proxy refused)."""


class ConnectTimeout(ClientError):
    pass


class ReadTimeout(ClientError):
    """The upstream stayed silent for the read timeout."""


class Disconnected(ClientError):
    """The upstream closed the connection before the response was complete."""

    def __init__(self, reason: str, *, stale: bool = False) -> None:
        super().__init__(reason)
        # A reused connection that died before any byte of the response came back: most likely
        # closed by the server while idle, so the request can be sent again on a new one.
        self.stale = stale


class ProtocolError(ClientError):
    """The upstream's bytes were not a valid HTTP/1.1 response."""


class Origin:
    """Where connections go and how requests are written for one base URL (and proxy)."""

    def __init__(self, base_url: str, proxy: str | None = None) -> None:
        split = urlsplit(base_url)
        if split.scheme not in _DEFAULT_PORTS or not split.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = split.scheme
        self.host = split.hostname
        self.port = split.port or _DEFAULT_PORTS[split.scheme]
        self.base_path = split.path.rstrip("/").encode("latin-1")
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = f"{shown}:{self.port}".encode("idna" if not shown.isascii() else "ascii")
        if self.port != _DEFAULT_PORTS[self.scheme]:
            shown += f":{self.port}"
        self.host_header = shown.encode("idna" if not shown.isascii() else "ascii")
        self.tls = split.scheme == "https"
        # Through a proxy: connect there; http origins get absolute-form request targets,
        # https origins a CONNECT tunnel.
        self.proxy_host: str | None = None
        self.proxy_port = 0
        self.proxy_tls = False
        self.proxy_auth: bytes | None = None
        self.target_prefix = self.base_path
        if proxy:
            p = urlsplit(proxy)
            if p.scheme not in _DEFAULT_PORTS or not p.hostname:
                raise ValueError("PROXY is not an http(s) URL")
            self.proxy_host = p.hostname
            self.proxy_port = p.port or _DEFAULT_PORTS[p.scheme]
            self.proxy_tls = p.scheme == "https"
            if p.username is not None:
                userinfo = f"{unquote(p.username)}:{unquote(p.password or '')}"
                self.proxy_auth = b"Basic " + base64.b64encode(userinfo.encode())
            if not self.tls:
                origin = f"{self.scheme}://{shown}".encode("latin-1")
                self.target_prefix = origin + self.base_path

    @property
    def tunnel(self) -> bool:
        return self.proxy_host is not None and self.tls

    def connect_head(self) -> bytes:
        head = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (self.authority, self.authority)
        if self.proxy_auth is not None:
            head += b"Proxy-Authorization: " + self.proxy_auth + b"\r\n"
        return head + b"\r\n"


class Response:
    """One exchange: the head once it has come, then the body as it arrives.

    Created when the request is written; the caller receives it when its head is complete and
    must end with :meth:`release` (which closes the connection if the body was not read to its
    end; a complete exchange has already put its connection back in the pool)."""

    __slots__ = (
        "_collect",
        "_conn",
        "_done",
        "_error",
        "_head",
        "_loop",
        "_queue",
        "_queued",
        "_waiter",
        "content_length",
        "raw_headers",
        "status",
    )

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self._loop = conn.loop
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []  # names lower-cased
        self.content_length: int | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._collect = False  # read() is gathering the whole body: wake it only at the end
        self._done = False
        self._error: ClientError | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.raw_headers:
            if key == name:
                return value
        return None

    def at_eof(self) -> bool:
        """Whether the whole body has arrived and been handed on."""
        return self._done and not self._queue

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """The body as it arrives: all that has come since the last call, as one chunk (a read
        may hold several events). An iterator, not a generator: leaving the loop early leaves
        nothing to finalize."""
        queue = self._queue
        while not queue:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = queue.popleft() if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self._queued = 0
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume_reading()
        return chunk

    async def read(self) -> bytes:
        """The whole body."""
        if not self._done and self._error is None:
            self._collect = True
            conn = self._conn
            if conn is not None and conn.reading_paused:
                conn.resume_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        queue = self._queue
        body = queue[0] if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self._queued = 0
        return body

    def release(self) -> None:
        """End the exchange: an unfinished one closes its connection."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()
        self._queue.clear()

    # called by the connection -------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: ClientError) -> None:
        if self._done or self._error is not None:
            return
        self._error = error
        self._conn = None
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a cancelled sender must not log it
        self._wake()


class Connection(asyncio.Protocol):
    """One upstream connection; one exchange at a time (no pipelining)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reused = False  # has served an exchange before the current one
        self.idle_since = 0.0
        self.reading_paused = False
        self.uploading = False  # a streamed request body is still being written
        self.reusable = True
        self._head_only = False  # HEAD: the response has no body whatever its headers say
        self._to_eof = False  # the body ends when the connection does
        self._interim = False  # a 1xx head is being parsed and will be dropped
        self._got_bytes = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._tunnel: asyncio.Future[bytes] | None = None
        self._tunnel_buffer = b""

    # asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel_data(data)
            return
        response = self.response
        if response is None:  # bytes while idle: nothing may come then
            self.abort()
            return
        self._got_bytes = True
        self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError:
            self._fail(ProtocolError("invalid HTTP response"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.forget(self)
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(ConnectError("proxy closed the connection"))
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        response, self.response = self.response, None
        if response is None or response._done:
            return
        if self._to_eof and response.status and exc is None:
            self._complete(response, keep=False)  # a clean close ends such a body
            return
        if response.status:
            response._fail(Disconnected("response body broken off"))
        else:
            response._fail(
                Disconnected("server disconnected", stale=self.reused and not self._got_bytes)
            )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.response is None:  # a second response in the read that completed ours
            self._fail(ProtocolError("data after the response"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.raw_headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # an interim 1xx head: dropped, the final one follows
            self._interim = True
            response.raw_headers = []
            return
        response.status = status
        chunked = False
        length = None
        for name, value in response.raw_headers:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().find(b"chunked") >= 0
        if not chunked:
            response.content_length = length
        self._to_eof = (
            not chunked and length is None and status not in (204, 304) and not self._head_only
        )
        response._head.set_result(None)
        if self._head_only:  # no body follows; the connection cannot be reused safely
            response.content_length = None
            self._complete(response, keep=False)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is None:
            return
        response._queue.append(body)
        response._queued += len(body)
        if response._collect:
            return
        response._wake()
        if response._queued > HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self.response
        if response is not None:
            self._complete(response, keep=self.parser.should_keep_alive())

    # exchange ------------------------------------------------------------------------------------
    def start(self, head_only: bool) -> Response:
        """A new exchange; the caller writes the request."""
        response = self.response = Response(self)
        self._head_only = head_only
        self._to_eof = False
        self._got_bytes = False
        return response

    def arm(self, timeout: float) -> None:
        """Start the silence clock (after the request has been written). The connection keeps
        one timer while it is busy, re-armed from the last read when it fires: no timer is
        made or cancelled per exchange."""
        self._last_read = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self._last_read + timeout, self._check_silence, timeout)

    def _check_silence(self, timeout: float) -> None:
        self._timer = None
        if self.response is None or self.closed:
            return  # idle: the next exchange arms a new timer
        now = self.loop.time()
        if self.reading_paused:  # a slow reader is not upstream silence
            self._timer = self.loop.call_at(now + timeout, self._check_silence, timeout)
            return
        due = self._last_read + timeout
        if due > now:
            self._timer = self.loop.call_at(due, self._check_silence, timeout)
            return
        self._fail(ReadTimeout("timed out"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _complete(self, response: Response, keep: bool) -> None:
        self.response = None
        response._done = True
        response._wake()
        response._conn = None
        if self.reading_paused:
            self.reading_paused = False
            if not self.closed:
                self.transport.resume_reading()
        if keep and self.reusable and not self.uploading and not self.closed:
            self.reused = True
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, error: ClientError) -> None:
        response, self.response = self.response, None
        if response is not None:
            response._fail(error)
        self.abort()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self._last_read = self.loop.time()
            if not self.closed:
                self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait while the upstream reads slower than we write (at most the read timeout)."""
        if not self._write_paused or self.closed:
            return
        self._write_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(self.pool.read_timeout):
                await self._write_waiter
        except TimeoutError:
            raise ReadTimeout("timed out") from None
        finally:
            self._write_waiter = None

    def abort(self) -> None:
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.abort()

    # CONNECT tunnel ------------------------------------------------------------------------------
    async def open_tunnel(self, head: bytes) -> None:
        self._tunnel = self.loop.create_future()
        self.transport.write(head)
        try:
            status_line = await self._tunnel
        finally:
            self._tunnel = None
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectError("proxy sent an invalid answer")
        if not 200 <= int(parts[1]) < 300:
            raise ConnectError(f"proxy refused the tunnel ({int(parts[1])})")

    def _tunnel_data(self, data: bytes) -> None:
        tunnel = self._tunnel
        assert tunnel is not None
        if tunnel.done():
            return
        buffer = self._tunnel_buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > 16384:
                tunnel.set_exception(ConnectError("proxy sent an invalid answer"))
            self._tunnel_buffer = buffer
            return
        self._tunnel_buffer = b""
        status_line = buffer.split(b"\r\n", 1)[0]
        if end + 4 != len(buffer) and status_line[9:10] == b"2":
            tunnel.set_exception(ConnectError("proxy sent data before the tunnel was open"))
            return
        tunnel.set_result(status_line)  # a refusal may come with a body: the status tells


class Pool:
    """Connections to one origin: idle ones reused last-in first-out."""

    def __init__(self, origin: Origin, connect_timeout: float, read_timeout: float) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._closed = False
        self._ssl: ssl.SSLContext | None = None
        self._proxy_ssl: ssl.SSLContext | None = None
        if origin.tls or origin.proxy_tls:
            context = ssl.create_default_context()  # the system's trust store; SSL_CERT_FILE works
            self._ssl = context if origin.tls else None
            self._proxy_ssl = context if origin.proxy_tls else None

    async def request(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
    ) -> Response:
        """Send one request and return its response once the head has come."""
        whole = body if isinstance(body, bytes) else None
        # A streamed body cannot be sent again, so it never risks a connection that the server
        # may be closing for idleness (the retry of a stale connection needs the body again).
        conn = self._take_idle(IDLE_EXPIRY if whole is not None else FRESH)
        if conn is None:
            conn = await self._connect()
        origin = self.origin
        parts = [
            method.encode("latin-1"),
            b" ",
            origin.target_prefix,
            target,
            b" HTTP/1.1\r\nHost: ",
            origin.host_header,
            b"\r\n",
        ]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if origin.proxy_auth is not None and not origin.tls:
            parts += (b"Proxy-Authorization: ", origin.proxy_auth, b"\r\n")
        response = conn.start(method == "HEAD")
        if whole is None:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
            conn.transport.write(b"".join(parts))
        else:
            if whole or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                parts.append(b"Content-Length: %d\r\n" % len(whole))
            parts.append(b"\r\n")
            if len(whole) < COPY_LIMIT:  # one write, one segment on the wire
                parts.append(whole)
                conn.transport.write(b"".join(parts))
            else:  # a large body is not copied
                conn.transport.writelines((b"".join(parts), whole))
        try:
            if not isinstance(body, bytes):
                await self._upload(conn, response, body)
            conn.arm(self.read_timeout)
            await response._head
        except BaseException:
            response.release()
            raise
        return response

    async def _upload(
        self, conn: Connection, response: Response, body: AsyncIterator[bytes]
    ) -> None:
        """Write a streamed body in chunked encoding; stop early if the upstream has answered
        (or failed) meanwhile, and then never reuse the connection."""
        writelines = conn.transport.writelines
        conn.uploading = True
        try:
            async for chunk in body:
                if response._head.done() or conn.closed:
                    conn.reusable = False
                    return
                if chunk:
                    writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                    await conn.drain()
            if not conn.closed:
                conn.transport.write(b"0\r\n\r\n")
        finally:
            conn.uploading = False

    def _take_idle(self, max_idle: float) -> Connection | None:
        idle = self._idle
        if not idle:
            return None
        expired = self.loop.time() - IDLE_EXPIRY
        if idle[0].idle_since < expired:  # the least recently used ones are closed as they expire
            for conn in idle:
                if conn.idle_since < expired:
                    conn.abort()
            idle[:] = [conn for conn in idle if not conn.closed]
        expired = self.loop.time() - max_idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing():
                continue
            if conn.idle_since < expired:
                conn.abort()
                continue
            return conn
        return None

    async def _connect(self) -> Connection:
        origin = self.origin
        tunnel = origin.tunnel
        host, port = (
            (origin.proxy_host, origin.proxy_port)
            if origin.proxy_host is not None
            else (origin.host, origin.port)
        )
        context = self._proxy_ssl if origin.proxy_host is not None else self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
                try:
                    if tunnel:
                        assert self._ssl is not None
                        await conn.open_tunnel(origin.connect_head())
                        conn.transport = await self.loop.start_tls(
                            transport, conn, self._ssl, server_hostname=origin.host
                        )
                except BaseException:
                    transport.abort()
                    raise
        except TimeoutError:
            raise ConnectTimeout("timed out while connecting") from None
        except ClientError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(f"TLS certificate not trusted ({exc.verify_message})") from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS failed ({exc.reason or 'handshake'})") from None
        except socket.gaierror:
            raise ConnectError("cannot connect (name or service not known)") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConnectError(f"cannot connect ({reason})") from None
        self._all.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        # The idle list is cleaned lazily by _take_idle (closed connections are skipped).

    def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
