"""CPU per relayed WebSocket frame, against CPU per relayed SSE event, through `aifd run`.

    python benchmarks/ws_frames.py [--frames 20000] [--connections 8]

Starts a WebSocket echo upstream (aiohttp) and a streaming chat upstream in this process, and the
proxy as a real `aifd run` process. Clients send text frames through the proxy and read the
echoes (each frame is relayed twice: up and down); then stream 20-event chat answers through it.
Prints the proxy's CPU per relayed frame and per relayed SSE event (from /proc), each measured
over its own phase. Loopback only; bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
from aiohttp import web

EVENTS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


async def chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(EVENTS):
        await response.write(b'data: {"choices":[{"delta":{"content":"t%d "}}]}\n\n' % i)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def main(args: argparse.Namespace) -> None:
    app = web.Application()
    app.router.add_get("/v1/realtime", echo)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))},
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}",
    }
    command = [sys.executable, "-m", "openai_forward", "run", "--host", "127.0.0.1"]
    proxy = subprocess.Popen(  # noqa: ASYNC220 - started once
        [*command, "--port", str(port)],
        cwd=tempfile.mkdtemp(prefix="aifd-ws-"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(base + "/healthz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            per_connection = args.frames // args.connections

            async def talk() -> None:
                async with session.ws_connect(base.replace("http", "ws") + "/v1/realtime") as ws:
                    for n in range(per_connection):
                        await ws.send_str(f'{{"type":"input_text","n":{n}}}')
                        await ws.receive()

            async def stream() -> None:
                async with session.post(base + "/v1/chat/completions", json={"stream": True}) as r:
                    await r.read()

            await asyncio.gather(*(talk() for _ in range(2)))  # warm-up
            before = cpu_seconds(proxy.pid)
            started = time.monotonic()
            await asyncio.gather(*(talk() for _ in range(args.connections)))
            frames = 2 * per_connection * args.connections  # up and down
            ws_cpu = cpu_seconds(proxy.pid) - before
            ws_wall = time.monotonic() - started

            streams = args.frames // EVENTS // 2
            before = cpu_seconds(proxy.pid)
            for _ in range(streams // args.connections):
                await asyncio.gather(*(stream() for _ in range(args.connections)))
            sse_cpu = cpu_seconds(proxy.pid) - before
            events = (streams // args.connections) * args.connections * EVENTS
    finally:
        proxy.terminate()
        proxy.wait(30)
        await runner.cleanup()
    print(
        f"WebSocket: {frames} frames relayed in {ws_wall:.1f} s, CPU {ws_cpu * 1e6 / frames:.1f} µs/frame"
    )
    print(
        f"SSE: {events} events in {events // EVENTS} streams, CPU {sse_cpu * 1e6 / events:.1f} µs/event"
        " (the stream's whole cost, request included, shared by its events)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
