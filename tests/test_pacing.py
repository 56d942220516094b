"""TOKEN_RATE_LIMIT: streams leave the proxy event by event, no faster than the pace,
measured at a real client socket."""

from __future__ import annotations

import itertools
import time

import httpx
import orjson
from aiohttp import web

from tests.conftest import RecordingUpstream

CHAT = "/v1/chat/completions"
EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(11)] + [b"data: [DONE]\n\n"]


def one_read_handler(payload: bytes):
    """An upstream that sends the whole stream in one write: one read for the proxy."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(payload)
        await response.write_eof()
        return response

    return handler


async def arrivals(url: str, path: str) -> tuple[list[float], bytes]:
    """When each event reached the client, and the whole body."""
    times: list[float] = []
    body = b""
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream("POST", path, json={"stream": True}) as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            now = time.monotonic()
            body += chunk
            times += [now] * (body.count(b"\n\n") - len(times))
    return times, body


async def test_coalesced_events_leave_one_by_one_at_the_pace(proxy_factory, upstream):
    upstream.route(CHAT, one_read_handler(b"".join(EVENTS)))
    upstream.route("/v1/completions", one_read_handler(b"".join(EVENTS)))
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, TOKEN_RATE_LIMIT=orjson.dumps({CHAT: "10/second"}).decode()
    )
    times, body = await arrivals(proxy.url, CHAT)
    assert body == b"".join(EVENTS)
    assert len(times) == 12
    assert times[-1] - times[0] >= 1.1 - 0.02  # 11 gaps of 0.1 s (clock reads at the client)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.08 <= gap <= 0.3 for gap in gaps), gaps  # evenly spaced, no bursts

    # a route not named in TOKEN_RATE_LIMIT is not paced
    times, body = await arrivals(proxy.url, "/v1/completions")
    assert body == b"".join(EVENTS)
    assert times[-1] - times[0] < 0.5


async def test_an_unterminated_last_event_is_paced_too(proxy_factory, upstream: RecordingUpstream):
    upstream.route(CHAT, one_read_handler(b'data: {"n": 1}\n\ndata: {"n": 2}'))
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, TOKEN_RATE_LIMIT=orjson.dumps({CHAT: "4/second"}).decode()
    )
    start = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=30) as client,
        client.stream("POST", CHAT, json={"stream": True}) as response,
    ):
        chunks = [(time.monotonic(), chunk) async for chunk in response.aiter_raw()]
    assert b"".join(c for _, c in chunks) == b'data: {"n": 1}\n\ndata: {"n": 2}'
    tail_at = next(t for t, c in chunks if c.endswith(b'{"n": 2}'))
    assert tail_at - start >= 0.25 - 0.02


async def test_other_spellings_of_a_paced_route_are_paced(proxy_factory, upstream):
    upstream.route(CHAT + "/", one_read_handler(b"".join(EVENTS[:6])))
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, TOKEN_RATE_LIMIT=orjson.dumps({CHAT: "10/second"}).decode()
    )
    times, body = await arrivals(proxy.url, CHAT + "/")
    assert body == b"".join(EVENTS[:6])
    assert times[-1] - times[0] >= 0.5 - 0.02  # 5 gaps of 0.1 s
