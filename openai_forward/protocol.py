"""The server's HTTP protocol: uvicorn's httptools protocol, bounded against slow and idle clients.

uvicorn closes idle keep-alive connections, but a client may open a connection and send nothing,
drip its request head a byte at a time, stall in the middle of its body, or send an endless head;
and every open connection holds a file descriptor. Here:

- a request head must be complete within ``head_timeout`` seconds of the connection opening (or
  of the request's first byte on a kept-alive connection), else the client gets 408 and is closed;
- a request body that stops arriving for ``body_timeout`` seconds, while the proxy is ready to
  read it, is cut (the request sees the client as gone);
- a head over ``max_head_bytes`` or ``max_headers`` header lines gets 431 and is closed;
- beyond ``max_connections`` open connections, a new one is answered 503 and closed at once, with
  a warning in the log, instead of running the process out of descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from openai_forward.types import CUT, HANG_UP

if TYPE_CHECKING:
    from openai_forward.settings import Settings

logger = logging.getLogger("openai_forward")

WARN_EVERY = 60.0  # seconds between two warnings about refused connections
# Descriptors kept for what is not a client connection: upstream connections (two sessions per
# target), log and cache files, the listening socket, Redis.
_RESERVED_FDS = 64


def descriptor_limit() -> int:
    """This process's soft limit on open file descriptors (``ulimit -n``)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class ClientBounds:
    head_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000
    max_headers: int = 100
    max_head_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientBounds:
        return cls(
            head_timeout=settings.client_head_timeout,
            body_timeout=settings.client_body_timeout,
            max_connections=settings.max_client_connections or default_max_connections(settings),
        )


def default_max_connections(settings: Settings) -> int:
    """What fits below the descriptor limit next to the upstream connections."""
    upstream = 2 * settings.upstream_max_connections * len(settings.targets)
    return max(16, descriptor_limit() - _RESERVED_FDS - upstream)


def _response(status: bytes, message: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message
    )


_TIMEOUT = _response(
    b"408 Request Timeout",
    b'{"error":{"message":"Request not received in time","type":"invalid_request_error",'
    b'"code":"request_timeout"}}',
)
_TOO_LARGE = _response(
    b"431 Request Header Fields Too Large",
    b'{"error":{"message":"Request head too large","type":"invalid_request_error",'
    b'"code":"request_header_fields_too_large"}}',
)
_BUSY = _response(
    b"503 Service Unavailable",
    b'{"error":{"message":"Too many open connections","type":"service_unavailable_error",'
    b'"code":"service_unavailable"}}',
)


_SHUTTING_DOWN = _response(
    b"503 Service Unavailable",
    b'{"error":{"message":"The proxy is shutting down","type":"service_unavailable_error",'
    b'"code":"service_unavailable"}}',
)


class _HeadTooLarge(Exception):
    pass


