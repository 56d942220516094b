"""What is limited, decided from settings alone (no I/O): the limit items of each route, the
route a request is counted under, stream pacing intervals, and the shape of a refusal."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from openai_forward.settings import Settings

if TYPE_CHECKING:
    from limits import RateLimitItem

Items = tuple["RateLimitItem", ...]
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request that must not go upstream: answered with ``status``, ``message``, ``headers``."""

    message: str
    headers: Headers
    status: int = 429


UNAVAILABLE = Refusal(
    "Rate limiting is temporarily unavailable; try again later", [(b"retry-after", b"1")], 503
)


@dataclass(frozen=True, slots=True)
class Rules:
    """Parsed once at start-up: the per-request work is one dict lookup."""

    routes: Mapping[str, Items] = field(default_factory=dict)  # REQ_RATE_LIMIT
    default: Items = ()  # GLOBAL_RATE_LIMIT for every other route; () is unlimited

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        default = settings.global_rate_limit
        if not (settings.req_rate_limit or default):
            return cls()  # (limits is imported only where limits are configured)
        from limits import parse_many

        routes = {r: tuple(parse_many(limit)) for r, limit in settings.req_rate_limit.items()}
        return cls(routes, tuple(parse_many(default)) if default else ())

    def __bool__(self) -> bool:
        return bool(self.default) or any(self.routes.values())

    def for_route(self, route: str) -> tuple[str, Items]:
        """The route a request is counted under, and the limits that apply to it."""
        items = self.routes.get(route)
        if items is not None:
            return route, items
        route = canonical_route(route)
        return route, self.routes.get(route, self.default)


def canonical_route(route: str) -> str:
    """The route as the upstream understands it, so that ``/v1/chat/complet%69ons`` or a
    trailing slash cannot slip past the limit of ``/v1/chat/completions``."""
    if "%" in route:
        # The forwarder decoded the raw path as latin-1; decode escapes the same way.
        route = unquote(route, encoding="latin-1")
    if len(route) > 1 and route.endswith("/"):
        route = route.rstrip("/") or "/"
    return route


def refusal(item: RateLimitItem, reset_at: float, remaining: int, now: float) -> Refusal:
    """The 429 for a request refused by ``item``, whose window resets at epoch ``reset_at``.

    ``Retry-After`` is whole seconds to wait (at least 1); ``X-RateLimit-Reset`` is the epoch
    second of the reset (the convention of ``limits``' own web integrations).
    """
    wait = max(1, math.ceil(reset_at - now))
    reset = math.ceil(max(reset_at, now))
    return Refusal(
        f"Rate limit exceeded: {item}",
        [
            (b"retry-after", b"%d" % wait),
            (b"x-ratelimit-limit", b"%d" % item.amount),
            (b"x-ratelimit-remaining", b"%d" % max(0, remaining)),
            (b"x-ratelimit-reset", b"%d" % reset),
        ],
    )


def pacing_intervals(settings: Settings) -> dict[str, float]:
    """Seconds between two relayed SSE events, per client-visible route (``TOKEN_RATE_LIMIT``).

    ``"20/second"`` is 0.05 s; with several limits (``"20/second;600/minute"``) the slowest
    pace wins, so every one of them holds.
    """
    intervals: dict[str, float] = {}
    if not settings.token_rate_limit:
        return intervals
    from limits import parse_many

    for route, limit in settings.token_rate_limit.items():
        paces = [i.get_expiry() / i.amount for i in parse_many(limit) if i.amount > 0]
        if paces:
            intervals[route] = max(paces)
    return intervals
