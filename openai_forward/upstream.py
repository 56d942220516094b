"""One target's upstream: its aiohttp session, its keys and the retry rules.

This is the one module that catches aiohttp's exceptions. Everything above sees
:class:`UpstreamError` / :class:`UpstreamTimeout` (answered as 502 / 504 before any byte of the
response went out) or :class:`UpstreamBroken` (a body that broke off after the response began).

Retries never bill twice: a request is sent again only when the upstream cannot have received
it (the connection could not be made, or a pooled keep-alive connection turned out to be closed),
or when the upstream said to come back (429/5xx) and another key or a short wait can help.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aiohttp
from yarl import URL

from openai_forward.auth import Credentials, KeyPool
from openai_forward.body import StreamedBody
from openai_forward.errors import ProxyError
from openai_forward.exchange import UPSTREAM_BROKE_OFF, UPSTREAM_TIMED_OUT
from openai_forward.outcome import Outcome

logger = logging.getLogger("openai_forward.upstream")

BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 10.0  # longer waits are the client's to make: the answer is relayed
KEY_COOLDOWN_429 = 60.0
# Answers that say "come back later": retried only when another key or a short wait can help.
_COME_BACK = frozenset({429, 500, 502, 503, 504})
# Headers aiohttp would add by itself. The proxy sends what the client sent and nothing more.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class UpstreamError(ProxyError):
    status = 502


class UpstreamTimeout(ProxyError):
    status = 504


class UpstreamBroken(Exception):
    """The upstream broke off in the middle of a body; the client's response must be cut.
    ``reason`` says how (:data:`~openai_forward.exchange.UPSTREAM_BROKE_OFF` or
    :data:`~openai_forward.exchange.UPSTREAM_TIMED_OUT`)."""

    def __init__(self, message: str, reason: str = UPSTREAM_BROKE_OFF) -> None:
        super().__init__(message)
        self.reason = reason


def backoff(attempt: int) -> float:
    return min(BACKOFF_BASE * (2**attempt), BACKOFF_CAP)


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Response:
    """The upstream's answer, head read and body not yet: the relay's view of it."""

    __slots__ = ("_closed", "_raw", "base_url", "headers", "status")

    def __init__(self, raw: aiohttp.ClientResponse, base_url: str, method: str) -> None:
        self._raw = raw
        self.base_url = base_url
        self.status = raw.status
        # Names lower-cased once, as ASGI wants them; values exactly as received.
        self.headers = [(name.lower(), value) for name, value in raw.raw_headers]
        # A body that ends where the connection ends is whole only if the connection ended
        # cleanly: aiohttp takes a reset there for the end, the closing of its connection tells.
        self._closed: asyncio.Future[None] | None = None
        if _ends_at_close(raw, method) and raw.connection is not None:
            self._closed = raw.connection.protocol.closed  # type: ignore[union-attr]
            if self._closed is not None:  # seen, even when the body is not read to its end
                self._closed.add_done_callback(_consume)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content_length(self) -> int | None:
        return self._raw.content_length

    async def read(self) -> bytes:
        """The whole body. Raises :class:`UpstreamBroken`."""
        try:
            body = await self._raw.read()
            await self._ended_cleanly()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken(exc) from exc
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Raises :class:`UpstreamBroken`."""
        content = self._raw.content
        try:
            while chunk := await content.readany():
                yield chunk
            await self._ended_cleanly()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken(exc) from exc

    def _broken(self, exc: BaseException) -> UpstreamBroken:
        # aiohttp's read timeout (``ServerTimeoutError``) is a TimeoutError too
        reason = UPSTREAM_TIMED_OUT if isinstance(exc, TimeoutError) else UPSTREAM_BROKE_OFF
        return UpstreamBroken(f"{self.base_url}: {_describe(exc)}", reason)

    async def _ended_cleanly(self) -> None:
        if self._closed is not None:
            await self._closed  # raises if the connection was lost rather than closed

    def at_eof(self) -> bool:
        """Whether the whole body has been read (known only after the last chunk for a body
        that ends with its connection)."""
        return self._closed is None and self._raw.content.at_eof()

    def release(self) -> None:
        """Done with it: a body read to its end returns the connection to the pool; anything
        else closes the connection (the upstream sees the request aborted)."""
        if self._raw.content.at_eof():
            self._raw.release()
        else:
            self._raw.close()


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _ends_at_close(raw: aiohttp.ClientResponse, method: str) -> bool:
    """Whether the body is delimited by the end of the connection (no length, not chunked)."""
    return (
        raw.content_length is None
        and "chunked" not in raw.headers.get("Transfer-Encoding", "").lower()
        and raw.status >= 200
        and raw.status not in (204, 304)
        and method != "HEAD"
    )