# What a connection's bytes so far end in: no request (or a whole one), a request's head, or its
# body. ``data_received`` arms the timer of the part left incomplete.
_IDLE, _HEAD, _BODY = "idle", "head", "body"


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of :class:`ClientBounds`.

    ``bounds`` is set on a subclass by :func:`bounded_protocol`; left None, it is read once from
    the environment (for workers that import this class by name).
    """

    bounds: ClassVar[ClientBounds | None] = None
    _warned_at: ClassVar[float] = -WARN_EVERY
    _refused: ClassVar[int] = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls.bounds is None:
            from openai_forward.settings import Settings

            cls.bounds = ClientBounds.from_settings(Settings.from_env())
        self._bounds: ClientBounds = cls.bounds
        self._timer: asyncio.TimerHandle | None = None
        self._reading = _IDLE  # which part of a request the bytes at hand end in
        self._head_bytes = 0
        self._header_count = 0
        self._head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._bounds.max_connections:
            self._refuse_busy()
            return
        self._arm(self._bounds.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        if isinstance(self.cycle, ProxyCycle) and self.cycle.disconnected:
            self.cycle.hung_up()

    def send_400_response(self, msg: str) -> None:
        # The parser reports an exception raised in a callback as a malformed request.
        if self._head_too_large:
            self._disarm()
            self.transport.write(_TOO_LARGE)
            self.transport.close()
        else:
            super().send_400_response(msg)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # The timers are armed once the bytes at hand are parsed, and only for a request they
        # leave incomplete: most requests arrive whole in one read and never need one.
        if self._reading == _IDLE or self.transport.is_closing():
            return
        if self._reading == _HEAD:
            if self._timer is None:  # a kept-alive connection's next request has begun
                self._arm(self._bounds.head_timeout, self._head_timed_out)
        else:  # the body came on: its silence is measured from now
            self._disarm()
            self._arm(self._bounds.body_timeout, self._body_stalled)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_count = 0
        self._reading = _HEAD

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        more_body = self.cycle is not None and self.cycle.more_body
        self._reading = _BODY if more_body else _IDLE

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn builds its own cycle for each request; ours adds to it (see ProxyCycle)
        cycle.__class__ = ProxyCycle
        assert isinstance(cycle, ProxyCycle)
        cycle.scope[HANG_UP] = cycle.watch_hang_up  # type: ignore[literal-required]  # ours
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading = _IDLE
        super().on_message_complete()

    # Bounds

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if (
            self._head_bytes > self._bounds.max_head_bytes
            or self._header_count > self._bounds.max_headers
        ):
            self._head_too_large = True
            raise _HeadTooLarge  # stops the parser, which then reports a malformed request

    def _arm(self, delay: float, callback: Any) -> None:
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.transport.write(_TIMEOUT)
        self.transport.close()

    def _body_stalled(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the proxy is not reading: the client is not to blame
            self._arm(self._bounds.body_timeout, self._body_stalled)
            return
        self.transport.close()  # the request's receive() now says http.disconnect

    def _refuse_busy(self) -> None:
        cls = BoundedProtocol
        cls._refused += 1
        self.transport.write(_BUSY)
        self.transport.close()
        now = time.monotonic()
        if now - cls._warned_at >= WARN_EVERY:
            cls._warned_at = now
            logger.warning(
                "Refusing connections with 503: %d open, the limit is %d (%d refused so far); "
                "raise MAX_CLIENT_CONNECTIONS with the descriptor limit (ulimit -n)",
                len(self.connections) - 1,
                self._bounds.max_connections,
                cls._refused,
            )


class ProxyCycle(RequestResponseCycle):
    """uvicorn's request cycle, with four differences:

    - for an HTTP/1.0 client, an answer without Content-Length is sent as it comes and ended by
      closing the connection (uvicorn would frame it as chunked, which such a client cannot read);
    - an app that marks its scope with :data:`CUT` before returning mid-response has its
      connection closed without an error in the log (a relayed answer the upstream broke off is
      logged once, by the proxy);
    - a response cut by a shutdown that outlasted the graceful timeout is one line in the log,
      not a traceback;
    - the app can be told of a hang-up by a callback (the scope's :data:`HANG_UP`) rather than
      by a task of its own waiting on ``receive()`` for ``http.disconnect``: a task per request
      costs more CPU than the callback.
    """

    _close_delimited = False
    _on_hang_up: Callable[[], None] | None = None

    def watch_hang_up(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once if the client hangs up before the response is complete; None
        withdraws it. Reading from the client stays on meanwhile (as while ``receive()`` waits),
        so that its end of the connection is seen."""
        self._on_hang_up = callback
        if callback is None:
            return
        if self.disconnected:
            self.hung_up()
        elif not self.response_complete:
            self.flow.resume_reading()

    def hung_up(self) -> None:
        callback, self._on_hang_up = self._on_hang_up, None
        if callback is not None:
            callback()

    async def run_asgi(self, app: Any) -> None:
        async def app_that_may_be_cut(scope: Any, receive: Any, send: Any) -> None:
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                logger.warning(
                    "Cut at shutdown: %s %s (still running after the graceful timeout)",
                    scope.get("method"),
                    scope.get("path"),
                )
                if self.response_started:
                    self._cut()
                else:
                    self.transport.write(_SHUTTING_DOWN)
                    self._cut()
                return
            if scope.get(CUT) and self.response_started and not self.response_complete:
                self._cut()

        try:
            await super().run_asgi(app_that_may_be_cut)
        finally:
            # The scope's hook refers to this cycle: without it, reference counting frees both
            # at once (the garbage collector, which workers run seldom, would have to).
            self.scope.pop(HANG_UP, None)  # type: ignore[misc]  # a key of ours

    def _cut(self) -> None:
        self.transport.close()
        self.disconnected = True  # nothing more to send; uvicorn then says nothing

    async def send(self, message: Any) -> None:
        if (
            message["type"] == "http.response.start"
            and not self.response_started
            and self.scope.get("http_version") == "1.0"
        ):
            names = {name.lower() for name, _ in message.get("headers", [])}
            if b"content-length" not in names:
                self._close_delimited = True
                self.keep_alive = False
                self.chunked_encoding = False  # neither chunked nor a length: the close ends it
        elif self._close_delimited and message["type"] == "http.response.body":
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


def bounded_protocol(bounds: ClientBounds) -> type[BoundedProtocol]:
    """The protocol class for a server run in this process with ``bounds``."""
    return type("BoundedProtocol", (BoundedProtocol,), {"bounds": bounds})
