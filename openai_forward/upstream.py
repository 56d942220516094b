"""The upstream client: one pooled aiohttp session per target, retries, timeouts.

This is the one module that catches aiohttp's exceptions; everything above sees
:class:`UpstreamError` / :class:`UpstreamTimeout` (answered as 502 / 504) or
:class:`UpstreamBroken` (a body that broke off after the response had started).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
from yarl import URL

from openai_forward.auth import Credentials, KeyPool
from openai_forward.body import StreamedBody
from openai_forward.errors import ProxyError

logger = logging.getLogger("openai_forward.upstream")

BACKOFF_BASE = 0.2
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 10.0  # longer waits are the client's to make: the 429 is relayed
KEY_COOLDOWN_429 = 60.0
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class UpstreamError(ProxyError):
    status = 502


class UpstreamTimeout(ProxyError):
    status = 504


class UpstreamBroken(Exception):
    """The upstream broke off in the middle of a body; the client's response must be cut."""


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


class Upstream:
    """All traffic to one target's base URL goes through one pooled session."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_retries: int,
        pool: KeyPool,
        proxy: str | None = None,
    ) -> None:
        self.base_url = base_url
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._max_retries = max_retries
        self._pool = pool
        self._proxy = proxy
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, rest: bytes, query: bytes) -> URL:
        raw = self.base_url + rest.decode("latin-1")
        if query:
            raw += "?" + query.decode("latin-1")
        return URL(raw, encoded=True)

    async def send(
        self,
        method: str,
        url: URL,
        headers: Sequence[tuple[str, str]],
        body: bytes | StreamedBody,
        creds: Credentials,
    ) -> aiohttp.ClientResponse:
        """Send one request, retrying what can be retried (SPEC §6). Returns the response with
        its headers read and its body unread; the caller must release it."""
        assert self._session is not None, "Upstream.open() was not awaited"
        pool = self._pool
        attempt = 0
        while True:
            key = pool.acquire() if creds.use_pool else None
            if key is not None:
                sent_headers = [*headers, ("Authorization", pool.header(key))]
            elif creds.authorization is not None:
                sent_headers = [*headers, ("Authorization", creds.authorization)]
            else:
                sent_headers = list(headers)
            data = body.iterate() if isinstance(body, StreamedBody) else (body or None)
            try:
                response = await self._session.request(
                    method,
                    url,
                    headers=sent_headers,
                    data=data,
                    allow_redirects=False,
                    proxy=self._proxy,
                )
            except aiohttp.SocketTimeoutError as exc:
                # The upstream accepted the request and stayed silent for READ_TIMEOUT: waiting
                # that long again would only double the client's wait.
                raise UpstreamTimeout(
                    f"Upstream {self.base_url} sent no response within "
                    f"{self._timeout.sock_read:g} seconds"
                ) from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failure = self._failure(exc)
                if isinstance(body, StreamedBody) and body.too_large:
                    raise ProxyError(body.too_large_message, 413) from exc
                if attempt >= self._max_retries or not _replayable(body):
                    logger.warning("%s (after %d attempt(s))", failure.message, attempt + 1)
                    raise failure from exc
                # A pooled connection the upstream had closed fails at once: retry it at once.
                stale = attempt == 0 and isinstance(exc, aiohttp.ServerDisconnectedError)
                await asyncio.sleep(0 if stale else backoff(attempt))
                attempt += 1
                continue

            status = response.status
            if status not in _RETRY_STATUS and status != 401:
                return response
            wait = retry_after(response.headers.get("Retry-After"))
            if key is not None and status in (401, 429):
                pool.bench(key, None if status == 401 else (wait or KEY_COOLDOWN_429))
                if (
                    attempt < self._max_retries
                    and _replayable(body)
                    and pool.has_free_other_than(key)
                ):
                    response.release()
                    attempt += 1
                    continue
            if status == 401 or attempt >= self._max_retries or not _replayable(body):
                return response
            delay = backoff(attempt) if wait is None else wait
            if delay > RETRY_AFTER_CAP:
                return response
            response.release()
            await asyncio.sleep(delay)
            attempt += 1

    def _failure(self, exc: BaseException) -> ProxyError:
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamTimeout(
                f"Upstream {self.base_url} timed out while connecting "
                f"({self._timeout.sock_connect:g} s)"
            )
        reason = "unreachable" if isinstance(exc, aiohttp.ClientConnectorError) else "failed"
        return UpstreamError(f"Upstream {self.base_url} {reason}: {_describe(exc)}")

    async def iter_body(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The response body as it arrives; a break-off becomes :class:`UpstreamBroken`."""
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(f"{self.base_url}: {_describe(exc)}") from exc

    async def read_body(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            return await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(f"{self.base_url}: {_describe(exc)}") from exc


def _replayable(body: bytes | StreamedBody) -> bool:
    return not isinstance(body, StreamedBody) or not body.started


def _describe(exc: BaseException) -> str:
    """A short reason without anything from the request (no headers, so no key)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body broken off"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
