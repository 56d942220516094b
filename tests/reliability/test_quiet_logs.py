"""Quiet logs under faults: an upstream that breaks off is one warning line, and so is a stream
cut by a shutdown; no ASGI error, no traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int = logging.WARNING) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()}" + (" +traceback" if r.exc_info else "")
            for r in self.records
            if r.levelno >= level
        ]


@pytest.fixture
def logs() -> Iterator[Records]:
    """Records of the proxy's and the server's loggers. Call ``watch()`` once the proxy runs:
    starting a server configures uvicorn's loggers afresh."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("openai_forward", "uvicorn.error")]
    handler.watch = lambda: [logger.addHandler(handler) for logger in loggers]  # type: ignore[attr-defined]
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


async def events(request: web.Request, count: int, pause: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(count):
        await response.write(b'data: {"n": %d}\n\n' % i)
        await asyncio.sleep(pause)
    return response


async def test_an_upstream_that_breaks_off_is_one_warning(proxy_factory, upstream, logs: Records):
    async def breaking(request: web.Request) -> web.StreamResponse:
        response = await events(request, 2, 0.05)
        assert request.transport is not None
        request.transport.abort()  # reset mid-stream
        return response

    upstream.route("/v1/chat/completions", breaking)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    logs.watch()  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/chat/completions", json={}) as answer:
                async for _ in answer.aiter_bytes():
                    pass
    await asyncio.sleep(0.2)
    lines = logs.lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("openai_forward: Upstream broke off mid-response")
    assert "traceback" not in lines[0]


async def test_a_stream_cut_by_shutdown_is_one_line(proxy_factory, upstream, logs: Records):
    async def endless(request: web.Request) -> web.StreamResponse:
        return await events(request, 1000, 0.05)

    upstream.route("/v1/chat/completions", endless)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, SHUTDOWN_TIMEOUT=0.5)
    logs.watch()  # type: ignore[attr-defined]
    received = b""
    async with (
        httpx.AsyncClient(base_url=proxy.url) as client,
        client.stream("POST", "/v1/chat/completions", json={}) as answer,
    ):
        stopping = asyncio.get_running_loop().run_in_executor(None, proxy.stop)
        with pytest.raises(httpx.RemoteProtocolError):
            async for chunk in answer.aiter_bytes():
                received += chunk
        await stopping
    assert received.startswith(b'data: {"n": 0}') and b"[DONE]" not in received
    cut = [line for line in logs.lines() if "Cut at shutdown" in line]
    assert cut == [
        "openai_forward: Cut at shutdown: POST /v1/chat/completions "
        "(still running after the graceful timeout)"
    ]
    # the server says once that it cancels what was left; nothing else, no traceback
    assert logs.lines(logging.ERROR) == [
        "uvicorn.error: Cancel 1 running task(s), timeout graceful shutdown exceeded"
    ]
    assert not [line for line in logs.lines() if "traceback" in line]
