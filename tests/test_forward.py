"""The forwarding core over real sockets: our uvicorn server, a recording aiohttp upstream."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import httpx
import orjson
import pytest
from aiohttp import web

from openai_forward import forward
from tests.conftest import ProxyServer, RecordingUpstream
from tests.support import free_port


def sse_handler(events: list[bytes], delay: float = 0.0, done: bool = True):
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            if delay:
                await asyncio.sleep(delay)
        if done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handler


async def test_json_body_and_query_identity(proxy: ProxyServer, upstream: RecordingUpstream):
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo"}]})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.post(
            "/v1/chat/completions?api-version=2&x=%20y",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 200
    assert r.json() == {"echo": "/v1/chat/completions?api-version=2&x=%20y", "size": len(body)}
    seen = upstream.requests[-1]
    assert seen.method == "POST" and seen.body == body


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
async def test_every_method(proxy: ProxyServer, upstream: RecordingUpstream, method: str):
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.request(method, "/v1/files/f-1")
    assert r.status_code == 200
    assert upstream.requests[-1].method == method
    assert upstream.requests[-1].path_qs == "/v1/files/f-1"


async def test_sse_identity(proxy: ProxyServer, upstream: RecordingUpstream):
    events = [b'data: {"n": %d, "x": "\\u4f60"}\n\n' % i for i in range(30)]
    upstream.route("/v1/chat/completions", sse_handler(events))
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.post("/v1/chat/completions", json={"stream": True})
    assert r.content == b"".join(events) + b"data: [DONE]\n\n"
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"


async def test_binary_download_identity(proxy: ProxyServer, upstream: RecordingUpstream):
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def speech(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await response.prepare(request)
        for i in range(0, len(payload), 100_000):
            await response.write(payload[i : i + 100_000])
        await response.write_eof()
        return response

    upstream.route("/v1/audio/speech", speech)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.post("/v1/audio/speech", json={"input": "hi"})
    assert r.headers["content-type"] == "audio/mpeg"
    assert r.content == payload


async def test_first_event_arrives_while_upstream_still_sending(
    proxy: ProxyServer, upstream: RecordingUpstream
):
    finished_at: list[float] = []
    base = sse_handler([b"data: %d\n\n" % i for i in range(5)], delay=0.3)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await base(request)
        finished_at.append(time.monotonic())
        return response

    upstream.route("/v1/chat/completions", handler)
    async with (
        httpx.AsyncClient(base_url=proxy.url) as client,
        client.stream("POST", "/v1/chat/completions", json={"stream": True}) as r,
    ):
        arrivals = []
        async for chunk in r.aiter_raw():
            arrivals.append((time.monotonic(), chunk))
    first_at = arrivals[0][0]
    assert arrivals[0][1].startswith(b"data: 0")
    assert finished_at and first_at < finished_at[0] - 1.0  # upstream still had >1 s to go
    assert len(arrivals) >= 5


async def test_upstream_error_relayed_with_body_and_headers(
    proxy_factory, upstream: RecordingUpstream
):
    async def bad(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "model not found", "code": "model_not_found"}},
            status=404,
            headers={
                "x-request-id": "req-42",
                "x-ratelimit-remaining-requests": "99",
                "openai-processing-ms": "12",
                "Set-Cookie": "track=1",
                "Retry-After": "3",
            },
        )

    upstream.route("/v1/models/nope", bad)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["x-ratelimit-remaining-requests"] == "99"
    assert r.headers["openai-processing-ms"] == "12"
    assert r.headers["retry-after"] == "3"
    assert "set-cookie" not in r.headers


async def test_upstream_down_gives_502_quickly(proxy_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = proxy_factory(OPENAI_BASE_URL=dead, OPENAI_API_KEY="sk-secret-real", MAX_RETRIES=2)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.post("/v1/chat/completions", json={})
    elapsed = time.monotonic() - started
    assert r.status_code == 502
    error = r.json()["error"]
    assert dead in error["message"]
    assert "sk-secret-real" not in r.text
    assert elapsed < 3  # 0.2 + 0.4 s of backoff, no long wait


async def test_silent_upstream_gives_504_after_read_timeout(proxy_factory, upstream):
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    upstream.route("/v1/chat/completions", silent)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, READ_TIMEOUT=0.5)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.post("/v1/chat/completions", json={})
    elapsed = time.monotonic() - started
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "upstream_error"
    assert 0.5 <= elapsed < 2.5
    assert len(upstream.requests) == 1  # a silent upstream is not asked again


async def test_stream_stalling_mid_body_is_cut_without_done(proxy_factory, upstream):
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await asyncio.sleep(5)
        return response

    upstream.route("/v1/chat/completions", stalls)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, READ_TIMEOUT=0.5)
    received = b""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/chat/completions", json={}) as r:
                async for chunk in r.aiter_raw():
                    received += chunk
    assert received == b"data: 1\n\n"
    assert time.monotonic() - started < 3


async def test_truncated_stream_is_cut_without_done(proxy: ProxyServer, upstream):
    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await asyncio.sleep(0.1)
        request.transport.close()  # type: ignore[union-attr]
        return response

    upstream.route("/v1/chat/completions", truncated)
    received = b""
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/chat/completions", json={}) as r:
                async for chunk in r.aiter_raw():
                    received += chunk
    assert received == b"data: 1\n\n"
    assert b"[DONE]" not in received


async def test_client_disconnect_frees_upstream_connection(proxy: ProxyServer, upstream):
    upstream_closed = asyncio.Event()
    closed_at: list[float] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(600):
                await response.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.5)
        except (ConnectionResetError, asyncio.CancelledError):
            closed_at.append(time.monotonic())
            upstream_closed.set()
            raise
        return response

    upstream.route("/v1/chat/completions", endless)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"data: 0"), 5)
    assert b"200 OK" in head
    writer.close()
    hung_up_at = time.monotonic()
    await asyncio.wait_for(upstream_closed.wait(), 2)
    assert closed_at[0] - hung_up_at < 1.0


async def test_client_disconnect_while_waiting_for_headers(proxy: ProxyServer, upstream):
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    upstream.route("/v1/chat/completions", slow)
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    while not upstream.requests:
        await asyncio.sleep(0.01)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 1.0)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E%2fadmin",
        "/v1/..%2fadmin",
        "//evil.example/x",
        "/v1//evil.example",
        "/v1/./models",
        "/v1/a%5c..%5cb",
        "/v1/%00",
    ],
)
async def test_path_escapes_refused_and_nothing_sent(proxy: ProxyServer, upstream, path: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert orjson.loads(body)["error"]["message"] == "Invalid request path"
    assert upstream.requests == []


async def test_absolute_form_target_stays_on_configured_host(proxy: ProxyServer, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response.startswith(b"HTTP/1.1 200")
    assert [r.path_qs for r in upstream.requests] == ["/v1/models"]
    assert upstream.requests[0].headers["Host"] == f"127.0.0.1:{upstream.port}"


async def test_healthz_and_unknown_route(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_ROUTE_PREFIX="/openai")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        health = await client.get("/healthz")
        missing = await client.get("/v1/models")
        near = await client.get("/openaix/v1/models")
        hit = await client.get("/openai/v1/models")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert near.status_code == 404
    assert hit.status_code == 200
    assert [r.path_qs for r in upstream.requests] == ["/v1/models"]


async def test_extra_target_longest_prefix_and_boundary(proxy_factory):
    openai_up, gemini_up = RecordingUpstream(), RecordingUpstream()
    await openai_up.start()
    await gemini_up.start()
    try:
        proxy = proxy_factory(
            OPENAI_BASE_URL=openai_up.url,
            OPENAI_ROUTE_PREFIX="/",
            EXTRA_BASE_URL=gemini_up.url + "/base",
            EXTRA_ROUTE_PREFIX="/gemini",
        )
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            await client.get("/gemini/v1beta/models?key=k")
            await client.get("/geminix/v1")
            await client.get("/gemini")
        assert [r.path_qs for r in gemini_up.requests] == ["/base/v1beta/models?key=k", "/base"]
        assert [r.path_qs for r in openai_up.requests] == ["/geminix/v1"]
    finally:
        await openai_up.stop()
        await gemini_up.stop()


async def test_openai_target_sees_only_allowed_headers(proxy: ProxyServer, upstream):
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        await client.post(
            "/v1/chat/completions",
            json={},
            headers={
                "Authorization": "Bearer sk-client",
                "OpenAI-Organization": "org-1",
                "OpenAI-Beta": "assistants=v2",
                "User-Agent": "my-laptop",
                "Cookie": "session=1",
                "X-Forwarded-For": "10.1.2.3",
                "X-Stainless-OS": "Linux",
                "Accept-Encoding": "gzip",
                "Accept": "application/json",
            },
        )
    seen = {k.lower() for k in upstream.requests[-1].headers}
    assert seen <= {
        "host",
        "content-type",
        "content-length",
        "accept",
        "authorization",
        "openai-organization",
        "openai-beta",
    }
    headers = upstream.requests[-1].headers
    assert headers["Authorization"] == "Bearer sk-client"
    assert headers["OpenAI-Organization"] == "org-1"
    assert headers["Accept"] == "application/json"


async def test_general_target_gets_other_headers_but_not_hop_by_hop(proxy_factory, upstream):
    proxy = proxy_factory(
        OPENAI_BASE_URL="http://127.0.0.1:9", EXTRA_BASE_URL=upstream.url, EXTRA_ROUTE_PREFIX="/x"
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        await client.get(
            "/x/api",
            headers={
                "User-Agent": "ua-1",
                "X-Goog-Api-Key": "g-key",
                "Cookie": "session=1",
                "Proxy-Authorization": "Basic abc",
                "TE": "trailers",
            },
        )
    headers = upstream.requests[-1].headers
    assert headers["User-Agent"] == "ua-1"
    assert headers["X-Goog-Api-Key"] == "g-key"
    for name in ("Cookie", "Proxy-Authorization", "TE"):
        assert name not in headers


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_with_a_length_is_relayed_cleanly(proxy_factory, status: int):
    """A 304 may carry the Content-Length of what it stands for (a 204 should not, but some
    servers do): the client gets the status with no body, and the connection stays usable."""
    requests = 0
    writers: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                requests += 1
                writer.write(b'HTTP/1.1 %d X\r\nContent-Length: 10\r\nETag: "v1"\r\n\r\n' % status)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = proxy_factory(
        OPENAI_BASE_URL="http://127.0.0.1:9",
        EXTRA_BASE_URL=f"http://127.0.0.1:{port}",
        EXTRA_ROUTE_PREFIX="/x",
    )
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):  # the second request reuses the client's connection
                response = await client.get("/x/file", headers={"If-None-Match": '"v1"'})
                assert response.status_code == status
                assert response.content == b""
                assert response.headers["etag"] == '"v1"'
                assert "content-length" not in response.headers
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
    assert requests == 2


async def test_cors_preflight_and_origin(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CORS_ALLOW_ORIGINS="https://chat.example")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        pre = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://chat.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        refused = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        real = await client.post(
            "/v1/chat/completions", json={}, headers={"Origin": "https://chat.example"}
        )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://chat.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
    assert refused.status_code == 403
    assert real.headers["access-control-allow-origin"] == "https://chat.example"
    assert len(upstream.requests) == 1  # preflights never reach the provider


async def test_oversized_body_refused_with_413(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, MAX_BODY_SIZE=1000)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        declared = await client.post("/v1/files", content=b"x" * 2000)

        async def chunks():
            for _ in range(4):
                yield b"y" * 400

        chunked = await client.post("/v1/files", content=chunks())
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    assert chunked.status_code == 413
    assert upstream.requests == []


async def test_multipart_upload_byte_identical(proxy: ProxyServer, upstream):
    audio = os.urandom(200_000)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        request = client.build_request(
            "POST",
            "/v1/audio/transcriptions",
            data={"model": "whisper-1"},
            files={"file": ("a.mp3", audio, "audio/mpeg")},
        )
        sent_body = request.read()
        r = await client.send(request)
    assert r.status_code == 200
    seen = upstream.requests[-1]
    assert seen.body == sent_body
    assert seen.headers["Content-Type"] == request.headers["Content-Type"]


async def test_large_upload_is_streamed_not_held(proxy: ProxyServer, upstream):
    """The upstream receives the first megabytes while the client is still sending the rest."""
    total = 50 * 1024 * 1024
    got_first_mb = asyncio.Event()
    received = 0

    async def sink(request: web.Request) -> web.Response:
        nonlocal received
        async for chunk in request.content.iter_any():
            received += len(chunk)
            if received >= 4 * 1024 * 1024:
                got_first_mb.set()
        return web.json_response({"received": received})

    sink.raw_body = True  # type: ignore[attr-defined]
    upstream.route("/v1/files", sink)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % total
    )
    block = b"z" * (1024 * 1024)
    for _ in range(8):
        writer.write(block)
        await writer.drain()
    # 8 of 50 MB sent: the upstream must already be reading
    await asyncio.wait_for(got_first_mb.wait(), 5)
    for _ in range(42):
        writer.write(block)
        await writer.drain()
    response = await asyncio.wait_for(reader.readuntil(b"}"), 20)
    writer.close()
    assert b"200 OK" in response
    assert orjson.loads(response.partition(b"\r\n\r\n")[2].split(b"\r\n")[-1]) == {
        "received": total
    }


async def test_ip_blacklist_and_whitelist(proxy_factory, upstream):
    refused = proxy_factory(
        OPENAI_BASE_URL=upstream.url, IP_BLACKLIST="127.0.0.0/8", IP_WHITELIST="127.0.0.1"
    )
    allowed = proxy_factory(OPENAI_BASE_URL=upstream.url, IP_WHITELIST="10.0.0.0/8,127.0.0.1")
    outsider = proxy_factory(OPENAI_BASE_URL=upstream.url, IP_WHITELIST="10.0.0.0/8")
    behind_proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, IP_BLACKLIST="203.0.113.0/24", FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    async with httpx.AsyncClient() as client:
        r1 = await client.get(refused.url + "/v1/models")
        r2 = await client.get(allowed.url + "/v1/models")
        r3 = await client.get(outsider.url + "/v1/models")
        r4 = await client.get(
            behind_proxy.url + "/v1/models", headers={"X-Forwarded-For": "203.0.113.5"}
        )
        health = await client.get(outsider.url + "/healthz")
    assert r1.status_code == 403 and r1.json()["error"]["type"] == "permission_error"
    assert r2.status_code == 200
    assert r3.status_code == 403
    assert r4.status_code == 403
    assert health.status_code == 200
    assert len(upstream.requests) == 1


async def test_hang_up_watch_takes_any_awaitable_receive_and_survives_a_broken_one():
    """ASGI only asks ``receive`` to return an awaitable. One that returns a future is watched
    like uvicorn's coroutine; one that raises leaves the request unwatched, not failed."""
    loop = asyncio.get_running_loop()

    async def request(receive) -> str:
        watch = forward.HangUpWatch({}, receive)
        watch.start()
        try:
            await asyncio.sleep(2)
            return "finished"
        except asyncio.CancelledError:
            return "noticed" if watch.gone else "cancelled"
        finally:
            watch.stop()

    def as_future():
        future = loop.create_future()
        future.set_result({"type": "http.disconnect"})
        return future

    def broken():
        raise RuntimeError("no receive")

    async def coroutine():
        return {"type": "http.disconnect"}

    assert await asyncio.wait_for(loop.create_task(request(as_future)), 1) == "noticed"
    assert await asyncio.wait_for(loop.create_task(request(coroutine)), 1) == "noticed"
    unwatched = loop.create_task(request(broken))
    await asyncio.sleep(0.05)
    unwatched.cancel()
    assert await unwatched == "cancelled"


