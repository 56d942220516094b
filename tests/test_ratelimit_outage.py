"""Redis lost and found: fail open or closed while serving, one-line errors at start-up.

These tests run a Redis of their own (``redis-server`` on a free port, a temp dir, no
persistence) so that they can stop it; the shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from openai_forward.ratelimit import check_startup
from openai_forward.settings import ConfigError, Settings
from tests.support import free_port

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def timed_post(client: httpx.AsyncClient, key: str) -> tuple[int, float, httpx.Response]:
    start = time.monotonic()
    response = await client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {key}"})
    return response.status_code, time.monotonic() - start, response


@pytest.mark.redis
@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_redis_lost_while_serving_and_back(
    proxy_factory, upstream, redis_process, caplog, fail_open: bool
):
    caplog.set_level(logging.INFO, logger="openai_forward.ratelimit")
    redis = redis_process()
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        REQ_RATE_LIMIT_BACKEND=redis.url,
        GLOBAL_RATE_LIMIT="2/minute",
        RATE_LIMIT_FAIL_OPEN=str(fail_open).lower(),
        FORWARD_KEY="fk-before,fk-during,fk-after",  # three users
    )
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        assert [(await timed_post(client, "fk-before"))[0] for _ in range(3)] == [200, 200, 429]

        redis.stop()  # SIGTERM
        during = []
        for _ in range(4):  # spread over 1.5 s: the lost storage is tried more than once
            during.append(await timed_post(client, "fk-during"))
            await asyncio.sleep(0.5)
        expected = 200 if fail_open else 503
        assert [status for status, _, _ in during] == [expected] * 4
        assert max(seconds for _, seconds, _ in during) < 1.0  # no hang on the dead Redis
        if not fail_open:
            refused = during[0][2]
            assert refused.json()["error"]["type"] == "service_unavailable_error"
            assert refused.headers["retry-after"] == "1"
        lost = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
        assert len(lost) == 1  # at most one warning a minute
        assert lost[0].levelno == logging.WARNING
        assert ("admitting" if fail_open else "refusing") in lost[0].getMessage()
        # a user refused before the outage stays refused until its window is over
        assert (await timed_post(client, "fk-before"))[0] == 429

        redis.start()  # empty: the counters went with the old process
        after: list[int] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and after[-1:] != [429]:
            after.append((await timed_post(client, "fk-after"))[0])
            await asyncio.sleep(0.1)
    # limiting resumed by itself: two admitted on the new counters, then refused
    assert after[-3:] == [200, 200, 429], after
    if not fail_open:
        assert set(after[:-3]) <= {503}
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert len(upstream.requests) == (2 + 4 if fail_open else 2) + after.count(200)


def settings(**env: str) -> Settings:
    return Settings.from_env(env, env_file=None)


def test_startup_check_names_the_backend_and_hides_the_password():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as info:
        check_startup(settings(REQ_RATE_LIMIT_BACKEND=url, GLOBAL_RATE_LIMIT="1/second"))
    message = str(info.value)
    assert message.startswith("REQ_RATE_LIMIT_BACKEND='redis://:***@127.0.0.1:")
    assert "expected a reachable Redis" in message
    assert "hunter2" not in message and "\n" not in message


def test_startup_check_leaves_an_unused_backend_alone():
    url = f"redis://127.0.0.1:{free_port()}/0"
    check_startup(settings(REQ_RATE_LIMIT_BACKEND=url))  # no request limit: Redis unused
    check_startup(settings(REQ_RATE_LIMIT_BACKEND=url, GLOBAL_RATE_LIMIT="inf"))


@pytest.mark.redis
def test_startup_check_passes_with_a_reachable_redis(redis_process):
    redis = redis_process()
    check_startup(settings(REQ_RATE_LIMIT_BACKEND=redis.url, GLOBAL_RATE_LIMIT="1/second"))


def test_a_pace_of_zero_is_refused():
    with pytest.raises(ConfigError) as info:
        check_startup(settings(TOKEN_RATE_LIMIT='{"/v1/chat/completions": "0/second"}'))
    assert str(info.value).startswith("TOKEN_RATE_LIMIT='0/second'")


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"REQ_RATE_LIMIT_BACKEND": "redis://127.0.0.1:{port}/0"}, "REQ_RATE_LIMIT_BACKEND="),
        ({"TOKEN_RATE_LIMIT": '{"/v1/chat/completions": 20'}, "TOKEN_RATE_LIMIT="),
        ({"RATE_LIMIT_STRATEGY": "token-bucket"}, "RATE_LIMIT_STRATEGY='token-bucket'"),
        ({"GLOBAL_RATE_LIMIT": "5/fortnight"}, "GLOBAL_RATE_LIMIT='5/fortnight'"),
    ],
)
def test_aifd_run_stops_with_one_line(tmp_path: Path, env: dict[str, str], fragment: str):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))}
    full_env.update({"GLOBAL_RATE_LIMIT": "10/minute"})
    full_env.update({k: v.replace("{port}", str(free_port())) for k, v in env.items()})
    result = subprocess.run(
        [sys.executable, "-m", "openai_forward", "run", "--port", str(free_port())],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
