"""What a Redis URL says reaches Redis, for the limiter and the REDIS cache alike, through the
proxy: the database, the password over a unix socket, TLS with a CA of our own; a frozen Redis
costs the cache one timeout; redis-py is needed, and imported, only for a Redis URL."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openai_forward import ratelimit
from openai_forward.settings import ConfigError, Settings
from tests import fake_openai
from tests.support import RedisProcess, free_port, need_redis_server

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "caching": True}


def settings(**env: str) -> Settings:
    return Settings.from_env(env, env_file=None)


def limited_and_cached(url: str) -> dict[str, str]:
    """Two requests a minute, and the chat cache, both on the Redis at ``url``."""
    return {
        "GLOBAL_RATE_LIMIT": "2/minute",
        "REQ_RATE_LIMIT_BACKEND": url,
        "CACHE_CHAT_COMPLETION": "true",
        "CACHE_BACKEND": "REDIS",
        "CACHE_ROOT_PATH_OR_URL": url,
    }


async def three_requests(proxy) -> list[tuple[int, str | None]]:
    """(status, x-cache) of three identical requests: with both features working, the second
    is a hit and the third is over the limit."""
    answers = []
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        for _ in range(3):
            response = await client.post(CHAT, json=BODY)
            answers.append((response.status_code, response.headers.get("x-cache")))
            await asyncio.sleep(0.1)  # the miss's answer is written in the background
    return answers


BOTH_WORK = [(200, "MISS"), (200, "HIT"), (429, None)]


def keys_by_database(port: int) -> dict[int, list[bytes]]:
    import redis

    found = {}
    for db in range(4):
        with redis.Redis(port=port, db=db) as client:
            found[db] = sorted(client.keys("openai-forward:*"))
    return found


def kinds(keys: list[bytes]) -> list[str]:
    return sorted({key.split(b":")[1].decode() for key in keys})


@pytest.mark.redis
async def test_the_database_of_the_url_is_used(proxy_factory, upstream, redis_process):
    fake_openai.install(upstream)
    redis = redis_process()
    url = f"redis://127.0.0.1:{redis.port}/3"
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, **limited_and_cached(url))
    assert await three_requests(proxy) == BOTH_WORK
    found = await asyncio.to_thread(keys_by_database, redis.port)
    assert kinds(found[3]) == ["cache", "limits"]
    assert found[0] == found[1] == found[2] == []


@pytest.mark.redis
async def test_password_from_the_url_over_a_unix_socket(
    proxy_factory, upstream, redis_process, tmp_path_factory
):
    fake_openai.install(upstream)
    sock = tmp_path_factory.mktemp("sock") / "r.sock"
    redis_process("--requirepass", "s3cret", "--unixsocket", str(sock))
    url = f"unix://:s3cret@{sock}?db=2"
    ratelimit.check_startup(settings(**limited_and_cached(url)))
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, **limited_and_cached(url))
    assert await three_requests(proxy) == BOTH_WORK

    def keys_in_2() -> list[bytes]:
        import redis

        with redis.Redis(unix_socket_path=str(sock), password="s3cret", db=2) as client:
            return client.keys("openai-forward:*")

    assert kinds(await asyncio.to_thread(keys_in_2)) == ["cache", "limits"]
    with pytest.raises(ConfigError) as refused:
        ratelimit.check_startup(settings(**limited_and_cached(f"unix://:nope@{sock}?db=2")))
    message = str(refused.value)
    assert message.startswith("REQ_RATE_LIMIT_BACKEND='unix://:***@")
    assert "reachable Redis" in message and "nope" not in message


@pytest.fixture
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server serving TLS only (``rediss://``), with a certificate for 127.0.0.1 from
    a CA of its own (``ca_file``), which nothing trusts unless told."""
    need_redis_server()
    server = RedisProcess(tmp_path_factory.mktemp("redis-tls"), tls=True)
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.mark.redis
@pytest.mark.parametrize("trust", ["ssl_ca_certs", "SSL_CERT_FILE"])
async def test_rediss_with_a_ca_of_our_own(
    proxy_factory, upstream, tls_redis: RedisProcess, monkeypatch, trust: str
):
    fake_openai.install(upstream)
    url = tls_redis.url
    with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED"):
        ratelimit.check_startup(settings(**limited_and_cached(url)))  # not trusted yet
    if trust == "ssl_ca_certs":
        url += f"?ssl_ca_certs={tls_redis.ca_file}"
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_redis.ca_file))
    ratelimit.check_startup(settings(**limited_and_cached(url)))
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, **limited_and_cached(url))
    assert await three_requests(proxy) == BOTH_WORK


