"""What the features (limits, cache, chat log) see of a proxied call, and the hooks they offer.

The forwarder builds a :class:`Call` only for the routes a feature watches, parsing the JSON body
once; on every other request nothing here is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from openai_forward.kinds import Kind, kind_of
from openai_forward.settings import Target

CallKind = Kind  # an entry of the registry of API kinds (:mod:`openai_forward.kinds`)
Headers = list[tuple[bytes, bytes]]

# The kind of an OpenAI route (``/v1/chat/completions``), or None: the forwarder's question.
call_kind = kind_of

# Why an answer did not reach the client whole: ``Observer.close``'s ``reason`` (the chat log's
# ``reason`` field). A fixed vocabulary, documented in docs/chatlog.md.
CLIENT_LEFT = "client left"  # the client hung up (also the message of the task's cancellation)
SHUTDOWN = "shutdown"  # cut by a shutdown that outlasted the graceful timeout
UPSTREAM_BROKE_OFF = "upstream broke off"  # reset or closed mid-body
UPSTREAM_TIMED_OUT = "upstream timed out"  # silent past READ_TIMEOUT (before or after its head)
NO_ANSWER = "no answer"  # the upstream could not be reached or sent no usable head (a 502)
PROXY_ERROR = "proxy error"  # a defect of the proxy (logged with its traceback)


@dataclass(slots=True)
class Call:
    """One request of a known API kind (chat, completion, embedding, responses) with a JSON
    object body."""

    target: Target
    kind: Kind
    route: str  # as the client sees it: prefix + rest, no query
    # the parsed body as the client sent it; never changed once parsed: the chat log's writer
    # thread reads it after the call (a feature that needs another body rewrites ``body``)
    payload: dict[str, Any]
    body: bytes  # the body sent upstream (a feature may rewrite it, e.g. drop "caching")
    client: str  # client address ("" when no feature that sees the call needs it)
    user: str | None  # hashed forward key, if the client sent one
    uid: str = ""  # set by the chat log
    query: bytes = b""  # the raw query string (part of the cache key)
    # The answer as one JSON document, when the cache assembled one from a whole stream (its
    # entry); the chat log then reads that instead of assembling the stream a second time.
    assembled: bytes | None = None

    @property
    def stream(self) -> bool:
        return self.payload.get("stream") is True


class Observer(Protocol):
    """Sees the upstream's answer as it is relayed (for the cache and the chat log).

    ``start`` comes first with the status and headers; ``feed`` gets every body chunk; ``close``
    comes last, once, with ``complete=True`` only if the whole body reached the client, and
    otherwise, when the caller knows it, the ``reason`` (one of the names above). ``start`` and
    ``feed`` are skipped when no response came. Observers must be cheap and must never raise.
    """

    def start(self, status: int, headers: Headers) -> None: ...

    def feed(self, chunk: bytes) -> None: ...

    def close(self, complete: bool, reason: str | None = None) -> None: ...


class Resource(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...
