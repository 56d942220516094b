"""The proxy's upstream client seen from outside: a real proxy on a loopback port in front of real
upstream servers (the recording aiohttp upstream, or hand-written ones where a test needs the
exact bytes of the answer). TLS against a local CA, HTTP and CONNECT proxies, the HTTP/1.1
corners a reverse proxy meets, lenient and malformed answers, uploads, back-pressure, silence,
connection caps and hang-ups."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from aiohttp import web

from tests import wire
from tests.wire import (
    CountingRelay,
    ForwardProxy,
    RawServer,
    error_message,
    extra_target,
    read_request,
    server_tls,
)

ca, ca_file, tls_upstream = wire.ca, wire.ca_file, wire.tls_upstream  # fixtures

MiB = 1024 * 1024


# --- TLS and forward proxies ---------------------------------------------------------------


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
    assert re.search(r"TLS certificate.* not trusted", error_message(response))
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
    # absolute-form request line, credentials decoded from the URL
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
    assert all("Proxy-Authorization" not in r.headers for r in upstream.requests)


@pytest.mark.parametrize("target_tls", [False, True], ids=["http-target", "https-target"])
async def test_proxy_reached_over_tls(
    proxy_factory, ca, ca_file, upstream, tls_upstream, target_tls
):
    """PROXY=https://...: TLS to the proxy; for an https target, TLS inside the tunnel too."""
    target = tls_upstream[0] if target_tls else upstream
    forward = ForwardProxy()
    forward.tls = server_tls(ca, "localhost")
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
    message = error_message(response)
    assert "proxy" in message and "407" in message
    assert upstream.requests == []


# --- HTTP/1.1 corners -----------------------------------------------------------------------


async def test_body_ending_at_eof_is_relayed_whole(proxy_factory):
    body = b"no length, no chunks: " + b"z" * 100_000

    async def answer(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        for i in range(0, len(body), 30_000):
            writer.write(body[i : i + 30_000])
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):
                response = await client.get("/x/file")
                assert response.status_code == 200
                assert response.content == body
    assert server.connections == 2  # such a connection is never reused


async def test_body_ending_at_eof_cut_by_a_reset_is_not_complete(proxy_factory):
    async def answer(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-bo")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url))
        async with (
            httpx.AsyncClient(base_url=proxy.url, timeout=5) as client,
            client.stream("GET", "/x/file") as response,
        ):
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()


async def test_interim_100_head_is_dropped(proxy_factory):
    async def answer(reader, writer):
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Seen: yes\r\n\r\nok"
            )
            await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(2):
                response = await client.post("/x/upload", content=b"data")
                assert (response.status_code, response.content) == (201, b"ok")
                assert response.headers["x-seen"] == "yes"
    assert server.connections == 1


async def test_head_response_has_no_body_and_the_next_request_works(proxy_factory):
    async def answer(reader, writer):
        while True:
            head = await read_request(reader)
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url))
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
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url, MAX_RETRIES=0))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            for _ in range(3):
                response = await client.get("/x/a")
                assert (response.status_code, response.content) == (200, b"ok")
                await asyncio.sleep(0.2)
    assert server.connections == 3


# --- Lenient and malformed answers ----------------------------------------------------------

# Answers that curl and aiohttp both accept (each was checked with curl 7.88 and aiohttp 3.14).
LENIENT = {
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Type: text/plain\nX-After: yes\nContent-Length: 5\n\nhello",
    "obs-fold": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Folded: first\r\n  second\r\n"
        b"X-After: yes\r\n\r\nhello"
    ),
    "chunk-size-padded": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-After: yes\r\n\r\n"
        b"5   \r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-size-zeros": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-After: yes\r\n\r\n"
        b"0005\r\nhello\r\n0\r\n\r\n"
    ),
    "control-x01": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Ctl: a\x01b\r\nX-After: yes\r\n\r\nhello",
    "control-x7f": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Ctl: a\x7fb\r\nX-After: yes\r\n\r\nhello",
}


@pytest.mark.parametrize("answer_bytes", LENIENT.values(), ids=LENIENT.keys())
async def test_lenient_answer_is_relayed_not_refused(proxy_factory, answer_bytes: bytes):
    async def answer(reader, writer):
        await read_request(reader)
        writer.write(answer_bytes)
        await writer.drain()
        await reader.read()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url, MAX_RETRIES=0))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            response = await client.get("/x/a")
    assert response.status_code == 200, response.text
    assert response.content == b"hello"
    assert response.headers["x-after"] == "yes"  # the head was read past the odd line
    if b"X-Folded" in answer_bytes:
        assert re.fullmatch(r"first\s+second", response.headers["x-folded"])


