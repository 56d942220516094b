"""When the proxy sends a request upstream again, and when it does not.

A request is sent again only when the upstream cannot have received it (no connection could be
made, or a pooled keep-alive connection turned out to be closed), or when the upstream said to
come back and coming back can help (another real key, or a short Retry-After). Anything else is
answered at once: a request that may have reached the upstream is never paid for twice."""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import struct
import time

import httpx
import pytest
from aiohttp import web

from tests import wire
from tests.conftest import RecordingUpstream
from tests.wire import CountingRelay, RawServer, error_message, read_message

ca, tls_upstream = wire.ca, wire.tls_upstream  # fixtures

CHAT = "/v1/chat/completions"


async def _post(proxy, payload: object, **headers: str) -> tuple[httpx.Response, float]:
    """POST a chat request; the response and how long it took."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        response = await client.post(CHAT, json=payload, headers=headers)
    return response, time.monotonic() - started


# --- The upstream cannot have received it: sent again -------------------------------------


@pytest.mark.parametrize("close", ["fin", "reset"])
async def test_stale_keep_alive_connection_is_retried_once_at_once(proxy_factory, close: str):
    """The upstream answers the first request and keeps the connection alive, then closes it
    when the next request comes (as when its idle timeout and the request cross). That request
    goes out again at once on a new connection, even with MAX_RETRIES=0."""
    seen: list[tuple[int, bytes]] = []

    async def answer(reader, writer):
        connection = server.connections
        while True:
            _, body = await read_message(reader)
            seen.append((connection, body))
            if connection == 1 and len(seen) == 2:
                if close == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                return  # closed without an answer
            reply = b'{"n":%d}' % len(seen)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
            await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(OPENAI_BASE_URL=server.url, MAX_RETRIES=0)
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            first = await client.post(CHAT, json={"a": 1})
            assert (first.status_code, first.json()) == (200, {"n": 1})
            started = time.monotonic()
            second = await client.post(CHAT, json={"a": 2})
            elapsed = time.monotonic() - started
    assert (second.status_code, second.json()) == (200, {"n": 3}), second.text
    # the same bytes, on the pooled connection and then once more on a new one
    assert seen == [(1, b'{"a":1}'), (1, b'{"a":2}'), (2, b'{"a":2}')]
    assert elapsed < 1.0  # no backoff


async def test_connect_refused_is_retried_with_backoff_until_the_upstream_listens(
    proxy_factory,
):
    """Nothing listens on the port for 0.3 s: the connection is refused, tried again after a
    backoff, and the request then reaches the upstream, once."""
    seen: list[bytes] = []

    async def answer(reader, writer):
        _, body = await read_message(reader)
        seen.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    proxy = proxy_factory(OPENAI_BASE_URL=f"http://127.0.0.1:{port}", MAX_RETRIES=3)

    async def listen_later() -> asyncio.Server:
        await asyncio.sleep(0.3)
        return await asyncio.start_server(answer, sock=sock)

    listening = asyncio.create_task(listen_later())
    try:
        response, elapsed = await _post(proxy, {"a": 1})
    finally:
        server = await listening
        server.close()
        await server.wait_closed()
    assert response.status_code == 200, response.text
    assert seen == [b'{"a":1}']
    assert 0.3 <= elapsed < 3


@pytest.mark.parametrize(("retries", "least", "most"), [(0, 0.0, 0.5), (2, 0.55, 3.0)])
async def test_connect_refused_gives_502_after_max_retries(
    proxy_factory, retries: int, least: float, most: float
):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        proxy = proxy_factory(OPENAI_BASE_URL=url, MAX_RETRIES=retries)
        response, elapsed = await _post(proxy, {})
    finally:
        sock.close()
    assert response.status_code == 502
    assert url in error_message(response)
    assert least <= elapsed < most  # 0.2 + 0.4 s of backoff for two retries


# --- It may have reached the upstream: answered at once -------------------------------------


async def test_post_lost_after_it_went_out_is_a_502_at_once(proxy_factory):
    """A new connection, the request written, then the upstream closes without an answer: it
    may be generating (and billing) already, so it is not sent again."""
    seen: list[bytes] = []

    async def answer(reader, writer):
        _, body = await read_message(reader)
        seen.append(body)  # and close, without an answer

    async with RawServer(answer) as server:
        proxy = proxy_factory(OPENAI_BASE_URL=server.url, MAX_RETRIES=3)
        response, elapsed = await _post(proxy, {"a": 1})
    assert response.status_code == 502
    assert server.url in error_message(response)
    assert seen == [b'{"a":1}']
    assert server.connections == 1
    assert elapsed < 1.0


async def test_malformed_answer_to_a_chat_post_is_a_502_sent_once(proxy_factory):
    seen: list[bytes] = []

    async def answer(reader, writer):
        _, body = await read_message(reader)
        seen.append(body)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with RawServer(answer) as server:
        proxy = proxy_factory(OPENAI_BASE_URL=server.url, MAX_RETRIES=3)
        response, elapsed = await _post(proxy, {"messages": []})
    assert response.status_code == 502
    assert "invalid" in error_message(response).lower()
    assert seen == [b'{"messages":[]}']
    assert server.connections == 1
    assert elapsed < 1.0


# After the failed handshake, asyncio's TLS server (the test's upstream, not our proxy, which runs
# on uvloop) leaves its side's transport to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_untrusted_certificate_is_not_retried(proxy_factory, tls_upstream):
    upstream, _ = tls_upstream
    async with CountingRelay(upstream.port) as relay:
        proxy = proxy_factory(OPENAI_BASE_URL=f"https://localhost:{relay.port}", MAX_RETRIES=3)
        response, elapsed = await _post(proxy, {})
    assert response.status_code == 502
    assert re.search(r"TLS certificate.* not trusted", error_message(response))
    assert relay.connections == 1
    assert upstream.requests == []
    assert elapsed < 1.0  # no backoff
    await asyncio.sleep(0.1)
    gc.collect()  # collect the upstream's abandoned transport now, under this test's filter


# --- The upstream said to come back ---------------------------------------------------------


def _always(status: int, retry_after: str | None = None):
    async def handler(request: web.Request) -> web.Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return web.json_response(
            {"error": {"message": f"status {status}"}}, status=status, headers=headers
        )

    return handler


@pytest.mark.parametrize("retry_after", [None, "30"], ids=["no-retry-after", "long-retry-after"])
async def test_429_with_one_key_is_relayed_at_once(
    proxy_factory, upstream: RecordingUpstream, retry_after: str | None
):
    """No other key and no short wait can help: the client's SDK does the backing off, told
    how long by the upstream's own Retry-After."""
    upstream.route(CHAT, _always(429, retry_after))
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real", MAX_RETRIES=3)
    response, elapsed = await _post(proxy, {})
    assert response.status_code == 429
    assert response.json() == {"error": {"message": "status 429"}}
    assert response.headers.get("retry-after") == retry_after
    assert len(upstream.requests) == 1
    assert elapsed < 1.0


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_without_retry_after_is_relayed_at_once(
    proxy_factory, upstream: RecordingUpstream, status: int
):
    upstream.route(CHAT, _always(status))
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real", MAX_RETRIES=2)
    response, elapsed = await _post(proxy, {})
    assert response.status_code == status
    assert response.json() == {"error": {"message": f"status {status}"}}
    assert len(upstream.requests) == 1
    assert elapsed < 1.0


