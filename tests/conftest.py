"""Real parts for every test: our server under uvicorn on a loopback port (in a thread with its own
event loop) and an in-process aiohttp upstream that records what it received."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from openai_forward.app import create_app
from openai_forward.outcome import Reporter
from openai_forward.server import uvicorn_options
from openai_forward.settings import Settings
from tests.support import RedisProcess, need_redis_server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)


class RecordingUpstream:
    """An aiohttp server on 127.0.0.1 that records every request and answers by route."""

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.requests: list[Recorded] = []
        self.handlers: dict[str, Handler] = {}
        self.closed_connections = 0
        self.port = 0
        self._tls = tls
        self._host = host  # the name in its URL (with TLS, the name its certificate is for)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self._host}:{self.port}"

    def route(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        handler = self.handlers.get(request.path)
        if handler is not None and getattr(handler, "raw_body", False):
            self.requests.append(
                Recorded(request.method, request.path_qs, request.headers.copy(), b"")
            )
            return await handler(request)
        body = await request.read()
        self.requests.append(
            Recorded(request.method, request.path_qs, request.headers.copy(), body)
        )
        if handler is not None:
            return await handler(request)
        return web.json_response({"echo": request.path_qs, "size": len(body)})


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.stop()


class ProxyServer:
    """Our app served by a real uvicorn on 127.0.0.1, in a thread with its own event loop; with
    ``http="httptools"``, on uvicorn's own protocol instead of ours (as ``uvicorn
    openai_forward.app:app`` serves it)."""

    def __init__(
        self, settings: Settings, reporters: Sequence[Reporter] = (), http: str | None = None
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, reporters=reporters)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        options = uvicorn_options(settings)
        if http is not None:
            options["http"] = http
        config = uvicorn.Config(self.app, log_level="warning", **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> ProxyServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError("proxy did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


def make_settings(env: dict[str, str]) -> Settings:
    # Test servers wait 5 s, not the default 30, for what is in flight when they stop.
    return Settings.from_env(environ={"SHUTDOWN_TIMEOUT": "5", **env}, env_file=None)


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., ProxyServer]]:
    started: list[ProxyServer] = []

    def start(
        reporters: Sequence[Reporter] = (), http: str | None = None, **env: Any
    ) -> ProxyServer:
        settings = make_settings({k: str(v) for k, v in env.items()})
        server = ProxyServer(settings, reporters, http).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def proxy(proxy_factory: Callable[..., ProxyServer], upstream: RecordingUpstream) -> ProxyServer:
    """A proxy with one openai-type target at ``/`` pointing at the recording upstream."""
    return proxy_factory(OPENAI_BASE_URL=upstream.url)


@pytest.fixture
def redis_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisProcess]]:
    """Start a redis-server of this test's own: ``redis_process("--requirepass", "pw")``.

    Each gets a temp dir; all are killed at teardown. Skips when ``redis-server`` is missing,
    unless OPENAI_FORWARD_REQUIRE_REDIS=1 (CI), where it fails.
    """
    need_redis_server()
    started: list[RedisProcess] = []

    def start(*extra: str) -> RedisProcess:
        server = RedisProcess(tmp_path_factory.mktemp("redis"), *extra)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


REDIS_URL = os.environ.get("OPENAI_FORWARD_TEST_REDIS", "redis://127.0.0.1:6379/0")


@dataclass
class RedisForTest:
    url: str
    prefix: str  # give it to the proxy as REDIS_KEY_PREFIX; every key under it is removed after


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisForTest]:
    """The shared Redis at 127.0.0.1:6379 with a key prefix of this test's own.

    Skips when Redis is unreachable, unless OPENAI_FORWARD_REQUIRE_REDIS=1 (CI), where it fails.
    """
    import uuid

    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # any failure means "no usable Redis"
        await client.aclose()
        message = f"Redis at {REDIS_URL} is not reachable ({type(exc).__name__})"
        if os.environ.get("OPENAI_FORWARD_REQUIRE_REDIS") == "1":
            pytest.fail(message + " and OPENAI_FORWARD_REQUIRE_REDIS=1")
        pytest.skip(message)
    prefix = f"aifd-test-{uuid.uuid4().hex[:12]}"
    try:
        yield RedisForTest(REDIS_URL, prefix)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
