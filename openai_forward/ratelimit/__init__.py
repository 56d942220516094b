"""Per-user request limits and stream pacing.

- ``rules``: what is limited, from settings alone (pure).
- ``storage``: where counters live (in this process, or Redis through ``limits``' own Redis
  storage) and the strategy on them.
- ``limiter``: the :class:`RequestLimiter` the forwarder asks before a request goes upstream.
"""

from __future__ import annotations

from openai_forward.ratelimit.limiter import RequestLimiter
from openai_forward.ratelimit.rules import Refusal, Rules, pacing_intervals
from openai_forward.settings import ConfigError, Settings

__all__ = ["Refusal", "RequestLimiter", "build_limiter", "check_startup", "pacing_intervals"]


def build_limiter(settings: Settings) -> RequestLimiter | None:
    """The limiter for ``settings``, or None when no request limit is configured."""
    rules = Rules.from_settings(settings)
    return RequestLimiter(settings, rules) if rules else None


def check_startup(settings: Settings) -> None:
    """Raise ``ConfigError`` if the limits cannot work: a pace of zero, or a Redis backend
    that does not answer (only when request limits are configured, since only they use it)."""
    from limits import parse_many

    for limit in settings.token_rate_limit.values():
        if any(item.amount <= 0 for item in parse_many(limit)):
            raise ConfigError("TOKEN_RATE_LIMIT", limit, 'a pace above zero such as "20/second"')
    from openai_forward.ratelimit.storage import is_redis, ping_redis

    if Rules.from_settings(settings) and is_redis(settings.req_rate_limit_backend):
        ping_redis(settings.req_rate_limit_backend)
