"""Incremental Server-Sent Events splitting: feed chunks split anywhere, get whole events.

No I/O. Events keep their exact bytes (terminator included) so a relay can pass them on verbatim.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_TERMINATOR = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EventSplitter:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by ``chunk``, each with its terminating blank line."""
        buffer = self._buffer + chunk if self._buffer else chunk
        events = []
        start = 0
        for match in _TERMINATOR.finditer(buffer):
            end = match.end()
            events.append(buffer[start:end])
            start = end
        self._buffer = buffer[start:]
        return events

    def flush(self) -> bytes:
        """Whatever arrived after the last complete event (an unterminated tail)."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None if it has none (a comment, say)."""
    data = None
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            data = value if data is None else data + b"\n" + value
    return data


def parse_plain_stream(body: bytes) -> list[Any] | None:
    """The usual stream, nothing but one-line ``data: {...}`` events, parsed as one JSON array
    made by replacing the event boundaries with commas (a raw newline cannot occur inside JSON,
    so the boundaries are unambiguous). None when the body is anything else."""
    if not body.startswith(b"data: "):
        return None
    body = body.rstrip()
    if body.endswith(b"data: [DONE]"):
        body = body[: -len(b"data: [DONE]")].rstrip()
        if not body:
            return []
    inner = body[6:]
    array = b"[" + inner.replace(b"\n\ndata: ", b",") + b"]"
    if b"\n" in array or b"\r" in array:
        return None
    try:
        parsed = orjson.loads(array)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, list) or len(parsed) != inner.count(b"\n\ndata: ") + 1:
        return None
    return parsed
