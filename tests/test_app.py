"""The application: FastAPI owns the proxy's own routes, forwarders are plain ASGI apps, and every
finished request is reported once, whichever way it ended."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI

from openai_forward.outcome import Outcome
from tests.conftest import RecordingUpstream, make_settings
from tests.support import free_port


async def test_the_app_is_fastapi_and_its_own_routes_win_over_a_root_prefix(
    proxy_factory, upstream
):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    assert isinstance(proxy.app, FastAPI)

    @proxy.app.get("/metrics")
    async def metrics() -> dict[str, int]:
        return {"requests": len(upstream.requests)}

    async with httpx.AsyncClient(base_url=proxy.url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.head("/healthz")).status_code == 200
        forwarded = await client.get("/v1/models")
        assert forwarded.json()["echo"] == "/v1/models"
        # a route added after start-up is the app's own, not the upstream's
        assert (await client.get("/metrics")).json() == {"requests": 1}
        # the interactive docs are off by default: the path is forwarded like any other
        assert (await client.get("/docs")).json()["echo"] == "/docs"
    assert [r.path_qs for r in upstream.requests] == ["/v1/models", "/docs"]


async def test_docs_on_request_and_a_404_in_openai_shape(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_ROUTE_PREFIX="/openai", API_DOCS=1)
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        docs = await client.get("/docs")
        schema = (await client.get("/openapi.json")).json()
        unknown = await client.get("/elsewhere")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/healthz" in schema["paths"]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "Unknown route"
    assert upstream.requests == []


async def test_a_forwarder_is_a_plain_asgi_app(upstream):
    """Served on its own (no gateway, no scope key from it), a forwarder matches its prefix
    itself: it can be mounted or wrapped like any ASGI app."""
    from openai_forward.app import create_app

    gateway = create_app(
        make_settings({"OPENAI_BASE_URL": upstream.url, "OPENAI_ROUTE_PREFIX": "/x"})
    )
    forwarder = gateway.forwarders[0]
    seen: list[str] = []

    async def wrapper(scope, receive, send):
        if scope["type"] == "lifespan":
            message = await receive()
            await forwarder.upstream.open()
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await forwarder.upstream.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append(scope["path"])
        await forwarder(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(wrapper, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            inside = await client.get("/x/v1/models?a=1")
            outside = await client.get("/y/v1/models")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    assert inside.json()["echo"] == "/v1/models?a=1"
    assert outside.status_code == 404
    assert seen == ["/x/v1/models", "/y/v1/models"]


async def test_every_way_a_request_ends_is_reported_once(
    proxy_factory, upstream: RecordingUpstream
):
    outcomes: list[Outcome] = []

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": "hi"}}]})

    upstream.route("/v1/slow", slow)
    upstream.route("/v1/chat/completions", chat)
    proxy = proxy_factory(
        reporters=[outcomes.append],
        OPENAI_BASE_URL=upstream.url,
        EXTRA_BASE_URL="http://127.0.0.1:9",
        EXTRA_ROUTE_PREFIX="/dead",
        MAX_RETRIES=1,
        MAX_BODY_SIZE=100,
        REQ_RATE_LIMIT='{"/v1/limited": "1/minute"}',
        CACHE_CHAT_COMPLETION="true",
        DEFAULT_REQUEST_CACHING_VALUE="true",
    )
    chat_body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/%2e%2e/x")).status_code == 400
        assert (await client.post("/v1/x", content=b"x" * 200)).status_code == 413
        assert (await client.get("/v1/limited")).status_code == 200
        assert (await client.get("/v1/limited")).status_code == 429
        assert (await client.post("/v1/chat/completions", json=chat_body)).status_code == 200
        assert (await client.post("/v1/chat/completions", json=chat_body)).status_code == 200
        assert (await client.get("/dead/v1/models")).status_code == 502
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/v1/slow", timeout=0.3)
    deadline = time.monotonic() + 5
    while len(outcomes) < 9 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)

    assert [(o.route, o.status) for o in outcomes] == [
        ("/v1/models", 200),
        ("/v1/%2e%2e/x", 400),
        ("/v1/x", 413),
        ("/v1/limited", 200),
        ("/v1/limited", 429),
        ("/v1/chat/completions", 200),
        ("/v1/chat/completions", 200),
        ("/dead/v1/models", 502),
        ("/v1/slow", 0),
    ]
    models, _, _, _, _, miss, hit, dead, left = outcomes
    assert models.bytes_sent == len(b'{"echo": "/v1/models", "size": 0}')
    assert models.duration > 0 and not models.client_left and models.retries == 0
    assert (miss.kind, miss.cache) == ("chat", "MISS")
    assert (hit.kind, hit.cache) == ("chat", "HIT")
    assert models.cache is None and models.kind is None
    assert dead.retries == 1 and dead.target == "/dead"
    assert left.client_left and left.status == 0


async def test_uvicorn_serves_the_module_app_from_dotenv(tmp_path: Path, upstream):
    """``uvicorn openai_forward.app:app`` (how many users of the original start it) serves what
    ``aifd run`` serves, configured from ./.env."""
    port = free_port()
    (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={upstream.url}\nOPENAI_ROUTE_PREFIX=/openai\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))}
    process = subprocess.Popen(  # noqa: ASYNC220 - started once; the test awaits its answers
        [sys.executable, "-m", "uvicorn", "openai_forward.app:app", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    health = await client.get("/healthz")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, "uvicorn exited"
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    await asyncio.sleep(0.1)
            forwarded = await client.get("/openai/v1/models")
    finally:
        process.terminate()
        process.wait(10)
    assert health.json() == {"status": "ok"}
    assert forwarded.json()["echo"] == "/v1/models"


def test_uvicorn_with_bad_dotenv_says_one_line(tmp_path: Path):
    (tmp_path / ".env").write_text("TIMEOUT=abc\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "openai_forward.app:app", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "TIMEOUT='abc': expected a number of seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_aifd_help_lists_its_commands(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "openai_forward", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PAGER": "cat"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    text = result.stdout + result.stderr  # fire prints help to stderr when not on a terminal
    assert result.returncode == 0
    assert "run" in text.split("COMMANDS", 1)[1]
    assert "convert" in text.split("COMMANDS", 1)[1]
    assert "Serve the proxy" in text and "Turn chat logs into JSON" in text
