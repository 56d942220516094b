"""HTTP/1.0 clients get close-delimited bodies, streamed as they come; a request for a prefix
exactly goes upstream as the base URL's own path."""

from __future__ import annotations

import asyncio
import time

import httpx
from aiohttp import web


async def test_an_http10_client_gets_a_stream_close_delimited_and_incremental(
    proxy_factory, upstream
):
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(4):
            await response.write(b'data: {"n": %d}\n\n' % i)
            await asyncio.sleep(0.2)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    upstream.route("/v1/chat/completions", stream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    arrivals: list[tuple[float, bytes]] = []
    while chunk := await asyncio.wait_for(reader.read(65536), 5):
        arrivals.append((time.monotonic() - started, chunk))
    writer.close()
    body = b"".join(chunk for _, chunk in arrivals)
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"".join(b'data: {"n": %d}\n\n' % i for i in range(4)) + b"data: [DONE]\n\n"
    # the events came as the upstream sent them, not all at the end
    assert arrivals[0][0] < arrivals[-1][0] - 0.4


async def test_an_http10_client_gets_a_whole_answer_with_its_length(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v1/models HTTP/1.0\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(body) in head.lower()
    assert body == b'{"echo": "/v1/models", "size": 0}'


async def test_a_request_for_a_prefix_exactly_goes_to_the_base_path(proxy_factory, upstream):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        EXTRA_BASE_URL=f"{upstream.url}/base,{upstream.url}",
        EXTRA_ROUTE_PREFIX="/gemini,/claude",
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        answers = [
            await client.get(path) for path in ("/gemini", "/gemini?x=1", "/claude", "/claude?y=2")
        ]
    assert all(a.status_code == 200 for a in answers)
    assert [r.path_qs for r in upstream.requests] == ["/base", "/base?x=1", "/", "/?y=2"]
