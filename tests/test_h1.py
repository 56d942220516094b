"""Our upstream client (openai_forward/h1.py) over real sockets: TLS against a local CA, HTTP and
CONNECT proxies, and the HTTP/1.1 corners a reverse proxy meets (bodies ending at EOF, interim
1xx heads, HEAD, connections the server drops while idle, garbage, back-pressure)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Self
from urllib.parse import urlsplit

import httpx
import pytest
import trustme
from aiohttp import web

from openai_forward import h1
from tests.conftest import RecordingUpstream

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LocalServer:
    """A hand-written server on 127.0.0.1 that counts its connections and closes them all when
    it stops; ``handle`` does the talking."""

    def __init__(self) -> None:
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    tls: ssl.SSLContext | None = None  # serve over TLS

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RawServer(LocalServer):
    """An upstream that answers with whatever ``handler`` writes."""

    def __init__(self, handler: RawHandler) -> None:
        super().__init__()
        self.handle = handler  # type: ignore[method-assign]


class ForwardProxy(LocalServer):
    """A minimal HTTP proxy: CONNECT tunnels, and absolute-form requests relayed to their host.
    It records each request line and the Proxy-Authorization it was given."""

    def __init__(self, refuse: int | None = None) -> None:
        super().__init__()
        self.lines: list[bytes] = []
        self.auth: list[bytes | None] = []
        self.refuse = refuse

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *fields = head[:-4].split(b"\r\n")
        self.lines.append(line)
        auth = [f.split(b":", 1)[1].strip() for f in fields if f.lower().startswith(b"proxy-a")]
        self.auth.append(auth[0] if auth else None)
        if self.refuse is not None:
            writer.write(b"HTTP/1.1 %d No\r\nContent-Length: 12\r\n\r\nauth needed\n" % self.refuse)
            await writer.drain()
            return
        method, target, _ = line.split(b" ")
        if method == b"CONNECT":
            host, port = target.rsplit(b":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target.decode())
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port)
            origin_form = (url.path or "/") + (f"?{url.query}" if url.query else "")
            kept = [f for f in fields if not f.lower().startswith(b"proxy-")]
            up_writer.write(
                b"\r\n".join([b"%s %s HTTP/1.1" % (method, origin_form.encode()), *kept])
                + b"\r\n\r\n"
            )
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path, monkeypatch) -> None:
    """The proxy trusts the local CA (through the standard SSL_CERT_FILE) for this test."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[tuple[RecordingUpstream, list[str]]]:
    """A recording upstream on https://localhost:PORT; the list gets each SNI name it is sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    names: list[str] = []
    context.sni_callback = lambda _obj, name, _ctx: names.append(name) and None  # type: ignore[func-returns-value]
    server = RecordingUpstream(tls=context, host="localhost")
    await server.start()
    yield server, names
    await server.stop()


async def test_https_upstream_verified_with_sni(proxy_factory, tls_upstream, ca_file):
    upstream, names = tls_upstream
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real")
    async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
        for n in range(3):
            response = await client.post("/v1/chat/completions", json={"n": n})
            assert response.status_code == 200
            assert response.json() == {"echo": "/v1/chat/completions", "size": 7}
    assert [r.headers["Authorization"] for r in upstream.requests] == ["Bearer sk-real"] * 3
    assert names == ["localhost"]  # one TLS connection, kept alive, with the name as SNI


# After the failed handshake, asyncio's TLS server (the test's upstream, not our proxy, which runs
# on uvloop) leaves its side's transport to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_untrusted_certificate_is_refused_with_502(proxy_factory, tls_upstream):
    upstream, _ = tls_upstream
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, MAX_RETRIES=0)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "TLS certificate not trusted" in message
    assert upstream.requests == []
    await asyncio.sleep(0.1)
    gc.collect()  # collect the upstream's abandoned transport now, under this test's filter


async def test_http_upstream_through_proxy_with_credentials(proxy_factory, upstream):
    async with ForwardProxy() as forward:
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url + "/base",
            OPENAI_API_KEY="sk-real",
            PROXY=f"http://user:p%40ss@127.0.0.1:{forward.port}",
        )
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            response = await client.post("/v1/chat/completions?x=1", json={})
            assert response.status_code == 200
    assert forward.lines == [f"POST {upstream.url}/base/v1/chat/completions?x=1 HTTP/1.1".encode()]
    assert forward.auth == [b"Basic " + base64.b64encode(b"user:p@ss")]
    (seen,) = upstream.requests
    assert seen.path_qs == "/base/v1/chat/completions?x=1"
    assert seen.headers["Authorization"] == "Bearer sk-real"
    assert "Proxy-Authorization" not in seen.headers


async def test_https_upstream_through_connect_tunnel(proxy_factory, tls_upstream, ca_file):
    upstream, names = tls_upstream
    async with ForwardProxy() as forward:
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url, PROXY=f"http://u:pw@127.0.0.1:{forward.port}"
        )
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):
                response = await client.post("/v1/embeddings", json={"input": "x"})
                assert response.status_code == 200
    # One tunnel, reused; the proxy saw the authority only, the upstream the request.
    assert forward.lines == [f"CONNECT localhost:{upstream.port} HTTP/1.1".encode()]
    assert forward.auth == [b"Basic " + base64.b64encode(b"u:pw")]
    assert names == ["localhost"]
    assert [r.path_qs for r in upstream.requests] == ["/v1/embeddings"] * 2


@pytest.mark.parametrize("target_tls", [False, True], ids=["http-target", "https-target"])
async def test_proxy_reached_over_tls(
    proxy_factory, ca, ca_file, upstream, tls_upstream, target_tls
):
    """PROXY=https://...: TLS to the proxy; for an https target, TLS inside the tunnel too."""
    target = tls_upstream[0] if target_tls else upstream
    forward = ForwardProxy()
    forward.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(forward.tls)
    async with forward:
        proxy = proxy_factory(
            OPENAI_BASE_URL=target.url, PROXY=f"https://localhost:{forward.port}", MAX_RETRIES=0
        )
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):
                response = await client.post("/v1/embeddings", json={"input": "x"})
                assert response.status_code == 200, response.text
    assert len(forward.lines) == 1  # one connection to the proxy, kept alive
    assert forward.lines[0].startswith(b"CONNECT " if target_tls else b"POST http://")
    assert [r.path_qs for r in target.requests] == ["/v1/embeddings"] * 2