MALFORMED = {
    "status line": b"SMTP ready\r\n\r\n",
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    "header": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.mark.parametrize(("part", "answer_bytes"), MALFORMED.items(), ids=MALFORMED.keys())
async def test_malformed_answer_gives_502_saying_what_was_wrong(
    proxy_factory, part: str, answer_bytes: bytes
):
    async def answer(reader, writer):
        await read_request(reader)
        writer.write(answer_bytes)
        await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url, MAX_RETRIES=0))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
            response = await client.get("/x/a")
    assert response.status_code == 502
    message = error_message(response).lower()
    assert "invalid" in message
    assert part in message


# --- Uploads --------------------------------------------------------------------------------


@contextlib.contextmanager
def stdlib_upstream(seen: list[dict[str, object]]) -> Iterator[str]:
    """Python's own http.server as upstream: it reads a body by Content-Length only (a chunked
    body reaches it as nothing). Each request's framing headers and body digest go to ``seen``."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            body = self.rfile.read(int(length)) if length is not None else b""
            seen.append(
                {
                    "content-length": length,
                    "transfer-encoding": self.headers.get("Transfer-Encoding"),
                    "size": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
            )
            reply = b'{"ok":true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("size", [1000, 3 * MiB + 17], ids=["small", "streamed"])
async def test_upload_keeps_the_clients_content_length(proxy_factory, size: int):
    """A body over 1 MiB is streamed to the upstream, still framed by the client's
    Content-Length: a server that cannot read chunked bodies receives every byte."""
    body = random.Random(size).randbytes(size)
    seen: list[dict[str, object]] = []
    with stdlib_upstream(seen) as url:
        proxy = proxy_factory(**extra_target(url))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as client:
            response = await client.post(
                "/x/upload", content=body, headers={"Content-Type": "application/octet-stream"}
            )
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True}
    assert seen == [
        {
            "content-length": str(size),
            "transfer-encoding": None,
            "size": size,
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    ]


async def test_client_hang_up_after_a_large_upload_aborts_the_upstream_request(
    proxy_factory, upstream
):
    """The client sends a 4 MiB body (streamed, not held), then hangs up while the upstream is
    still working on it: the upstream sees its request aborted within a second."""
    size = 4 * MiB
    got_all = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        if received == size:
            got_all.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    slow.raw_body = True  # type: ignore[attr-defined]
    upstream.route("/v1/files", slow)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    block = b"u" * MiB
    for _ in range(size // MiB):
        writer.write(block)
        await writer.drain()
    await asyncio.wait_for(got_all.wait(), 10)
    await asyncio.sleep(0.3)
    writer.close()
    hung_up_at = time.monotonic()
    await asyncio.wait_for(cancelled.wait(), 2)
    assert time.monotonic() - hung_up_at < 1.0


# --- Flow: back-pressure, silence, caps -------------------------------------------------------


async def test_a_client_that_stops_reading_stalls_the_upstreams_writes(proxy_factory):
    """The proxy holds no more than a few socket buffers of an answer its client is not reading:
    the upstream's writes stop far short of the body, and go on when the client reads again;
    the body arrives whole."""
    size = 96 * MiB
    written = 0

    async def answer(reader, writer):
        nonlocal written
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        block = b"b" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            written += len(block)
        await reader.read()

    async def stalled() -> int:
        """Wait until the upstream has written nothing more for half a second."""
        last = -1
        while written != last:
            last = written
            await asyncio.sleep(0.5)
        return last

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url))
        async with (
            httpx.AsyncClient(base_url=proxy.url, timeout=10) as client,
            client.stream("GET", "/x/big") as response,
        ):
            assert response.status_code == 200
            chunks = response.aiter_raw()
            received = len(await anext(chunks))
            stuck_at = await asyncio.wait_for(stalled(), 20)  # the client reads nothing now
            assert stuck_at < size // 3, f"the upstream wrote {stuck_at / MiB:.0f} MiB"
            async for chunk in chunks:
                received += len(chunk)
    assert received == size
    assert written == size


SILENT_AFTER = {
    "small-content-length": (b"Content-Length: 10\r\n", b"hello"),
    "large-content-length": (b"Content-Length: 4194304\r\n", b"x" * 65536),
    "chunked": (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"),
}


@pytest.mark.parametrize(("framing", "sent"), SILENT_AFTER.values(), ids=SILENT_AFTER.keys())
async def test_silence_between_body_chunks_cuts_the_response(
    proxy_factory, framing: bytes, sent: bytes
):
    """READ_TIMEOUT of silence in the middle of a body: the client's response is cut (or, for a
    body the proxy reads whole before answering, is a gateway error), promptly and never with a
    made-up end."""

    async def answer(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + sent)
        await writer.drain()
        await asyncio.sleep(5)

    async with RawServer(answer) as server:
        proxy = proxy_factory(**extra_target(server.url, READ_TIMEOUT=0.3))
        received = b""
        started = time.monotonic()
        async with (
            httpx.AsyncClient(base_url=proxy.url, timeout=5) as client,
            client.stream("GET", "/x/a") as response,
        ):
            if response.status_code == 200:
                with pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in response.aiter_raw():
                        received += chunk
            else:
                assert response.status_code in (502, 504)
                await response.aread()
        waited = time.monotonic() - started
    if framing.startswith(b"Content-Length"):
        assert sent.startswith(received)
    assert 0.25 <= waited < 2.5


async def test_connection_cap_per_target(proxy_factory, upstream):
    """UPSTREAM_MAX_CONNECTIONS=2: six concurrent slow requests all succeed, never more than two
    at a time on never more than two connections."""
    in_flight = most = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.3)
        finally:
            in_flight -= 1
        return web.json_response({"n": request.query["n"]})

    upstream.route("/slow", slow)
    async with CountingRelay(upstream.port) as relay:
        proxy = proxy_factory(**extra_target(relay.url, UPSTREAM_MAX_CONNECTIONS=2))
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.get(f"/x/slow?n={n}") for n in range(6))), 15
            )
        elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json() for r in responses] == [{"n": str(n)} for n in range(6)]
    assert most == 2
    assert relay.most_open <= 2
    assert relay.connections <= 2  # kept alive and reused
    assert elapsed >= 0.85  # three rounds of two


@pytest.mark.slow
async def test_mixed_load_leaves_no_connection_busy(proxy_factory, upstream):
    """300 concurrent requests: JSON of many sizes, streams, upstream break-offs and clients
    that hang up mid-stream. Every whole answer is intact, every broken one is cut (never
    finished), nothing hangs. Afterwards no connection is left busy: a burst of slow requests
    gets every one of the UPSTREAM_MAX_CONNECTIONS slots at once, and no more connections than
    that."""
    cap = 16
    rng = random.Random(7)
    in_flight = most = 0
    all_slots_busy = asyncio.Event()

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

    async def slow(request):
        """Held until ``cap`` of them are in flight at once (or 3 s have passed)."""
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == cap:
            all_slots_busy.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_slots_busy.wait(), 3)
            await asyncio.sleep(0.05)
        finally:
            in_flight -= 1
        return web.json_response({"ok": True})

    for name, handler in (("sized", sized), ("stream", stream), ("drop", drop), ("slow", slow)):
        upstream.route(f"/{name}", handler)
    outcomes: dict[str, int] = {"json": 0, "stream": 0, "cut": 0, "gone": 0}

    async def one(client: httpx.AsyncClient) -> None:
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

    async with CountingRelay(upstream.port) as relay:
        proxy = proxy_factory(**extra_target(relay.url, UPSTREAM_MAX_CONNECTIONS=cap))
        limits = httpx.Limits(max_connections=120)
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20, limits=limits) as client:
            await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(300))), 60)
            assert all(count > 10 for count in outcomes.values()), outcomes
            await asyncio.sleep(0.5)  # let the cut connections finish closing
            relay.most_open = relay.open_now
            accepted_before = relay.connections
            burst = await asyncio.wait_for(
                asyncio.gather(*(client.get("/x/slow") for _ in range(2 * cap))), 15
            )
    assert [r.status_code for r in burst] == [200] * (2 * cap)
    assert most == cap  # every slot was free again
    assert relay.most_open <= cap
    assert relay.connections - accepted_before <= cap
