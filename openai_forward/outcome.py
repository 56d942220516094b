"""What became of one proxied request, told once to whoever listens when the request is done.

Metrics, audit logs or per-key accounting plug in here: a reporter is a plain callable that
gets every finished request's :class:`Outcome`, whatever way the request ended (relayed, answered
from the cache, refused by the proxy, failed upstream, abandoned by the client).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from openai_forward.types import Message, Send

logger = logging.getLogger("openai_forward")


@dataclass(slots=True)
class Outcome:
    method: str
    route: str  # the path as the client sent it (prefix included), without the query
    target: str  # the prefix of the target that served it
    started: float = field(default_factory=time.monotonic)
    status: int = 0  # 0: no response was started (the client left first)
    bytes_sent: int = 0  # body bytes handed to the server for the client
    duration: float = 0.0  # seconds, from the request's arrival to its end
    kind: str | None = None  # the API kind ("chat", "completion", "embedding", "responses")
    cache: str | None = None  # "HIT" or "MISS" where the response cache looked, else None
    retries: int = 0  # upstream attempts beyond the first
    client_left: bool = False  # the client hung up before the response was complete

    def counting(self, send: Send) -> Send:
        """``send``, noting the status and the body bytes that pass through it."""

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            else:
                self.bytes_sent += len(message.get("body", b""))
            await send(message)

        return send_and_count


Reporter = Callable[[Outcome], None]


def report(outcome: Outcome, reporters: Sequence[Reporter]) -> None:
    """Tell every reporter; one that fails is logged and does not stop the others."""
    outcome.duration = time.monotonic() - outcome.started
    for reporter in reporters:
        try:
            reporter(outcome)
        except Exception:
            logger.exception("A request reporter failed")