@pytest.mark.parametrize("status", [429, 503])
async def test_short_retry_after_is_waited_and_retried(
    proxy_factory, upstream: RecordingUpstream, status: int
):
    calls = 0

    async def once_busy(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return await _always(status, "1")(request)
        return web.json_response({"ok": calls})

    upstream.route(CHAT, once_busy)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real", MAX_RETRIES=1)
    response, elapsed = await _post(proxy, {"a": 1})
    assert (response.status_code, response.json()) == (200, {"ok": 2})
    first, second = upstream.requests
    assert first.body == second.body == b'{"a":1}'
    assert 0.9 <= second.received_at - first.received_at < 2.0
    assert elapsed < 3.0


async def test_short_retry_after_is_relayed_when_no_retries_are_allowed(
    proxy_factory, upstream: RecordingUpstream
):
    upstream.route(CHAT, _always(429, "1"))
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real", MAX_RETRIES=0)
    response, elapsed = await _post(proxy, {})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert len(upstream.requests) == 1
    assert elapsed < 0.9


async def test_429_is_retried_at_once_with_the_other_key(
    proxy_factory, upstream: RecordingUpstream
):
    async def per_key(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        if key == "k1":
            return await _always(429)(request)
        return web.json_response({"answered": "second"})

    upstream.route(CHAT, per_key)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="k1,k2", FORWARD_KEY="fk", MAX_RETRIES=1
    )
    response, elapsed = await _post(proxy, {"a": 1}, Authorization="Bearer fk")
    assert (response.status_code, response.json()) == (200, {"answered": "second"})
    assert [r.headers["Authorization"] for r in upstream.requests] == ["Bearer k1", "Bearer k2"]
    assert [r.body for r in upstream.requests] == [b'{"a":1}'] * 2
    assert elapsed < 1.0
