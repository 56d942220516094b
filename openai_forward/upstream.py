"""One target's upstream: its connection pool (:mod:`openai_forward.h1`), keys and retries.

This is the one module that catches the client's exceptions; everything above sees
:class:`UpstreamError` / :class:`UpstreamTimeout` (answered as 502 / 504) or
:class:`UpstreamBroken` (a body that broke off after the response had started).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Sequence

from openai_forward import h1
from openai_forward.auth import Credentials, KeyPool
from openai_forward.body import BodyTooLarge, StreamedBody
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
    """All traffic to one target's base URL goes through one connection pool."""

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
        self._origin = h1.Origin(base_url, proxy)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_retries = max_retries
        self._pool = pool
        self._conns: h1.Pool | None = None

    async def open(self) -> None:
        self._conns = h1.Pool(self._origin, self._connect_timeout, self._read_timeout)

    async def close(self) -> None:
        if self._conns is not None:
            self._conns.close()
            self._conns = None

    @staticmethod
    def target(rest: bytes, query: bytes) -> bytes:
        """The request target below the base URL's path (both already percent-encoded)."""
        return rest + b"?" + query if query else rest

    async def send(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | StreamedBody,
        creds: Credentials,
    ) -> h1.Response:
        """Send one request, retrying what can be retried (SPEC §6). Returns the response with
        its head read and its body unread; the caller must release it."""
        conns = self._conns
        assert conns is not None, "Upstream.open() was not awaited"
        pool = self._pool
        attempt = 0
        while True:
            key = pool.acquire() if creds.use_pool else None
            if key is not None:
                sent_headers = [*headers, (b"authorization", pool.header(key))]
            elif creds.authorization is not None:
                sent_headers = [*headers, (b"authorization", creds.authorization.encode("latin-1"))]
            else:
                sent_headers = headers  # type: ignore[assignment]
            data = body.iterate() if isinstance(body, StreamedBody) else body
            try:
                response = await conns.request(method, target, sent_headers, data)
            except h1.ReadTimeout as exc:
                # The upstream accepted the request and stayed silent for READ_TIMEOUT: waiting
                # that long again would only double the client's wait.
                raise UpstreamTimeout(
                    f"Upstream {self.base_url} sent no response within "
                    f"{self._read_timeout:g} seconds"
                ) from exc
            except BodyTooLarge as exc:
                raise ProxyError(str(exc), 413) from exc
            except h1.ClientError as exc:
                failure = self._failure(exc)
                if attempt >= self._max_retries or not _replayable(body):
                    logger.warning("%s (after %d attempt(s))", failure.message, attempt + 1)
                    raise failure from exc
                # A pooled connection the upstream had closed fails at once: retry it at once.
                stale = isinstance(exc, h1.Disconnected) and exc.stale
                await asyncio.sleep(0 if stale else backoff(attempt))
                attempt += 1
                continue

            status = response.status
            if status not in _RETRY_STATUS and status != 401:
                return response
            after = response.header(b"retry-after")
            wait = retry_after(after.decode("latin-1") if after is not None else None)
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

    def _failure(self, exc: h1.ClientError) -> ProxyError:
        if isinstance(exc, h1.ConnectTimeout):
            return UpstreamTimeout(
                f"Upstream {self.base_url} timed out while connecting ({self._connect_timeout:g} s)"
            )
        reason = "unreachable" if isinstance(exc, h1.ConnectError) else "failed"
        return UpstreamError(f"Upstream {self.base_url} {reason}: {exc}")

    async def read_body(self, response: h1.Response) -> bytes:
        try:
            return await response.read()
        except h1.ClientError as exc:
            raise UpstreamBroken(f"{self.base_url}: {exc}") from exc


def _replayable(body: bytes | StreamedBody) -> bool:
    return not isinstance(body, StreamedBody) or not body.started
