"""The pure parts of the limits: rules from settings, routes, refusals, pacing, the memory
counters' expiry, and the banner rows."""

from __future__ import annotations

import asyncio
import io

import pytest
from limits import parse
from rich.console import Console

from openai_forward.banner import print_banner
from openai_forward.ratelimit import build_limiter, pacing_intervals
from openai_forward.ratelimit.memory import MemoryCounters
from openai_forward.ratelimit.rules import Rules, canonical_route, refusal
from openai_forward.settings import Settings, redacted


def settings(**env: str) -> Settings:
    return Settings.from_env(env, env_file=None)


@pytest.mark.parametrize(
    "route, canonical",
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("/v1/chat/complet%69ons", "/v1/chat/completions"),
        ("/v1/chat%2Fcompletions", "/v1/chat/completions"),
        ("/openai/v1/%E4", "/openai/v1/\xe4"),  # latin-1, like the forwarder's raw path
        ("/", "/"),
        ("//", "/"),
    ],
)
def test_canonical_route(route: str, canonical: str):
    assert canonical_route(route) == canonical


def test_rules_pick_the_route_limits_else_the_global_ones():
    rules = Rules.from_settings(
        settings(
            REQ_RATE_LIMIT='{"/v1/chat/completions": "2/second;9/hour"}',
            GLOBAL_RATE_LIMIT="5/minute",
        )
    )
    route, items = rules.for_route("/v1/chat/complet%69ons/")
    assert route == "/v1/chat/completions"
    assert [str(i) for i in items] == ["2 per 1 second", "9 per 1 hour"]
    assert rules.for_route("/v1/models") == ("/v1/models", (parse("5/minute"),))
    unlimited = Rules.from_settings(settings(REQ_RATE_LIMIT='{"/v1/x": "1/second"}'))
    assert unlimited.for_route("/v1/models") == ("/v1/models", ())


def test_no_limit_configured_means_no_limiter():
    assert build_limiter(settings()) is None
    assert build_limiter(settings(GLOBAL_RATE_LIMIT="inf")) is None
    assert build_limiter(settings(TOKEN_RATE_LIMIT='{"/v1/x": "5/second"}')) is None
    assert build_limiter(settings(GLOBAL_RATE_LIMIT="1/second")) is not None


def test_refusal_message_and_headers():
    item = parse("3/minute")
    refused = refusal(item, reset_at=1_000_041.2, remaining=0, now=1_000_000.5)
    assert refused.status == 429
    assert refused.message == "Rate limit exceeded: 3 per 1 minute"
    assert dict(refused.headers) == {
        b"retry-after": b"41",
        b"x-ratelimit-limit": b"3",
        b"x-ratelimit-remaining": b"0",
        b"x-ratelimit-reset": b"1000042",
    }
    # a window that is just over still asks for a wait of one second
    late = dict(refusal(item, reset_at=999_999.0, remaining=-2, now=1_000_000.5).headers)
    assert late[b"retry-after"] == b"1" and late[b"x-ratelimit-remaining"] == b"0"


def test_pacing_intervals():
    env = '{"/v1/chat/completions": "20/second", "/v1/completions": "20/second;600/minute"}'
    assert pacing_intervals(settings(TOKEN_RATE_LIMIT=env)) == {
        "/v1/chat/completions": 0.05,
        "/v1/completions": 0.1,  # the slowest pace of the two
    }
    assert pacing_intervals(settings()) == {}


async def test_memory_counters_forget_expired_keys():
    storage = MemoryCounters()
    for i in range(1000):
        await storage.incr(f"fixed-{i}", 1)
        await storage.acquire_entry(f"moving-{i}", 5, 1)
    assert await storage.get("fixed-7") == 1
    assert (await storage.get_moving_window("moving-7", 5, 1))[1] == 1
    await asyncio.sleep(1.05)
    assert await storage.incr("fresh", 10) == 1
    assert await storage.get("fixed-7") == 0
    assert (await storage.get_moving_window("moving-7", 5, 1))[1] == 0
    # nothing of the expired keys is kept: memory does not grow with past users
    assert len(storage._expires) == len(storage._deadlines) == 1


async def test_memory_counters_elastic_expiry_moves_back():
    storage = MemoryCounters()
    await storage.incr("k", 1)
    first = await storage.get_expiry("k")
    await asyncio.sleep(0.05)
    await storage.incr("k", 1)
    assert await storage.get_expiry("k") == first  # plain: fixed from the first hit
    await storage.incr("k", 1, elastic=True)
    assert await storage.get_expiry("k") >= first + 0.05


def test_redacted_hides_only_the_password():
    assert redacted("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"
    assert redacted("memory://") == "memory://"


def banner(env: dict[str, str], workers: int) -> str:
    out = io.StringIO()
    print_banner(settings(**env), workers, Console(file=out, width=200))
    return out.getvalue()


def test_banner_rows():
    text = banner(
        {
            "REQ_RATE_LIMIT": '{"/v1/chat/completions": "3/minute"}',
            "GLOBAL_RATE_LIMIT": "100/hour",
            "RATE_LIMIT_STRATEGY": "moving-window",
            "REQ_RATE_LIMIT_BACKEND": "redis://:s3cret@127.0.0.1:6379/0",
            "RATE_LIMIT_FAIL_OPEN": "false",
            "TOKEN_RATE_LIMIT": '{"/v1/chat/completions": "20/second"}',
        },
        workers=4,
    )
    rows = {" ".join(line.strip("│ ").split()) for line in text.splitlines()}
    for row in (
        "backend redis://:***@127.0.0.1:6379/0",
        "strategy moving-window",
        "global rate limit 100/hour",
        "storage down refuse (fail closed)",
        "/v1/chat/completions (req) 3/minute",
        "/v1/chat/completions (token) 20/second",
    ):
        assert row in rows, text
    assert "s3cret" not in text and "counts alone" not in text

    memory = banner({"GLOBAL_RATE_LIMIT": "100/hour"}, workers=2)
    assert "memory:// with 2 workers: each worker counts alone" in memory
    assert "storage down" not in memory
    assert "counts alone" not in banner({"GLOBAL_RATE_LIMIT": "100/hour"}, workers=1)