@pytest.mark.redis
async def test_a_frozen_redis_costs_the_cache_one_timeout(
    proxy_factory, upstream, redis_process, caplog
):
    caplog.set_level(logging.WARNING, logger="openai_forward")
    fake_openai.install(upstream)
    redis = redis_process()
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        CACHE_CHAT_COMPLETION="true",
        CACHE_BACKEND="REDIS",
        CACHE_ROOT_PATH_OR_URL=redis.url,
    )
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:

        async def timed() -> tuple[str, float]:
            start = time.monotonic()
            response = await client.post(CHAT, json=BODY)
            assert response.status_code == 200
            return response.headers["x-cache"], time.monotonic() - start

        assert (await timed())[0] == "MISS"
        await asyncio.sleep(0.1)  # the answer is written in the background
        assert (await timed())[0] == "HIT"
        redis.freeze()  # SIGSTOP: connections stay open, nothing answers
        try:
            state, waited = await timed()
            assert state == "MISS" and waited < 3.0  # one read timeout (2 s), not a hang
            state, at_once = await timed()
            assert state == "MISS" and at_once < 0.5  # the cache steps aside meanwhile
        finally:
            redis.thaw()
        await asyncio.sleep(3.1)  # it steps aside for 3 s after a failure
        assert (await timed())[0] == "HIT"  # the entry written before the freeze
    assert len(upstream.requests) == 3
    failures = [r.getMessage() for r in caplog.records if "Cache read on REDIS" in r.getMessage()]
    assert len(failures) == 1 and "(TimeoutError: no answer from Redis in 2 s)" in failures[0]


def test_redis_py_is_imported_only_for_a_redis_url():
    script = """
import asyncio, sys
from openai_forward import cache, ratelimit
from openai_forward.app import create_app
from openai_forward.settings import Settings

env = {"GLOBAL_RATE_LIMIT": "2/minute", "CACHE_CHAT_COMPLETION": "true"}
settings = Settings.from_env(env, env_file=None)
ratelimit.check_startup(settings)
cache.check_startup(settings)
create_app(settings)

async def main():
    limiter = ratelimit.build_limiter(settings)
    await limiter.open()
    assert await limiter.check("u", "/v1/chat/completions") is None
    await limiter.close()

asyncio.run(main())
print(sorted(name for name in sys.modules if name.split(".")[0] in ("redis", "hiredis")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("variable", ["REQ_RATE_LIMIT_BACKEND", "CACHE_ROOT_PATH_OR_URL"])
def test_without_redis_py_a_redis_url_stops_start_up_with_one_line(tmp_path: Path, variable):
    # "aifd run" in a Python where "import redis" fails
    script = "import sys; sys.modules['redis'] = None; from openai_forward.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))}
    env[variable] = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    if variable == "REQ_RATE_LIMIT_BACKEND":
        env["GLOBAL_RATE_LIMIT"] = "10/minute"
    else:
        env.update(CACHE_CHAT_COMPLETION="true", CACHE_BACKEND="REDIS")
    result = subprocess.run(
        [sys.executable, "-c", script, "run", "--port", str(free_port())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith('pip install "openai-forward[redis]"'), lines[0]
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
