"""Reading the client's request body: small bodies whole (they can be retried and inspected),
large ones streamed through without being held in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from openai_forward.types import Receive

# Bodies up to this size are read whole. Chat, completion and embedding requests are far smaller;
# uploads past it are streamed.
REPLAY_LIMIT = 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class BodyTooLarge(Exception):
    pass


class StreamedBody:
    """A body too large to hold: relayed chunk by chunk, once (so it is retried only if no
    byte of it has been consumed yet)."""

    def __init__(self, head: list[bytes], receive: Receive, limit: int) -> None:
        self._head = head
        self._receive = receive
        self._limit = limit
        self.started = False
        self.size = sum(map(len, head))
        self.length: int | None = None  # the client's Content-Length, sent on unchanged
        self.failure: ClientGone | BodyTooLarge | None = None  # why sending it stopped
        self.on_complete: Callable[[], None] | None = None  # called once the last byte is in

    async def iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        for chunk in self._head:
            yield chunk
        self._head = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.failure = ClientGone()
                raise self.failure
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self._limit:
                self.failure = BodyTooLarge(
                    f"Request body is larger than the limit of {self._limit} bytes"
                )
                raise self.failure
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                if self.on_complete is not None:
                    self.on_complete()
                return


async def read_body(receive: Receive, limit: int) -> bytes | StreamedBody:
    """The whole body if it is at most :data:`REPLAY_LIMIT` bytes, else a :class:`StreamedBody`.

    Raises :class:`ClientGone` or :class:`BodyTooLarge`.
    """
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while size <= REPLAY_LIMIT:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            if size > limit:
                raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes")
            return b"".join(chunks)
    if size > limit:
        raise BodyTooLarge(f"Request body is larger than the limit of {limit} bytes")
    return StreamedBody(chunks, receive, limit)
