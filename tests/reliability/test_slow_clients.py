"""Slow and idle clients cannot starve the service: heads and bodies are timed, heads are bounded,
and open connections are capped below the descriptor limit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import free_port


async def read_all(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time); a
    connection reset after the server closed (we were still writing) reads as the end."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionError:
        return b""


async def test_a_connection_that_sends_nothing_gets_408_and_is_closed(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CLIENT_HEAD_TIMEOUT=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    answer = await read_all(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    assert 0.4 < time.monotonic() - started < 3


async def test_a_head_sent_a_byte_at_a_time_is_cut(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CLIENT_HEAD_TIMEOUT=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    closed = False
    for byte in head:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        await asyncio.sleep(0.02)
        if reader.at_eof():
            closed = True
            break
    answer = await read_all(reader, 5)
    writer.close()
    assert closed or answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3
    assert upstream.requests == []


async def test_the_next_request_on_a_kept_alive_connection_is_timed_too(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CLIENT_HEAD_TIMEOUT=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if b"content-length" in line
    )
    await reader.readexactly(length)
    await asyncio.sleep(0.7)  # idle between requests: the keep-alive timeout's business (5 s)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    await writer.drain()
    started = time.monotonic()
    answer = await read_all(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < time.monotonic() - started < 2
    assert len(upstream.requests) == 1


async def test_a_body_that_stalls_is_cut_and_nothing_goes_upstream(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CLIENT_BODY_TIMEOUT=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    writer.write(b'{"model": ')
    await writer.drain()
    started = time.monotonic()
    answer = await read_all(reader, 5)
    writer.close()
    assert answer == b""  # closed: the request was abandoned, nothing to answer
    assert 0.4 < time.monotonic() - started < 3
    assert upstream.requests == []


async def test_a_slow_but_steady_body_is_not_cut(proxy_factory, upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, CLIENT_BODY_TIMEOUT=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    for _ in range(10):  # 1.5 s in all, never 0.5 s without a byte
        writer.write(b"a")
        await writer.drain()
        await asyncio.sleep(0.15)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert upstream.requests[0].body == b"a" * 10


@pytest.mark.parametrize(
    "extra",
    [
        b"".join(b"X-H%d: v\r\n" % i for i in range(150)),  # too many header lines
        b"X-Big: " + b"b" * 70_000 + b"\r\n",  # too many bytes
    ],
    ids=["lines", "bytes"],
)
async def test_an_oversized_head_gets_431(proxy_factory, upstream, extra: bytes):
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    with contextlib.suppress(ConnectionError):  # the server may close before reading it all
        await writer.drain()
    answer = await read_all(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert upstream.requests == []


@pytest.mark.slow
async def test_an_idle_flood_under_a_low_descriptor_limit_leaves_the_service_up(
    tmp_path: Path, upstream
):
    """2,000 idle connections against `aifd run` limited to 256 descriptors: those beyond the cap
    get 503 at once (not a reset), and a normal client is served all along."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600 and hard >= 2600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2600, hard))
    elif soft < 2600:
        pytest.skip(f"this test process may open only {soft} descriptors")
    port = free_port()
    (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={upstream.url}\nCLIENT_HEAD_TIMEOUT=60\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))}
    command = ["prlimit", "--nofile=256:256", sys.executable, "-m", "openai_forward", "run"]
    process = subprocess.Popen(  # noqa: ASYNC220 - started once; the test awaits its answers
        [*command, "--port", str(port), "--host", "127.0.0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    writers: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    await client.get("/healthz")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, "aifd run exited"
                    assert time.monotonic() < deadline, "aifd run did not start"
                    await asyncio.sleep(0.1)
            refused = served = 0
            for _ in range(20):
                opened = await asyncio.gather(
                    *(asyncio.open_connection("127.0.0.1", port) for _ in range(100))
                )
                writers += [writer for _, writer in opened]
                # a normal client is still served between the batches
                answer = await client.get("/v1/models")
                served += answer.status_code == 200
                # connections over the cap were answered 503 and closed at once
                for reader, _ in opened[-5:]:
                    try:
                        data = await asyncio.wait_for(reader.read(), 0.2)
                    except TimeoutError:
                        continue  # within the cap: held open, idle
                    if data.startswith(b"HTTP/1.1 503 "):
                        refused += 1
            assert process.poll() is None, "aifd run died"
    finally:
        for writer in writers:
            writer.close()
        process.terminate()
        process.wait(10)
        assert process.stderr is not None
        with process.stderr:
            stderr = process.stderr.read().decode()
    assert served == 20
    assert refused > 0
    assert "Refusing connections with 503" in stderr
    assert "Traceback" not in stderr
