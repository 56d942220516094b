"""Relaying the upstream's response to the client as it arrives, optionally paced per event."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from openai_forward.auth import KeyMask
from openai_forward.body import ClientGone
from openai_forward.errors import ProxyError
from openai_forward.exchange import (
    CLIENT_LEFT,
    NO_ANSWER,
    PROXY_ERROR,
    SHUTDOWN,
    UPSTREAM_TIMED_OUT,
    Observer,
)
from openai_forward.headers import response_headers
from openai_forward.sse import EventSplitter
from openai_forward.types import Send
from openai_forward.upstream import Response, UpstreamBroken, UpstreamError, UpstreamTimeout

# A non-stream answer up to this size (with a Content-Length) is read whole and sent in one piece.
WHOLE_BODY_LIMIT = 256 * 1024
# Answers that never have a body, whatever length their headers give (a 304's Content-Length is
# that of the representation it stands for): relayed with no body and no Content-Length.
NO_BODY_STATUS = frozenset({204, 304})
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def ending_reason(exc: BaseException) -> str:
    """Why an answer did not reach the client whole, from the exception that ended it.

    A hang-up and a shutdown both reach the request's task as a cancellation: the forwarder's
    hang-up watch cancels it with the message :data:`CLIENT_LEFT`, the server at shutdown with
    its own."""
    if isinstance(exc, asyncio.CancelledError):
        return CLIENT_LEFT if exc.args[:1] == (CLIENT_LEFT,) else SHUTDOWN
    if isinstance(exc, ClientGone):  # while a streamed request body was read
        return CLIENT_LEFT
    if isinstance(exc, UpstreamBroken):
        return exc.reason
    if isinstance(exc, UpstreamError) and isinstance(exc.__cause__, UpstreamBroken):
        return exc.__cause__.reason  # a body read whole that broke off: a clean 502
    if isinstance(exc, UpstreamTimeout):
        return UPSTREAM_TIMED_OUT
    if isinstance(exc, ProxyError):
        return NO_ANSWER
    return PROXY_ERROR


def is_event_stream(response: Response) -> bool:
    content_type = response.header(b"content-type")
    return content_type is not None and content_type.startswith(b"text/event-stream")


async def relay(
    send: Send,
    response: Response,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    interval: float | None = None,
    observers: Sequence[Observer] = (),
    mask: KeyMask | None = None,
) -> None:
    """Send ``response`` on to the client. Raises ``UpstreamBroken`` if the upstream breaks off
    (the caller then cuts the client's response); observers are told whether the body was whole,
    and if not, why (:func:`ending_reason`).

    With ``mask``, keys are masked in the headers, in bodies read whole, and in error bodies;
    event streams and large successful bodies (model output, files) pass untouched."""
    headers = response_headers(response.headers)
    if mask:
        headers = [(name, mask(value)) for name, value in headers]
    streaming = is_event_stream(response)
    if streaming:
        headers = [h for h in headers if h[0] != b"cache-control"]
        headers += _STREAM_HEADERS
    headers += extra_headers
    status = response.status
    if status in NO_BODY_STATUS:
        headers = [h for h in headers if h[0] != b"content-length"]
    for observer in observers:
        observer.start(status, headers)
    complete = False
    reason: str | None = None
    try:
        length = response.content_length
        whole = length is not None and length <= WHOLE_BODY_LIMIT
        if whole and not streaming and status not in NO_BODY_STATUS:
            # read before the response starts: a break here is still a clean 502
            body = await _read_whole(response)
            if mask and (masked := mask(body)) is not body:
                body, headers = masked, _with_length(headers, len(masked))
            for observer in observers:
                observer.feed(body)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            complete = True
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if status in NO_BODY_STATUS:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
            return
        if not (mask and status >= 400 and length is None):
            mask = None  # masked only where it cannot change a Content-Length
        if streaming and interval:
            await _relay_paced(send, response, interval, observers)
        else:
            async for chunk in response.chunks():
                if mask:
                    chunk = mask(chunk)
                for observer in observers:
                    observer.feed(chunk)
                # The upstream's end of body often comes in the same read as its last chunk:
                # then finish the client's response with that chunk, one write instead of two.
                last = response.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    complete = True
                    return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        complete = True
    except BaseException as exc:  # noted, never handled here
        reason = ending_reason(exc)
        raise
    finally:
        for observer in observers:
            observer.close(complete, reason)


async def _read_whole(response: Response) -> bytes:
    try:
        return await response.read()
    except UpstreamBroken as exc:
        raise UpstreamError(f"Upstream {response.base_url} broke off its answer: {exc}") from exc


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    return [
        (name, str(length).encode() if name == b"content-length" else value)
        for name, value in headers
    ]


async def _relay_paced(
    send: Send,
    response: Response,
    interval: float,
    observers: Sequence[Observer],
) -> None:
    """One event at a time, ``interval`` seconds apart at least, however the upstream batched.

    Each gap is measured from the moment the previous event was handed on, so a slow client or
    a late upstream never earns a burst afterwards."""
    loop = asyncio.get_running_loop()
    splitter = EventSplitter()
    next_at = 0.0

    async def emit(event: bytes) -> None:
        nonlocal next_at
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": event, "more_body": True})
        next_at = loop.time() + interval

    async for chunk in response.chunks():
        for observer in observers:
            observer.feed(chunk)
        for event in splitter.feed(chunk):
            await emit(event)
    tail = splitter.flush()
    if tail:  # an unterminated last event is an event too
        await emit(tail)