async def test_proxy_refusing_the_tunnel_gives_502(proxy_factory, tls_upstream, ca_file):
    upstream, _ = tls_upstream
    async with ForwardProxy(refuse=407) as forward:
        proxy = proxy_factory(
            OPENAI_BASE_URL=upstream.url, PROXY=f"http://127.0.0.1:{forward.port}", MAX_RETRIES=0
        )
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 502
    assert "proxy refused the tunnel (407)" in response.json()["error"]["message"]
    assert upstream.requests == []


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def _extra(server: RawServer, **env: object) -> dict[str, object]:
    return {
        "OPENAI_BASE_URL": "http://127.0.0.1:9",
        "EXTRA_BASE_URL": server.url,
        "EXTRA_ROUTE_PREFIX": "/x",
        **env,
    }


async def test_body_ending_at_eof_is_relayed_whole(proxy_factory):
    body = b"no length, no chunks: " + b"z" * 100_000

    async def answer(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        for i in range(0, len(body), 30_000):
            writer.write(body[i : i + 30_000])
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):
                response = await client.get("/x/file")
                assert response.status_code == 200
                assert response.content == body
    assert server.connections == 2  # such a connection is never reused


async def test_body_ending_at_eof_cut_by_a_reset_is_not_complete(proxy_factory):
    async def answer(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-bo")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server))
        async with (
            httpx.AsyncClient(base_url=proxy.url, timeout=5) as client,
            client.stream("GET", "/x/file") as response,
        ):
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()


async def test_bytes_after_a_response_do_not_poison_the_next_one(proxy_factory):
    async def answer(reader, writer):
        await _read_request(reader)
        if server.connections == 1:  # a second, partial head after the answer
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 Oops\r\nX-J")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        await writer.drain()
        await reader.read()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server, MAX_RETRIES=0))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            first = await client.get("/x/a")
            assert (first.status_code, first.content) == (200, b"ok")
            second = await client.get("/x/a")
            assert (second.status_code, second.content) == (200, b"second")
            assert "x-j" not in second.headers
    assert server.connections == 2


async def test_streamed_upload_does_not_reuse_a_long_idle_connection(proxy_factory):
    """A body too large to hold cannot be sent twice, so it does not risk a connection the
    server may be closing for idleness."""
    sizes: list[int] = []

    async def answer(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            size = 0
            if b"chunked" in head.lower():
                while (length := int((await reader.readuntil(b"\r\n"))[:-2], 16)) > 0:
                    size += len(await reader.readexactly(length + 2)) - 2
                await reader.readuntil(b"\r\n")
            sizes.append(size)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    big = b"u" * (3 * 1024 * 1024)
    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            assert (await client.get("/x/a")).status_code == 200
            await asyncio.sleep(1.3)
            assert (await client.post("/x/upload", content=big)).status_code == 200
            assert (await client.get("/x/a")).status_code == 200
    assert sizes == [0, len(big), 0]
    assert server.connections == 2  # the upload opened a new one; the last GET reused a pooled one


async def test_interim_100_head_is_dropped(proxy_factory):
    async def answer(reader, writer):
        while True:
            await _read_request(reader)
            writer.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Seen: yes\r\n\r\nok"
            )
            await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):
                response = await client.post("/x/upload", content=b"data")
                assert (response.status_code, response.content) == (201, b"ok")
                assert response.headers["x-seen"] == "yes"
    assert server.connections == 1


