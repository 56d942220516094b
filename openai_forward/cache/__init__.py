"""The response cache (SPEC §8). Not built yet: every request is a miss."""

from __future__ import annotations

from collections.abc import Sequence

from openai_forward.exchange import Call, CallKind, Headers, Observer
from openai_forward.settings import Settings
from openai_forward.types import Send


class Ticket:
    """One call's use of the cache: a stored ``answer`` to replay, or an observer that stores
    the upstream's answer. ``release`` ends the call's claim (single flight) and is idempotent."""

    answer: object | None = None

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


class ResponseCache:
    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def watches(self, kind: CallKind) -> bool:
        return False

    async def begin(self, call: Call) -> Ticket | None:
        """The call's ticket (may wait for an identical call in flight), or None when this call
        may not use the cache. May rewrite ``call.body`` (it drops the ``caching`` field)."""
        return None


def build_cache(settings: Settings) -> ResponseCache | None:
    return None


def check_startup(settings: Settings) -> None:
    """Raise ``ConfigError`` if the configured backend or its driver cannot be used."""
