"""Hand-written servers for tests of what the proxy does on the wire to its upstream: raw HTTP
answers byte by byte, a minimal HTTP forward proxy, a counting TCP relay, and the local CA that
TLS tests trust through SSL_CERT_FILE.

A test module that needs the fixtures ``ca``, ``ca_file`` or ``tls_upstream`` binds them to names
of its own (``ca = wire.ca``), which pytest finds as it finds fixtures defined there."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Self
from urllib.parse import urlsplit

import pytest
import trustme

from tests.conftest import RecordingUpstream

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LocalServer:
    """A server on 127.0.0.1 that counts its connections (and how many were open at once) and
    closes them all when it stops; ``handle`` does the talking."""

    tls: ssl.SSLContext | None = None  # serve over TLS

    def __init__(self) -> None:
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        self._writers.append(writer)
        try:
            await self.handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

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


class CountingRelay(LocalServer):
    """A TCP relay to ``127.0.0.1:port``: put it in front of an upstream to count the
    connections the proxy opens to it (accepted sockets, and how many were open at once)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.target_port = port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


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
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF (or a reset), then close the writing side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request with a Content-Length body (or none): its head and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length body (or none): its head; the body is dropped."""
    head, _ = await read_message(reader)
    return head


def extra_target(url: str, **env: object) -> dict[str, object]:
    """Proxy settings with a general (non-openai) target at ``/x`` pointing at ``url``."""
    return {
        "OPENAI_BASE_URL": "http://127.0.0.1:9",
        "EXTRA_BASE_URL": url,
        "EXTRA_ROUTE_PREFIX": "/x",
        **env,
    }


def error_message(response: object) -> str:
    """The message of an error answer in OpenAI's shape."""
    return response.json()["error"]["message"]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path, monkeypatch) -> str:
    """The proxy trusts the local CA (through the standard SSL_CERT_FILE) for this test."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return str(path)


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[tuple[RecordingUpstream, list[str]]]:
    """A recording upstream on https://localhost:PORT; the list gets each SNI name it is sent."""
    context = server_tls(ca, "localhost", "127.0.0.1")
    names: list[str] = []
    context.sni_callback = lambda _obj, name, _ctx: names.append(name) and None  # type: ignore[func-returns-value]
    server = RecordingUpstream(tls=context, host="localhost")
    await server.start()
    yield server, names
    await server.stop()
