"""What the deployment tests share: ``aifd run`` as a real process in a folder with a ``.env``,
a streaming chat upstream, an SSE client that tells a finished stream from a cut one, and a
local nginx in front of several instances."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from aiohttp import web

from tests.support import free_port

# The console script a user runs; ``python -m openai_forward`` where it is not installed.
_SCRIPT = Path(sys.executable).with_name("aifd")
AIFD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "openai_forward"]
CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]"
# Variables of the test's own environment that would change how the proxy is configured.
_CONFIG_PREFIXES = ("OPENAI_", "FORWARD_", "EXTRA_", "CACHE_", "LOG_", "REDIS_", "REQ_RATE")
_CONFIG_NAMES = ("GLOBAL_RATE_LIMIT", "TOKEN_RATE_LIMIT", "RATE_LIMIT_STRATEGY", "PROXY",
                 "TIMEOUT", "READ_TIMEOUT", "SHUTDOWN_TIMEOUT", "FORWARDED_ALLOW_IPS",
                 "IP_WHITELIST", "IP_BLACKLIST", "DEFAULT_REQUEST_CACHING_VALUE")  # fmt: skip


def clean_environ(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_CONFIG_PREFIXES) and k not in _CONFIG_NAMES
    }
    env.update(extra, COLUMNS="200")
    return env


class Aifd:
    """``aifd run`` started in ``directory`` (its ``./.env`` holds ``dotenv``), in a session of
    its own so that the master and its workers can be killed together at the end."""

    def __init__(
        self,
        directory: Path,
        dotenv: dict[str, str],
        *,
        workers: int = 1,
        port: int | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port or free_port()
        self.log = directory / "aifd.out"
        (directory / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
        command = [*AIFD, "run", "--host", "127.0.0.1", "--port", str(self.port)]
        if workers != 1:
            command += ["--workers", str(workers)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=directory,
                env=environ or clean_environ(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_healthy(self, within: float = 30) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"aifd exited early:\n{self.output}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"aifd on port {self.port} did not start:\n{self.output}")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    async def wait(self, within: float) -> int:
        """The exit status, waiting without blocking the event loop (the upstream runs on it)."""
        deadline = time.monotonic() + within
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"aifd still running after {within} s:\n{self.output}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    def kill_all(self) -> None:
        """SIGKILL to the whole session: the master and every worker it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


# --- A streaming chat upstream -----------------------------------------------------------------


def chunk_event(index: int) -> bytes:
    payload = {
        "id": "chatcmpl-deploy",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-test",
        "choices": [{"index": 0, "delta": {"content": f"w{index} "}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def answer_text(events: int) -> str:
    return "".join(f"w{i} " for i in range(events))


async def streaming_chat(request: web.Request) -> web.StreamResponse:
    """``?events=N&interval=S``: N content chunks S seconds apart, then ``data: [DONE]``.
    Without ``stream`` in the body, one JSON answer. ``?delay=S``: that long before the headers."""
    body = orjson.loads(await request.read())
    events = int(request.query.get("events", "20"))
    interval = float(request.query.get("interval", "0.075"))
    await asyncio.sleep(float(request.query.get("delay", "0")))
    if not body.get("stream"):
        message = {"role": "assistant", "content": answer_text(events)}
        return web.json_response(
            {
                "id": "chatcmpl-deploy",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "gpt-test",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": events,
                    "total_tokens": 1 + events,
                },
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(events):
        await response.write(chunk_event(i))
        await asyncio.sleep(interval)
    await response.write(DONE + b"\n\n")
    await response.write_eof()
    return response


async def slow_models(request: web.Request) -> web.Response:
    """``GET /v1/models?delay=S``: the model list after S seconds."""
    await asyncio.sleep(float(request.query.get("delay", "0")))
    return web.json_response({"object": "list", "data": [{"id": "gpt-test", "object": "model"}]})


def chat_body(stream: bool = True, content: str = "hi", **more: object) -> dict[str, object]:
    return {
        "model": "gpt-test",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
        **more,
    }


@dataclass
class StreamResult:
    status: int
    body: bytes
    cut: str | None  # the transport error that ended it early, None if it ended cleanly

    @property
    def done(self) -> bool:
        return self.cut is None and self.body.rstrip().endswith(DONE)


async def read_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, object], started: asyncio.Event
) -> StreamResult:
    """POST ``body`` and read the answer to its end; ``started`` is set at the first bytes."""
    received = b""
    status = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            status = response.status_code
            async for data in response.aiter_raw():
                received += data
                started.set()
    except httpx.TransportError as exc:
        started.set()
        return StreamResult(status, received, f"{type(exc).__name__}: {exc}")
    return StreamResult(status, received, None)


# --- nginx -----------------------------------------------------------------------------------


def need_nginx() -> str:
    """The nginx binary; skip without one, fail in CI (OPENAI_FORWARD_REQUIRE_REDIS=1)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = "nginx is not installed (Debian: apt-get install -y nginx)"
        if os.environ.get("OPENAI_FORWARD_REQUIRE_REDIS") == "1":
            pytest.fail(message + " and OPENAI_FORWARD_REQUIRE_REDIS=1 (CI installs it)")
        pytest.skip(message)
    return found


_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format fleet '$request_method $request_uri $status "$upstream_addr" "$upstream_status"';
    access_log {dir}/access.log fleet;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}}
"""


def local_site(site: str, backends: list[int], port: int) -> str:
    """``deploy/nginx.conf`` (an http-block file for compose) with its upstream servers
    ``aifd-N:8000`` replaced by local ports, in order, and ``listen 80`` by a loopback port."""
    servers = iter(backends)
    site, count = re.subn(
        r"server\s+aifd-\d+:8000", lambda _: f"server 127.0.0.1:{next(servers)}", site
    )
    assert count == len(backends), f"{count} upstream servers in the file, {len(backends)} given"
    site, count = re.subn(r"listen\s+80;", f"listen 127.0.0.1:{port};", site)
    assert count == 1, "one `listen 80;` expected"
    return site


class Nginx:
    """nginx in the foreground (``daemon off``) with ``http`` as its http block and every path
    (pid, logs, temp files) in ``directory``."""

    def __init__(self, directory: Path, http: str, port: int) -> None:
        self.binary = need_nginx()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port
        # As root its workers would switch to nobody, who cannot enter pytest's private tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf = directory / "nginx.conf"
        self.conf.write_text(_MAIN.format(user=user, dir=directory, http=http))
        self.process = subprocess.Popen(
            [
                self.binary,
                "-c",
                str(self.conf),
                "-p",
                str(directory),
                "-e",
                str(directory / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def errors(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def wait_ready(self, within: float = 10) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"nginx exited:\n{self.errors()}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError(f"nginx did not answer:\n{self.errors()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