async def test_head_response_has_no_body_and_the_next_request_works(proxy_factory):
    async def answer(reader, writer):
        while True:
            head = await _read_request(reader)
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            head = await client.head("/x/file")
            assert head.status_code == 200
            assert head.headers["content-length"] == "5"
            assert head.content == b""
            get = await client.get("/x/file")
            assert get.content == b"hello"


async def test_connection_dropped_by_server_while_idle_is_not_reused(proxy_factory):
    """The server closes each connection shortly after answering (its keep-alive timeout):
    the next request must go out on a new connection, with no retry needed."""

    async def answer(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server, MAX_RETRIES=0))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(3):
                response = await client.get("/x/a")
                assert (response.status_code, response.content) == (200, b"ok")
                await asyncio.sleep(0.2)
    assert server.connections == 3


async def test_garbage_from_upstream_gives_502(proxy_factory):
    async def answer(reader, writer):
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**_extra(server, MAX_RETRIES=0))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            response = await client.get("/x/a")
    assert response.status_code == 502
    assert "invalid HTTP response" in response.json()["error"]["message"]


async def test_slow_reader_pauses_the_upstream_socket():
    """A reader that does not consume stops the socket being read (memory stays bounded), and
    reading on resumes it; the body arrives whole."""
    size = 8 * 1024 * 1024
    written = 0

    async def answer(reader, writer):
        nonlocal written
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"b" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            written += len(block)

    async with RawServer(answer) as server:
        pool = h1.Pool(h1.Origin(server.url), connect_timeout=5, read_timeout=5)
        try:
            response = await pool.request("GET", b"/big", [], b"")
            await asyncio.sleep(0.5)
            assert response._queued <= h1.HIGH_WATER + 256 * 1024
            assert written < size  # the server is blocked: nobody reads its socket
            received = 0
            async for chunk in response:
                received += len(chunk)
            assert received == size
            assert response.at_eof()
            response.release()
        finally:
            pool.close()


async def test_silence_between_body_chunks_is_a_read_timeout():
    async def answer(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(5)

    async with RawServer(answer) as server:
        pool = h1.Pool(h1.Origin(server.url), connect_timeout=5, read_timeout=0.3)
        try:
            response = await pool.request("GET", b"/", [], b"")
            chunks = aiter(response)
            assert await anext(chunks) == b"hello"
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(h1.ReadTimeout):
                await anext(chunks)
            assert 0.25 <= loop.time() - started < 2
        finally:
            pool.close()


async def test_mixed_load_leaves_no_connection_busy(proxy_factory, upstream):
    """300 concurrent requests: JSON of many sizes, streams, upstream break-offs and clients
    that hang up mid-stream. Every whole answer is intact, every broken one is cut (never
    finished), nothing hangs, and afterwards every pooled connection is idle again."""
    rng = random.Random(7)

    async def sized(request):
        size = int(request.query["n"])
        return web.Response(body=b"j" * size, content_type="application/json")

    async def stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(request.query["n"])):
            await response.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.002)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def drop(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: partial\n\n")
        await asyncio.sleep(0.01)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.route("/sized", sized)
    upstream.route("/stream", stream)
    upstream.route("/drop", drop)
    proxy = proxy_factory(
        OPENAI_BASE_URL="http://127.0.0.1:9", EXTRA_BASE_URL=upstream.url, EXTRA_ROUTE_PREFIX="/x"
    )
    outcomes: dict[str, int] = {"json": 0, "stream": 0, "cut": 0, "gone": 0}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        choice = rng.random()
        if choice < 0.4:
            n = rng.choice([0, 10, 5000, 300_000, 1_500_000])
            response = await client.get(f"/x/sized?n={n}")
            assert response.status_code == 200 and response.content == b"j" * n
            outcomes["json"] += 1
        elif choice < 0.7:
            n = rng.randint(1, 40)
            response = await client.get(f"/x/stream?n={n}")
            assert response.text.endswith("data: [DONE]\n\n")
            assert response.text.count("data: ") == n + 1
            outcomes["stream"] += 1
        elif choice < 0.85:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/x/drop")
            outcomes["cut"] += 1
        else:  # a client that hangs up while the stream is still coming
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    await client.get("/x/stream?n=100")
            outcomes["gone"] += 1

    limits = httpx.Limits(max_connections=120)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=20, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(300))), 60)
    assert all(count > 10 for count in outcomes.values()), outcomes
    (general,) = [f for f in proxy.app.forwarders if f.target.prefix == "/x"]
    pool = general.upstream._conns
    assert pool is not None
    deadline = asyncio.get_running_loop().time() + 5
    while any(conn.response is not None for conn in list(pool._all)):
        assert asyncio.get_running_loop().time() < deadline, "a connection stayed busy"
        await asyncio.sleep(0.05)
    assert len(pool._all) == len([c for c in pool._idle if not c.closed])