def test_a_worker_settles_the_garbage_collector_and_create_app_does_not(tmp_path):
    """``aifd run`` workers freeze what exists at start-up and raise the young threshold; an app
    built with create_app (tests, embedding) leaves the process's collector alone."""
    import subprocess
    import sys

    script = (
        "import gc\n"
        "from openai_forward import server\n"
        "from openai_forward.app import create_app\n"
        "from openai_forward.settings import Settings\n"
        "before = gc.get_threshold()\n"
        "create_app(Settings.from_env(environ={}, env_file=None))\n"
        "assert gc.get_freeze_count() == 0 and gc.get_threshold() == before\n"
        "server.worker_app()\n"
        "assert gc.get_freeze_count() > 0, 'nothing frozen'\n"
        "assert gc.get_threshold()[0] == server.GC_YOUNG_THRESHOLD\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip() == b"ok"


async def test_finished_requests_are_freed_without_the_garbage_collector(
    proxy_factory, upstream, tmp_path
):
    """Workers run the garbage collector seldom (they raise its threshold): what the server
    builds for a request must be freed by reference counting alone, or memory grows between
    collections. After streams and JSON answers through the cache and the chat log, the
    collector finds nothing of the proxy's stack among the unreachable objects."""

    async def chat(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response({"choices": [{"index": 0, "message": {"content": "x"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        return response

    upstream.route("/v1/chat/completions", chat)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        LOG_CHAT="true",
        LOG_FOLDER=str(tmp_path),
        CACHE_CHAT_COMPLETION="true",
    )
    ours = ("openai_forward", "uvicorn", "aiohttp", "starlette", "fastapi", "multidict", "yarl")
    gc.collect()
    gc.disable()
    try:
        for n in range(3):  # a connection each
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                for i in range(10):
                    body = {"stream": i % 2 == 0, "messages": [{"content": f"{n} {i}"}]}
                    r = await client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
        await asyncio.sleep(0.2)  # the server notices the connections closing
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept
        gc.collect()
        found = {type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert sorted(name for name in found if name.startswith(ours)) == []
