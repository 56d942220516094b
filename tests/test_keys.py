"""Keys through the real server: swapping, rotation, open mode, cool-down."""

from __future__ import annotations

import httpx
from aiohttp import web

from openai_forward.auth import KeyPool
from openai_forward.settings import Secret
from tests.conftest import RecordingUpstream


async def _auths(proxy, upstream: RecordingUpstream, sends: list[str | None]) -> list[str | None]:
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for auth in sends:
            headers = {"Authorization": auth} if auth is not None else {}
            r = await client.post("/v1/chat/completions", json={}, headers=headers)
            assert r.status_code == 200
            assert "sk-real" not in r.text
    return [rec.headers.get("Authorization") for rec in upstream.requests]


async def test_forward_key_swapped_unknown_key_unchanged_no_key_none(proxy_factory, upstream):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real-1", FORWARD_KEY="fk-a,fk-b"
    )
    seen = await _auths(
        proxy, upstream, ["Bearer fk-a", "Bearer fk-b", "Bearer sk-users-own", None, "bearer fk-a"]
    )
    assert seen == [
        "Bearer sk-real-1",
        "Bearer sk-real-1",
        "Bearer sk-users-own",
        None,
        "Bearer sk-real-1",
    ]


async def test_rotation_order(proxy_factory, upstream):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        OPENAI_API_KEY="sk-real-1,sk-real-2,sk-real-3",
        FORWARD_KEY="fk",
    )
    seen = await _auths(proxy, upstream, ["Bearer fk"] * 7)
    assert seen == [f"Bearer sk-real-{i}" for i in (1, 2, 3, 1, 2, 3, 1)]


async def test_open_mode_uses_real_key_with_or_without_client_key(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real-1")
    seen = await _auths(proxy, upstream, [None, "Bearer whatever"])
    assert seen == ["Bearer sk-real-1", "Bearer sk-real-1"]


async def test_key_answered_429_cools_down_and_other_key_serves(proxy_factory, upstream):
    async def limited(request: web.Request) -> web.Response:
        if request.headers["Authorization"] == "Bearer sk-real-1":
            return web.json_response({"error": {"message": "quota"}}, status=429)
        return web.json_response({"ok": True})

    upstream.route("/v1/chat/completions", limited)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real-1,sk-real-2", FORWARD_KEY="fk"
    )
    seen = await _auths(proxy, upstream, ["Bearer fk"] * 3)
    # first request: key 1 refused, retried at once with key 2; then key 1 sits out
    assert seen == ["Bearer sk-real-1", "Bearer sk-real-2", "Bearer sk-real-2", "Bearer sk-real-2"]


async def test_key_answered_401_is_set_aside(proxy_factory, upstream):
    async def auth(request: web.Request) -> web.Response:
        if request.headers["Authorization"] == "Bearer sk-real-2":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"ok": True})

    upstream.route("/v1/chat/completions", auth)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real-1,sk-real-2", FORWARD_KEY="fk"
    )
    seen = await _auths(proxy, upstream, ["Bearer fk"] * 4)
    assert (
        seen
        == ["Bearer sk-real-1", "Bearer sk-real-2", "Bearer sk-real-1"] + ["Bearer sk-real-1"] * 2
    )


async def test_own_key_401_is_relayed(proxy_factory, upstream):
    async def auth(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Incorrect API key"}}, status=401)

    upstream.route("/v1/models", auth)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.get("/v1/models", headers={"Authorization": "Bearer sk-bad"})
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "Incorrect API key"
    assert len(upstream.requests) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pool_rotation_bench_and_soonest_free():
    clock = FakeClock()
    pool = KeyPool([Secret("a"), Secret("b"), Secret("c")], clock=clock)
    assert [pool.acquire() for _ in range(4)] == [0, 1, 2, 0]
    pool.bench(1, 30)
    assert [pool.acquire() for _ in range(3)] == [2, 0, 2]
    pool.bench(0, 10)
    pool.bench(2, None)
    assert pool.acquire() == 0  # all set aside: the one free soonest
    clock.now += 11
    assert pool.acquire() == 0
    clock.now += 20
    assert [pool.acquire() for _ in range(2)] == [1, 0]
    assert pool.header(1) == b"Bearer b"
    assert "b" not in repr(Secret("b"))
