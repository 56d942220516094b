"""Header filtering in both directions, one pass each way."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never copied toward any upstream: the HTTP client sets what it must.
_NOT_UPSTREAM = HOP_BY_HOP | {b"host", b"cookie", b"accept-encoding", b"content-length", b"expect"}
# The only headers an openai-type provider sees (plus ``openai-*``).
_OPENAI_ALLOWED = frozenset({b"content-type", b"accept", b"authorization"})
# Never relayed to the client. ``date`` and ``server`` are set by our own server; CORS is ours.
_NOT_DOWNSTREAM = HOP_BY_HOP | {b"set-cookie", b"date", b"server"}


@dataclass(slots=True)
class RequestHead:
    """What the forwarder needs from the client's headers, gathered in one pass."""

    upstream: list[tuple[bytes, bytes]]
    authorization: str | None = None
    content_length: int | None = None
    origin: bytes | None = None


def read_request_head(
    raw: Iterable[tuple[bytes, bytes]], openai_type: bool, *, websocket: bool = False
) -> RequestHead:
    """Split the client's headers into those sent upstream and those the proxy acts on.

    ``authorization`` is left out of ``upstream``: the forwarder decides what to send. For a
    WebSocket upgrade the ``Sec-WebSocket-*`` headers stay behind too (the proxy's own
    WebSocket client makes its own handshake). Raises ``ValueError`` on a malformed
    ``Content-Length``.
    """
    head = RequestHead([])
    keep = head.upstream.append
    for name, value in raw:
        if name == b"authorization":
            head.authorization = value.decode("latin-1")
            continue
        if name == b"content-length":
            head.content_length = int(value)
            continue
        if name == b"origin":
            head.origin = value
            if openai_type:
                continue
        if openai_type:
            if name in _OPENAI_ALLOWED or name.startswith(b"openai-"):
                keep((name, value))
        elif (
            name not in _NOT_UPSTREAM
            and not name.startswith(b"proxy-")
            and not (websocket and name.startswith(b"sec-websocket-"))
        ):
            keep((name, value))
    return head


# What an HTTP server may not send in a header value (uvicorn refuses it), though clients and
# servers accept it from an upstream: such characters are relayed as spaces.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's end-to-end headers without hop-by-hop ones (names come lower-cased)."""
    out = []
    for name, value in raw:
        if name not in _NOT_DOWNSTREAM and not name.startswith(b"access-control-"):
            if _CONTROL.search(value):
                value = _CONTROL.sub(b" ", value)
            out.append((name, value))
    return out
