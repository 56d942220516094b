"""A call's use of the cache: a :class:`Hit` to replay, a :class:`Miss` that watches the
upstream's answer go by and hands it to the cache once it is whole, or a :class:`Bypass`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from openai_forward.exchange import Call, Headers, Observer
from openai_forward.kinds import CacheRules
from openai_forward.types import Send

logger = logging.getLogger("openai_forward.cache")

X_CACHE_HIT = (b"x-cache", b"HIT")
X_CACHE_MISS = (b"x-cache", b"MISS")
# Answers larger than this are relayed but not kept (and not held in memory while relayed).
MAX_ANSWER_BYTES = 32 * 1024 * 1024


class Ticket:
    """One call's use of the cache: a stored ``answer`` to replay, or an observer that stores
    the upstream's answer. ``headers`` go on the relayed response. ``release`` ends the call's
    claim (single flight) and is idempotent."""

    answer: bytes | None = None
    headers: Sequence[tuple[bytes, bytes]] = ()

    def start(self, status: int, headers: Headers) -> None:
        pass

    def feed(self, chunk: bytes) -> None:
        pass

    def close(self, complete: bool, reason: str | None = None) -> None:
        pass

    async def replay(
        self, send: Send, headers: Headers, stream: bool, observers: Sequence[Observer]
    ) -> None:
        raise NotImplementedError

    def release(self) -> None:
        pass


class Bypass(Ticket):
    """A call its kind keeps out of the cache: it goes upstream, marked as a miss, and its
    answer is not stored."""

    __slots__ = ()
    headers = (X_CACHE_MISS,)


class Hit(Ticket):
    """A stored answer, sent without the upstream and without any pause."""

    __slots__ = ("_payload", "_rules", "answer")

    def __init__(self, answer: bytes, rules: CacheRules, payload: dict[str, Any]) -> None:
        self.answer = answer
        self._rules = rules
        self._payload = payload  # the request's body: options of the replay

    async def replay(
        self, send: Send, headers: Headers, stream: bool, observers: Sequence[Observer]
    ) -> None:
        assert self.answer is not None
        if stream and self._rules.to_stream is not None:
            body = self._rules.to_stream(self.answer, self._payload)
            head = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]
        else:
            body = self.answer
            head = [(b"content-type", b"application/json")]
        head += [(b"content-length", str(len(body)).encode()), X_CACHE_HIT, *headers]
        for observer in observers:
            observer.start(200, head)
        complete = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": head})
            for observer in observers:
                observer.feed(body)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            complete = True
        finally:
            for observer in observers:
                observer.close(complete)


# What a miss reports once its call is over: (key, flight, entry or None).
Settle = Callable[[bytes, "asyncio.Future[bytes | None] | None", "bytes | None"], None]


class Miss(Ticket):
    """Collects a 2xx answer as it is relayed; on a complete body, builds the entry and calls
    ``settle(key, flight, entry)``. Anything else (error status, broken or cut body, a stream
    that did not end as its kind's streams end) settles with None: nothing is stored and
    callers waiting on this one go to the upstream. An entry assembled from a stream is also
    left in ``call.assembled``, for the chat log."""

    __slots__ = (
        "_call",
        "_chunks",
        "_collect",
        "_flight",
        "_key",
        "_rules",
        "_settle",
        "_size",
        "_sse",
    )
    headers = (X_CACHE_MISS,)

    def __init__(
        self,
        settle: Settle,
        key: bytes,
        flight: asyncio.Future[bytes | None] | None,
        rules: CacheRules,
        call: Call | None = None,
    ) -> None:
        self._settle: Settle | None = settle
        self._key = key
        self._flight = flight
        self._rules = rules
        self._call = call
        self._chunks: list[bytes] = []
        self._size = 0
        self._collect = False
        self._sse = False

    def start(self, status: int, headers: Headers) -> None:
        if not 200 <= status < 300:
            return
        named = dict(headers)  # the last Content-Type counts, as in any header loop
        self._sse = named.get(b"content-type", b"").startswith(b"text/event-stream")
        # An answer relayed compressed as it came is not kept: replays are plain.
        self._collect = b"content-encoding" not in named or all(
            value.lower() == b"identity" for name, value in headers if name == b"content-encoding"
        )

    def feed(self, chunk: bytes) -> None:
        if self._collect:
            self._size += len(chunk)
            if self._size > MAX_ANSWER_BYTES:
                self._collect = False
                self._chunks.clear()
            else:
                self._chunks.append(chunk)

    def close(self, complete: bool, reason: str | None = None) -> None:  # reason: unused
        settle, self._settle = self._settle, None
        if settle is None:
            return
        entry = None
        if complete and self._collect:
            try:
                entry = self._entry()
            except Exception as exc:  # an answer shaped like no answer: not stored
                logger.warning(
                    "The cache did not store an answer it could not read (%s: %s)",
                    type(exc).__name__,
                    str(exc)[:200],
                )
        self._chunks = []
        self._call = None
        settle(self._key, self._flight, entry)

    def _entry(self) -> bytes | None:
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not self._sse:
            return body if self._rules.is_whole(body) else None
        from_stream = self._rules.from_stream
        entry = from_stream(body) if from_stream is not None else None
        if self._call is not None:
            self._call.assembled = entry
        return entry

    def release(self) -> None:
        settle, self._settle = self._settle, None
        if settle is not None:
            settle(self._key, self._flight, None)
