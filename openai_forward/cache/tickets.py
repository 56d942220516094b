"""A call's use of the cache: a :class:`Hit` to replay, or a :class:`Miss` that watches the
upstream's answer go by and hands it to the cache once it is whole."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from openai_forward.cache.answer import (
    chat_from_json,
    chat_from_sse,
    chat_to_sse,
    embedding_from_json,
)
from openai_forward.exchange import Headers, Observer
from openai_forward.types import Send

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

    def close(self, complete: bool) -> None:
        pass

    async def replay(
        self, send: Send, headers: Headers, stream: bool, observers: Sequence[Observer]
    ) -> None:
        raise NotImplementedError

    def release(self) -> None:
        pass


class Hit(Ticket):
    """A stored answer, sent without the upstream and without any pause."""

    __slots__ = ("_chat", "_usage", "answer")

    def __init__(self, answer: bytes, chat: bool, include_usage: bool) -> None:
        self.answer = answer
        self._chat = chat
        self._usage = include_usage

    async def replay(
        self, send: Send, headers: Headers, stream: bool, observers: Sequence[Observer]
    ) -> None:
        assert self.answer is not None
        if stream and self._chat:
            body = chat_to_sse(self.answer, self._usage)
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


class Miss(Ticket):
    """Collects a 2xx answer as it is relayed; on a complete body, builds the entry and calls
    ``settle(entry)``. Anything else (error status, broken or cut body, no ``[DONE]``) settles
    with None: nothing is stored and callers waiting on this one go to the upstream."""

    __slots__ = ("_chat", "_chunks", "_collect", "_settle", "_size", "_sse")
    headers = (X_CACHE_MISS,)

    def __init__(self, settle: Callable[[bytes | None], None] | None, chat: bool) -> None:
        self._settle = settle
        self._chat = chat
        self._chunks: list[bytes] = []
        self._size = 0
        self._collect = False
        self._sse = False

    def start(self, status: int, headers: Headers) -> None:
        self._collect = 200 <= status < 300
        for name, value in headers:
            if name == b"content-type":
                self._sse = value.startswith(b"text/event-stream")
            elif name == b"content-encoding" and value.lower() != b"identity":
                self._collect = False  # relayed compressed as it came; replays are plain

    def feed(self, chunk: bytes) -> None:
        if self._collect:
            self._size += len(chunk)
            if self._size > MAX_ANSWER_BYTES:
                self._collect = False
                self._chunks.clear()
            else:
                self._chunks.append(chunk)

    def close(self, complete: bool) -> None:
        entry = None
        if complete and self._collect:
            body = b"".join(self._chunks)
            if self._sse:
                entry = chat_from_sse(body) if self._chat else None
            else:
                entry = chat_from_json(body) if self._chat else embedding_from_json(body)
        self._chunks.clear()
        self._finish(entry)

    def release(self) -> None:
        self._finish(None)

    def _finish(self, entry: bytes | None) -> None:
        settle, self._settle = self._settle, None
        if settle is not None:
            settle(entry)