class _Attempt:
    """What a request's attempt learns from its connector: whether it went out on a connection
    that had carried a request before (taken from the pool)."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


# The attempt in progress in this task, told by the connector (aiohttp awaits the connector's
# ``connect`` inline, in the task that called ``session.request``).
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("openai_forward_attempt", default=None)


_Connector = TypeVar("_Connector", bound=aiohttp.TCPConnector)


def _reuse_aware(connector: type[_Connector]) -> type[_Connector]:
    """``connector`` noting in :data:`_ATTEMPT` when it hands out a connection that has carried
    a request before. (aiohttp's request tracing tells the same, at the cost of a trace object
    and a dozen signals per request: a tenth of the proxy's instructions per request,
    ``benchmarks/count_instructions.py``.)"""

    class ReuseAware(connector):  # type: ignore[valid-type,misc]  # a class given at run time
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._carried: weakref.WeakSet[object] = weakref.WeakSet()  # their protocols

        async def connect(
            self,
            req: aiohttp.ClientRequest,
            traces: list[Any],
            timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
        ) -> Any:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol in self._carried:
                attempt = _ATTEMPT.get()
                if attempt is not None:
                    attempt.reused = True
            elif protocol is not None:
                self._carried.add(protocol)
            return connection

    ReuseAware.__name__ = ReuseAware.__qualname__ = f"ReuseAware{connector.__name__}"
    return cast(type[_Connector], ReuseAware)


class Upstream:
    """All traffic to one target's base URL: one pooled aiohttp session, opened at start-up."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_retries: int,
        pool: KeyPool,
        proxy: str | None = None,
        max_connections: int = 100,
    ) -> None:
        self.base_url = base_url
        self._base = base_url.encode("latin-1")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_retries = max_retries
        self._pool = pool
        self._proxy = proxy
        self._max_connections = max_connections
        # An HTTP proxy is named per request; a SOCKS proxy is the connector's way to connect.
        self._http_proxy = None if proxy is None or proxy.startswith("socks") else proxy
        self._proxy_errors: tuple[type[Exception], ...] = ()  # a SOCKS proxy's own errors
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # for streamed uploads, see send()

    async def open(self) -> None:
        # The default trust store, read now: SSL_CERT_FILE / SSL_CERT_DIR apply.
        tls = ssl.create_default_context()
        self._session = self._new_session(tls, keep_alive=True)
        self._fresh = self._new_session(tls, keep_alive=False)

    def _new_session(self, tls: ssl.SSLContext, *, keep_alive: bool) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector
        options = {"limit": self._max_connections, "ssl": tls, "force_close": not keep_alive}
        if self._proxy is not None and self._http_proxy is None:
            from aiohttp_socks import ProxyConnector  # the [socks] extra

            socks = _reuse_aware(ProxyConnector) if keep_alive else ProxyConnector

            # As curl reads them: socks5h:// lets the proxy resolve the name, socks5:// resolves
            # it here (aiohttp-socks knows only the socks5 scheme, with an rdns flag).
            remote_dns = self._proxy.startswith(("socks5h:", "socks4a:"))
            url = URL(self._proxy)
            url = url.with_scheme(
                {"socks5h": "socks5", "socks4a": "socks4"}.get(url.scheme, url.scheme)
            )
            connector = socks.from_url(str(url), rdns=remote_dns, **options)
            self._proxy_errors = _socks_errors()
        else:
            tcp = _reuse_aware(aiohttp.TCPConnector) if keep_alive else aiohttp.TCPConnector
            connector = tcp(**options)  # type: ignore[arg-type]
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=None,  # waiting for a free connection under the cap is not timed
                sock_connect=self._connect_timeout,
                sock_read=self._read_timeout,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None

    def url(self, rest: bytes, query: bytes) -> URL:
        """The upstream URL for the part of the path below the prefix (already percent-encoded,
        and sent as it is)."""
        target = self._base + rest
        if query:
            target += b"?" + query
        return URL(target.decode("latin-1"), encoded=True)

    async def send(
        self,
        method: str,
        url: URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | StreamedBody,
        creds: Credentials,
        outcome: Outcome | None = None,
    ) -> Response:
        """Send one request, retrying what can be retried; the response has its head read and
        its body unread, and the caller must :meth:`~Response.release` it.

        Retries are counted in ``outcome``. Raises :class:`UpstreamError`,
        :class:`UpstreamTimeout` (both logged here, once per request), and what stopped a
        streamed body (:class:`~openai_forward.body.ClientGone`,
        :class:`~openai_forward.body.BodyTooLarge`).
        """
        try:
            return await self._send(method, url, headers, body, creds, outcome)
        except ProxyError as exc:
            logger.warning("%s", exc.message)
            raise

    async def _send(
        self,
        method: str,
        url: URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | StreamedBody,
        creds: Credentials,
        outcome: Outcome | None,
    ) -> Response:
        assert self._session is not None and self._fresh is not None, "Upstream.open() first"
        pool = self._pool
        attempt = 0  # retries spent from MAX_RETRIES
        stale_retried = False
        while True:
            key = pool.acquire() if creds.use_pool else None
            try:
                raw = await self._attempt(method, url, headers, body, creds, key)
            except _Stale as exc:
                if stale_retried or not _replayable(body):
                    raise self._failed("closed the connection without an answer", exc) from exc
                stale_retried = True  # once, at once, outside MAX_RETRIES
                _count(outcome)
                continue
            except _CannotConnect as exc:
                if attempt >= self._max_retries or not _replayable(body):
                    raise exc.error from exc.__cause__
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                _count(outcome)
                continue

            status = raw.status
            if status not in _COME_BACK and status != 401:
                return Response(raw, self.base_url, method)
            wait = retry_after(raw.headers.get("Retry-After"))
            if key is not None and status in (401, 429):
                pool.bench(key, None if status == 401 else (wait or KEY_COOLDOWN_429))
                if self._may_retry(attempt, body) and pool.has_free_other_than(key):
                    raw.close()
                    attempt += 1
                    _count(outcome)
                    continue
            if (
                status == 401
                or wait is None
                or wait > RETRY_AFTER_CAP
                or not self._may_retry(attempt, body)
            ):
                return Response(raw, self.base_url, method)  # the client backs off as it was told
            raw.close()
            await asyncio.sleep(wait)
            attempt += 1
            _count(outcome)

    def pool_key(self) -> str:
        """A real key from the rotation, for a WebSocket (no retries there)."""
        return self._pool.reveal(self._pool.acquire())

    async def websocket(
        self,
        rest: bytes,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        protocols: Sequence[str],
    ) -> UpstreamSocket:
        """Open a WebSocket to the upstream's ``ws(s)://`` URL for the path below the prefix.

        Raises :class:`UpstreamError` (502, or the upstream's own status if it refused the
        upgrade) or :class:`UpstreamTimeout`, logged here."""
        assert self._session is not None, "Upstream.open() first"
        url = self.url(rest, query)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        sent = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        try:
            ws = await self._session.ws_connect(
                url,
                headers=sent,
                protocols=protocols,
                proxy=self._http_proxy,
                max_msg_size=0,  # frames pass through whole, whatever their size
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            error = self._websocket_failure(exc)
            logger.warning("%s", error)
            raise error from exc
        except self._proxy_errors as exc:
            error = self._websocket_failure(exc)
            logger.warning("%s", error)
            raise error from exc
        return UpstreamSocket(ws)

    def _websocket_failure(self, exc: Exception) -> Exception:
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            status = exc.status if 400 <= exc.status < 600 else 502
            what = f"refused the WebSocket upgrade ({exc.status})"
            return ProxyError(f"Upstream {self.base_url} {what}", status)
        failure: Exception | None = None
        if isinstance(exc, aiohttp.ClientError):
            failure = self._sort(exc, reused=False)
        elif isinstance(exc, self._proxy_errors):
            failure = self._socks_failure(exc)
        if failure is not None:
            return failure.error if isinstance(failure, _CannotConnect) else failure
        return UpstreamTimeout(f"Upstream {self.base_url} timed out opening a WebSocket")

    def _may_retry(self, attempt: int, body: bytes | StreamedBody) -> bool:
        return attempt < self._max_retries and _replayable(body)

    async def _attempt(
        self,
        method: str,
        url: URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | StreamedBody,
        creds: Credentials,
        key: int | None,
    ) -> aiohttp.ClientResponse:
        """One try, with aiohttp's exceptions sorted by what may follow them."""
        sent = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        if key is not None:
            sent.append(("Authorization", self._pool.header(key).decode("latin-1")))
        elif creds.authorization is not None:
            sent.append(("Authorization", creds.authorization))
        session = self._session
        data: bytes | AsyncIterator[bytes] | None
        if isinstance(body, bytes):
            data = body or None  # no body: aiohttp then sends Content-Length: 0 where one is due
        else:
            # A body that cannot be sent twice never goes out on a pooled connection, which
            # the upstream may have closed while it was idle: a fresh one cannot be stale.
            session = self._fresh
            data = body.iterate()
            if body.length is not None:
                sent.append(("Content-Length", str(body.length)))  # not re-framed as chunked
        assert session is not None
        attempt = _Attempt()
        noted = _ATTEMPT.set(attempt)
        try:
            return await session.request(
                method,
                url,
                headers=sent,
                data=data,
                allow_redirects=False,
                proxy=self._http_proxy,
            )
        except TimeoutError as exc:  # aiohttp's timeouts are asyncio.TimeoutError
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise _CannotConnect(
                    UpstreamTimeout(
                        f"Upstream {self.base_url} timed out while connecting "
                        f"({self._connect_timeout:g} s)"
                    )
                ) from exc
            # Accepted and then silent for READ_TIMEOUT: waiting again would double the wait.
            raise UpstreamTimeout(
                f"Upstream {self.base_url} sent no response within {self._read_timeout:g} seconds"
            ) from exc
        except aiohttp.ClientError as exc:
            if isinstance(body, StreamedBody) and body.failure is not None:
                raise body.failure from exc
            raise self._sort(exc, reused=attempt.reused) from exc
        except self._proxy_errors as exc:
            raise self._socks_failure(exc) from exc
        finally:
            _ATTEMPT.reset(noted)

    def _sort(self, exc: aiohttp.ClientError, *, reused: bool) -> Exception:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return self._failed("presented a TLS certificate that is not trusted", exc)
        if isinstance(exc, aiohttp.ClientSSLError):
            return self._failed("failed the TLS handshake", exc)
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return self._failed(f"cannot be reached: the proxy refused ({exc.status})", exc)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return _CannotConnect(self._failed("unreachable", exc))
        if isinstance(exc, aiohttp.ClientResponseError):
            return self._failed("sent an invalid HTTP response", exc)
        if reused and isinstance(exc, aiohttp.ClientConnectionError):
            return _Stale()
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return self._failed("closed the connection without an answer", exc)
        return self._failed("failed", exc)

    def _socks_failure(self, exc: Exception) -> Exception:
        name = type(exc).__name__
        if name == "ProxyConnectionError":  # the SOCKS proxy itself could not be reached
            return _CannotConnect(self._failed("unreachable: the SOCKS proxy is down", exc))
        if name == "ProxyTimeoutError":
            return _CannotConnect(self._failed("unreachable: the SOCKS proxy timed out", exc))
        return self._failed("cannot be reached: the SOCKS proxy refused", exc)

    def _failed(self, what: str, exc: BaseException) -> UpstreamError:
        return UpstreamError(f"Upstream {self.base_url} {what}: {_describe(exc)}")


@dataclass(frozen=True, slots=True)
class Frame:
    """One message from an upstream WebSocket: text, binary data, or its end (neither)."""

    text: str | None = None
    data: bytes | None = None
    close_code: int | None = None
    reason: str = ""


class UpstreamSocket:
    """An open WebSocket to the upstream. Sending on a broken one raises ``ConnectionError``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.protocol = ws.protocol

    async def send_text(self, text: str) -> None:
        try:
            await self._ws.send_str(text)
        except aiohttp.ClientError as exc:
            raise ConnectionError(_describe(exc)) from exc

    async def send_bytes(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except aiohttp.ClientError as exc:
            raise ConnectionError(_describe(exc)) from exc

    async def receive(self) -> Frame:
        """The next text or binary message; a frame with neither once the socket is closed."""
        while True:
            message = await self._ws.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                return Frame(text=message.data)
            if message.type is aiohttp.WSMsgType.BINARY:
                return Frame(data=message.data)
            if message.type is aiohttp.WSMsgType.CLOSE:
                return Frame(close_code=message.data, reason=message.extra or "")
            if message.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue  # answered by aiohttp itself
            return Frame(close_code=self._ws.close_code)  # CLOSING, CLOSED or ERROR

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if not self._ws.closed:
            await self._ws.close(code=code, message=(reason or "").encode())


def _socks_errors() -> tuple[type[Exception], ...]:
    """What a SOCKS connection raises that is not aiohttp's (empty without the [socks] extra)."""
    try:
        import aiohttp_socks
        import python_socks
    except ImportError:
        return ()
    return tuple(
        getattr(module, name)
        for module in (aiohttp_socks, python_socks)
        for name in ("ProxyConnectionError", "ProxyError", "ProxyTimeoutError")
    )


class _Stale(Exception):
    """A pooled keep-alive connection that the upstream had closed: it never saw the request."""


class _CannotConnect(Exception):
    """No connection could be made: the upstream cannot have received the request."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def _describe(exc: BaseException) -> str:
    """What went wrong, in a few words (aiohttp's messages can be empty or nested)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.message or type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _count(outcome: Outcome | None) -> None:
    if outcome is not None:
        outcome.retries += 1


def _replayable(body: bytes | StreamedBody) -> bool:
    return not isinstance(body, StreamedBody) or not body.started
