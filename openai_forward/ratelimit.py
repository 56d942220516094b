"""Per-user request limits and stream pacing (SPEC §7). Not built yet: nothing is limited."""

from __future__ import annotations

from dataclasses import dataclass

from openai_forward.settings import Settings


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request over its limit: answered 429 with ``message`` and ``headers``."""

    message: str
    headers: list[tuple[bytes, bytes]]


class RequestLimiter:
    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def check(self, user: str, route: str) -> Refusal | None:
        """Count one request of ``user`` on ``route``; a :class:`Refusal` if it is over a limit."""
        return None


def build_limiter(settings: Settings) -> RequestLimiter | None:
    """The limiter for ``settings``, or None when no request limit is configured."""
    return None


def pacing_intervals(settings: Settings) -> dict[str, float]:
    """Seconds between two relayed SSE events, per client-visible route (``TOKEN_RATE_LIMIT``)."""
    return {}


def check_startup(settings: Settings) -> None:
    """Raise ``ConfigError`` if the configured backend cannot be used."""
