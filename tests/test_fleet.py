"""A fleet: two ``aifd run`` instances sharing Redis, behind nginx with ``deploy/nginx.conf``
(the file docker-compose.yaml mounts; its upstream servers and port replaced by local ones).

- A limit admits exactly its number across both instances.
- An answer cached through one instance is a hit through the other.
- Streams pass nginx unbuffered; the client's X-Forwarded-For reaches the instances and is
  believed from nginx (FORWARDED_ALLOW_IPS), so each client is limited on its own.
- When one instance is killed, nginx sends its requests to the other: the GETs in flight on it
  are retried there, and every new request (POST too: nothing was sent) is served. A POST in
  flight on the killed instance is not retried (it may have been billed): nginx answers 502.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import RecordingUpstream
from tests.deploy_helpers import (
    CHAT,
    Aifd,
    Nginx,
    answer_text,
    chat_body,
    local_site,
    need_nginx,
    read_stream,
    slow_models,
    streaming_chat,
)
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 5


def user(n: int) -> dict[str, str]:
    """A client of its own, as nginx passes it on: the address in X-Forwarded-For."""
    return {"X-Forwarded-For": f"10.0.0.{n}"}


def upstream_counts(nginx: Nginx, method: str, path: str) -> dict[str, int]:
    """How many requests for ``path`` each instance answered (nginx's access log)."""
    counts: dict[str, int] = {}
    for line in nginx.access_log():
        request_method, uri, _, addresses = line.split(" ", 4)[:4]
        if request_method == method and uri.split("?")[0] == path:
            counts[addresses] = counts.get(addresses, 0) + 1
    return counts


@pytest.mark.redis
@pytest.mark.slow
async def test_two_instances_behind_nginx_share_limits_and_cache_and_survive_a_kill(
    upstream: RecordingUpstream, redis_server, tmp_path: Path
):
    need_nginx()
    upstream.route(CHAT, streaming_chat)
    upstream.route("/v1/models", slow_models)
    dotenv = {
        "OPENAI_BASE_URL": upstream.url,
        "REQ_RATE_LIMIT": orjson.dumps({CHAT: f"{LIMIT}/minute"}).decode(),
        "REQ_RATE_LIMIT_BACKEND": redis_server.url,
        "REDIS_KEY_PREFIX": redis_server.prefix,
        "CACHE_CHAT_COMPLETION": "true",
        "CACHE_BACKEND": "REDIS",
        "CACHE_ROOT_PATH_OR_URL": redis_server.url,
        "FORWARDED_ALLOW_IPS": "127.0.0.1",
        "SHUTDOWN_TIMEOUT": "2",
    }
    a = Aifd(tmp_path / "a", dotenv)
    b = Aifd(tmp_path / "b", dotenv)
    nginx: Nginx | None = None
    try:
        port = free_port()
        site = local_site((ROOT / "deploy" / "nginx.conf").read_text(), [a.port, b.port], port)
        nginx = Nginx(tmp_path / "nginx", site, port)
        await asyncio.gather(a.wait_healthy(), b.wait_healthy())
        await nginx.wait_ready()
        # Fresh connections: every request is a new connection through nginx.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            await check_shared_limit(client, nginx, upstream)
            await check_shared_cache(client, a, b, upstream, redis_server)
            await check_unbuffered_stream(client, nginx)
            await check_kill(client, nginx, a, b)
    finally:
        for instance in (a, b):
            instance.kill_all()
        if nginx is not None:
            nginx.stop()


async def check_shared_limit(client: httpx.AsyncClient, nginx: Nginx, upstream: RecordingUpstream):
    before = len(upstream.requests)
    responses = await asyncio.gather(
        *(
            client.post(f"{nginx.url}{CHAT}", json=chat_body(stream=False), headers=user(1))
            for _ in range(12)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * LIMIT + [429] * (12 - LIMIT), statuses
    assert len(upstream.requests) - before == LIMIT
    # Both instances answered some of them: they counted together.
    served = upstream_counts(nginx, "POST", CHAT)
    assert len(served) == 2, served
    # Another client (another X-Forwarded-For) has a budget of its own.
    other = await client.post(f"{nginx.url}{CHAT}", json=chat_body(stream=False), headers=user(2))
    assert other.status_code == 200


async def check_shared_cache(
    client: httpx.AsyncClient, a: Aifd, b: Aifd, upstream: RecordingUpstream, redis_server
):
    import redis.asyncio as aioredis

    body = chat_body(stream=False, content="cache me", caching=True)
    first = await client.post(f"{a.url}{CHAT}", json=body)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    # The answer is written to Redis just after it was sent: wait for the key.
    store = aioredis.from_url(redis_server.url)
    try:
        deadline = time.monotonic() + 5
        while not [k async for k in store.scan_iter(match=f"{redis_server.prefix}:cache:*")]:
            assert time.monotonic() < deadline, "no cache entry in Redis"
            await asyncio.sleep(0.02)
    finally:
        await store.aclose()
    before = len(upstream.requests)
    second = await client.post(f"{b.url}{CHAT}", json=body)
    assert second.status_code == 200 and second.headers["x-cache"] == "HIT"
    assert second.json()["choices"][0]["message"]["content"] == answer_text(20)
    # ... also as a stream, from the other instance.
    streamed = await read_stream(
        client, f"{b.url}{CHAT}", {**body, "stream": True}, asyncio.Event()
    )
    assert streamed.done
    assert len(upstream.requests) == before


async def check_unbuffered_stream(client: httpx.AsyncClient, nginx: Nginx):
    """10 events 0.2 s apart: the first reaches the client long before the last is sent."""
    began = time.monotonic()
    first_at = None
    async with client.stream(
        "POST", f"{nginx.url}{CHAT}?events=10&interval=0.2", json=chat_body(), headers=user(3)
    ) as response:
        assert response.status_code == 200
        body = b""
        async for data in response.aiter_raw():
            first_at = first_at or time.monotonic() - began
            body += data
    assert body.rstrip().endswith(b"data: [DONE]")
    assert first_at is not None and first_at < 1.0, f"first bytes after {first_at:.2f} s"


async def check_kill(client: httpx.AsyncClient, nginx: Nginx, a: Aifd, b: Aifd):
    # In flight when A dies: GETs (the upstream answers after 1.5 s) and POSTs, spread over
    # both instances by nginx's round robin.
    gets = [
        asyncio.create_task(client.get(f"{nginx.url}/v1/models?delay=1.5&n={i}")) for i in range(6)
    ]
    posts = [
        asyncio.create_task(
            client.post(
                f"{nginx.url}{CHAT}?delay=1.5&p={i}",
                json=chat_body(stream=False),
                headers=user(10 + i),
            )
        )
        for i in range(4)
    ]
    await asyncio.sleep(0.7)  # all of them have reached an instance (and the upstream)
    a.kill_all()
    gotten = await asyncio.gather(*gets)
    posted = await asyncio.gather(*posts)
    assert [r.status_code for r in gotten] == [200] * 6

    # A POST that reached A is not retried: 502. One that went to B is served.
    a_addr = f"127.0.0.1:{a.port}"
    for i, response in enumerate(posted):
        line = next(x for x in nginx.access_log() if f"p={i} " in x)
        went_to_a = f'"{a_addr}"' in line
        assert response.status_code == (502 if went_to_a else 200), line
    # The killed instance did have GETs in flight: nginx retried them on B.
    retried = [
        x for x in nginx.access_log() if x.startswith("GET /v1/models") and f"{a_addr}, " in x
    ]
    assert retried, nginx.access_log()

    # After the kill every request is served by B, POSTs included (A refuses the connection:
    # nothing was sent, so nginx may try B).
    after = await asyncio.gather(
        *(client.get(f"{nginx.url}/v1/models") for _ in range(5)),
        *(
            client.post(f"{nginx.url}{CHAT}", json=chat_body(stream=False), headers=user(30 + i))
            for i in range(5)
        ),
    )
    assert [r.status_code for r in after] == [200] * 10
    assert b.process.poll() is None
