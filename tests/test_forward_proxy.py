"""PROXY through real forward proxies: tinyproxy from Debian's packages (an http target, and an
https target through a CONNECT tunnel), and SOCKS5 (socks5:// and socks5h://, through the
[socks] extra) with a SOCKS server of the tests' own."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import wire
from tests.conftest import RecordingUpstream
from tests.socks_server import Socks5Server
from tests.support import free_port
from tests.wire import error_message

ca, ca_file, tls_upstream = wire.ca, wire.ca_file, wire.tls_upstream  # fixtures


# --- tinyproxy ------------------------------------------------------------------------------


@dataclass
class Tinyproxy:
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it logged, such as ``CONNECT localhost:4433 HTTP/1.1``."""
        marker = "]: Request (file descriptor "
        lines = self.log.read_text(errors="replace").splitlines()
        return [line.split("): ", 1)[1] for line in lines if marker in line]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[[int], Tinyproxy]]:
    """Start a tinyproxy of this test's own, in the foreground, on a free loopback port; it lets
    CONNECT through to the given port only, and wants user ``user`` with password ``secret``.

    Skips when tinyproxy is missing, unless OPENAI_FORWARD_REQUIRE_REDIS=1 (CI, whose .ci/run
    installs it), where it fails."""
    if shutil.which("tinyproxy") is None:
        if os.environ.get("OPENAI_FORWARD_REQUIRE_REDIS") == "1":
            pytest.fail("tinyproxy is not installed and OPENAI_FORWARD_REQUIRE_REDIS=1")
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")
    started: list[Tinyproxy] = []

    def start(connect_port: int) -> Tinyproxy:
        port = free_port()
        log = tmp_path / f"tinyproxy-{port}.log"
        config = tmp_path / f"tinyproxy-{port}.conf"
        config.write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nAllow 127.0.0.1\n"
            f"ConnectPort {connect_port}\nBasicAuth user secret\n"
            f'LogFile "{log}"\nLogLevel Connect\n'
        )
        process = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proxy = Tinyproxy(port, log, process)
        started.append(proxy)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return proxy
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tinyproxy did not start (see {log})") from None
                time.sleep(0.05)

    yield start
    for proxy in started:
        proxy.process.terminate()
        try:
            proxy.process.wait(5)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait(5)


async def test_http_target_through_tinyproxy(proxy_factory, upstream, tinyproxy):
    forward = tinyproxy(443)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url + "/base",
        OPENAI_API_KEY="sk-real",
        PROXY=forward.url("user:secret"),
    )
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        for n in range(2):
            response = await client.post("/v1/chat/completions?x=1", json={"n": n})
            assert response.status_code == 200, response.text
            assert response.json() == {"echo": "/base/v1/chat/completions?x=1", "size": 7}
    url = f"{upstream.url}/base/v1/chat/completions?x=1"
    assert forward.requests() == [f"POST {url} HTTP/1.1"] * 2
    for seen in upstream.requests:
        assert "tinyproxy" in seen.headers["Via"]  # it came through the proxy
        assert seen.headers["Authorization"] == "Bearer sk-real"
        assert "Proxy-Authorization" not in seen.headers


async def test_https_target_through_tinyproxy_connect(
    proxy_factory, tls_upstream, ca_file, tinyproxy
):
    upstream, names = tls_upstream
    forward = tinyproxy(upstream.port)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real", PROXY=forward.url("user:secret")
    )
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        for _ in range(2):
            response = await client.post("/v1/embeddings", json={"input": "x"})
            assert response.status_code == 200, response.text
    tunnels = forward.requests()
    assert tunnels and set(tunnels) == {f"CONNECT localhost:{upstream.port} HTTP/1.1"}
    assert set(names) == {"localhost"}
    assert [r.path_qs for r in upstream.requests] == ["/v1/embeddings"] * 2
    for seen in upstream.requests:
        assert "Via" not in seen.headers  # tunnelled: the proxy saw only TLS
        assert seen.headers["Authorization"] == "Bearer sk-real"


@pytest.mark.parametrize(
    ("credentials", "status"),
    [("", 407), ("user:wrong", 401), ("user:secret", 403)],
    ids=["no-credentials", "wrong-password", "port-not-allowed"],
)
async def test_tinyproxy_refusing_the_tunnel_gives_502(
    proxy_factory, tls_upstream, ca_file, tinyproxy, credentials: str, status: int
):
    upstream, _ = tls_upstream
    # tinyproxy answers 407 without credentials, 401 with wrong ones, 403 for a port it does
    # not let CONNECT through to
    forward = tinyproxy(free_port() if status == 403 else upstream.port)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, PROXY=forward.url(credentials), MAX_RETRIES=2
    )
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 502
    message = error_message(response)
    assert "proxy" in message and str(status) in message
    assert upstream.requests == []


# --- SOCKS5 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("credentials", [None, ("user", "p@ss word")], ids=["no-auth", "login"])
@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
async def test_http_target_through_socks5(
    proxy_factory, scheme: str, credentials: tuple[str, str] | None
):
    """As with curl: socks5:// resolves the target's name here and sends the address;
    socks5h:// sends the name for the SOCKS server to resolve."""
    upstream = RecordingUpstream(host="localhost")
    await upstream.start()
    try:
        async with Socks5Server(credentials) as socks:
            login = "user:p%40ss%20word@" if credentials else ""
            proxy = proxy_factory(
                OPENAI_BASE_URL=upstream.url,
                OPENAI_API_KEY="sk-real",
                PROXY=f"{scheme}://{login}127.0.0.1:{socks.port}",
            )
            async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
                for _ in range(2):
                    response = await client.post("/v1/chat/completions", json={})
                    assert response.status_code == 200, response.text
    finally:
        await upstream.stop()
    host = "localhost" if scheme == "socks5h" else "127.0.0.1"
    user = credentials[0] if credentials else None
    assert socks.connects and set(socks.connects) == {(user, host, upstream.port)}
    assert [r.path_qs for r in upstream.requests] == ["/v1/chat/completions"] * 2
    assert all(r.headers["Authorization"] == "Bearer sk-real" for r in upstream.requests)


async def test_https_target_through_socks5h(proxy_factory, tls_upstream, ca_file):
    upstream, names = tls_upstream
    async with Socks5Server() as socks:
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url, PROXY=f"socks5h://127.0.0.1:{socks.port}"
        )
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            response = await client.post("/v1/embeddings", json={"input": "x"})
            assert response.status_code == 200, response.text
    assert socks.connects == [(None, "localhost", upstream.port)]
    assert names == ["localhost"]
    assert [r.path_qs for r in upstream.requests] == ["/v1/embeddings"]


async def test_socks5_refusing_the_login_gives_502(proxy_factory, upstream):
    async with Socks5Server(("user", "secret")) as socks:
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url,
            PROXY=f"socks5://user:wrong@127.0.0.1:{socks.port}",
            MAX_RETRIES=0,
        )
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 502
    assert upstream.url in error_message(response)
    assert socks.refused_logins == 1
    assert socks.connects == []
    assert upstream.requests == []


async def test_socks5_proxy_down_gives_502(proxy_factory, upstream):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, PROXY=f"socks5://127.0.0.1:{free_port()}", MAX_RETRIES=0
    )
    started = asyncio.get_running_loop().time()
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 502
    assert upstream.url in error_message(response)
    assert upstream.requests == []
    assert asyncio.get_running_loop().time() - started < 2
