"""ASGI type aliases (kept loose: the messages are plain dicts)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The scope key an app sets when it returns in the middle of a response on purpose, so that the
# server closes the connection without logging an error (see openai_forward.protocol).
CUT = "openai_forward.cut"

# The scope key of a function the server offers to be told when the client hangs up before the
# response is complete, without a task waiting on ``receive()``: ``watch(callback)`` registers
# the callback (called at most once), ``watch(None)`` withdraws it (see openai_forward.protocol).
HANG_UP = "openai_forward.hang_up"
HangUpHook = Callable[[Callable[[], None] | None], None]
