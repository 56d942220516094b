"""Soak: many mixed requests through `aifd run` with every feature on, and faults on both sides.

    python benchmarks/soak.py --requests 100000 --concurrency 32 [--cache-backend LMDB]

Runs a mock OpenAI upstream in this process and the proxy as a real `aifd run` process with
LOG_CHAT, the chat and embedding cache and a Redis request limit (high enough never to refuse),
then sends a mix of chat answers, chat streams, embeddings and cache hits. 5 % of the clients hang
up early, 1 % of the streams are reset by the upstream and 1 % end without `[DONE]`. It prints the
proxy's RSS and open descriptors as it goes, and at the end: answers by kind, requests that got no
answer (must be 0), `[DONE]` seen where the upstream never sent it (must be 0), and chat-log
records against the calls that reached the proxy (must match exactly). Exit status 1 if any of
these is off. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

REQUEST_TIMEOUT = 30.0  # an answer slower than this counts as none
KINDS = ("chat", "stream", "embedding", "hit")
WEIGHTS = (35, 35, 15, 15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The mock upstream. The request's "user" field says what fault to play.


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    fault = body.get("user", "")
    await asyncio.sleep(random.uniform(0.002, 0.02))
    if not body.get("stream"):
        return web.json_response(
            {
                "id": "chatcmpl-soak",
                "object": "chat.completion",
                "model": body.get("model", "m"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "soak answer"}}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    try:
        await response.prepare(request)
        await _events(request, response, fault)
    except ConnectionError:
        pass  # the proxy left: its client hung up
    return response


async def _events(request: web.Request, response: web.StreamResponse, fault: str) -> None:
    for i in range(20):
        delta = {"content": f"t{i} "}
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if i == 10 and fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            return
        await asyncio.sleep(0.001)
    if fault != "truncate":
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


async def embeddings(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(random.uniform(0.002, 0.01))
    vector = [round(random.random(), 6) for _ in range(64)]
    return web.json_response(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": "e",
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
    )


class Tally:
    def __init__(self) -> None:
        self.answers: collections.Counter[str] = collections.Counter()
        self.unanswered = 0
        self.invented_done = 0
        self.reached_proxy = 0  # chat and embedding calls the proxy received whole


async def one_request(
    session: aiohttp.ClientSession, base: str, n: int, tally: Tally, rng: random.Random
) -> None:
    kind = rng.choices(KINDS, WEIGHTS)[0]
    fault = ""
    roll = rng.random()
    if kind == "stream" and roll < 0.01:
        fault = "reset"
    elif kind == "stream" and roll < 0.02:
        fault = "truncate"
    hang_up = rng.random() < 0.05
    if kind == "embedding":
        path, body = "/v1/embeddings", {"model": "e", "input": f"text {n}"}
    else:
        content = "the same question" if kind == "hit" else f"question {n}"
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": content}],
            "stream": kind == "stream",
            "user": fault,
            "caching": kind == "hit",
        }
        path = "/v1/chat/completions"
    tally.reached_proxy += 1
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async with session.post(base + path, json=body) as response:
                if hang_up:
                    await response.content.readany()  # the first bytes, then gone
                    response.close()
                    tally.answers[f"{kind} (client left)"] += 1
                    return
                data = await response.read()
                tally.answers[f"{kind} {response.status}"] += 1
                if fault and b"[DONE]" in data:
                    tally.invented_done += 1
    except aiohttp.ClientPayloadError:
        tally.answers[f"{kind} cut ({fault or 'unexpected'})"] += 1
        if not fault:
            tally.unanswered += 1
    except TimeoutError:
        tally.unanswered += 1
    except aiohttp.ClientError as exc:
        tally.answers[f"{kind} {type(exc).__name__}"] += 1
        tally.unanswered += 1


def proxy_vitals(pid: int) -> tuple[float, float, int]:
    """RSS and its anonymous part (the heap: what a leak grows; the rest is mapped files, such
    as an LMDB cache) in MiB, and open descriptors of the proxy's process."""
    sizes = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                sizes[name] = int(value.split()[0]) / 1024
    return sizes["VmRSS"], sizes["RssAnon"], len(os.listdir(f"/proc/{pid}/fd"))


def count_records(folder: Path) -> tuple[int, int]:
    asked = answered = 0
    for path in folder.rglob("*.log*"):
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            if "complete" in record:
                answered += 1
            else:
                asked += 1
    return asked, answered


async def soak(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="aifd-soak-"))
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()

    prefix = f"aifd-soak-{os.getpid()}"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))},
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}",
        "LOG_CHAT": "true",
        "LOG_FOLDER": str(work / "Log"),
        "CACHE_CHAT_COMPLETION": "true",
        "CACHE_EMBEDDING": "true",
        "CACHE_BACKEND": args.cache_backend,
        "CACHE_ROOT_PATH_OR_URL": str(work / "cache")
        if args.cache_backend != "REDIS"
        else args.redis,
        "REQ_RATE_LIMIT": '{"/v1/chat/completions": "1000000/minute", "/v1/embeddings": "1000000/minute"}',
        "REQ_RATE_LIMIT_BACKEND": args.redis,
        "REDIS_KEY_PREFIX": prefix,
        "MAX_RETRIES": "0",
    }
    command = [sys.executable, "-m", "openai_forward", "run", "--host", "127.0.0.1"]
    proxy = subprocess.Popen(  # noqa: ASYNC220 - started once
        [*command, "--port", str(port)], cwd=work, env=env, stdout=subprocess.DEVNULL
    )
    tally = Tally()
    base = f"http://127.0.0.1:{port}"
    failed = False
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(base + "/healthz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proxy.poll() is not None or time.monotonic() > deadline:
                    print("the proxy did not start", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.1)
            pid = proxy.pid
            rng = random.Random(args.seed)
            queue = iter(range(args.requests))
            started = time.monotonic()
            last_report = 0.0

            async def worker() -> None:
                nonlocal last_report
                for n in queue:
                    await one_request(session, base, n, tally, rng)
                    now = time.monotonic()
                    if now - last_report >= args.report_every:
                        last_report = now
                        rss, heap, fds = proxy_vitals(pid)
                        done = sum(tally.answers.values())
                        print(
                            f"{now - started:7.1f} s  {done:7d} done  "
                            f"RSS {rss:6.1f} MiB (heap {heap:6.1f})  fds {fds:4d}",
                            flush=True,
                        )

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.monotonic() - started
            rss, heap, fds = proxy_vitals(pid)
            print(
                f"{elapsed:7.1f} s  all done  RSS {rss:6.1f} MiB (heap {heap:6.1f})  fds {fds:4d}"
            )
        # the chat log's writer is a thread: give it a moment to write the last records
        expected = tally.reached_proxy
        for _ in range(100):
            asked, answered = count_records(work / "Log")
            if asked >= expected and answered >= expected:
                break
            await asyncio.sleep(0.1)
    finally:
        proxy.terminate()
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
            failed = True
        await runner.cleanup()
        await _clean_redis(args.redis, prefix)
    asked, answered = count_records(work / "Log")
    print("\nanswers by kind:")
    for name, count in sorted(tally.answers.items()):
        print(f"  {name:40s} {count:8d}")
    print(f"requests without an answer: {tally.unanswered}")
    print(f"[DONE] the upstream never sent: {tally.invented_done}")
    print(f"chat-log request records: {asked}, answer records: {answered}, calls: {expected}")
    print(f"proxy exit status: {proxy.returncode}")
    failed = (
        failed
        or tally.unanswered != 0
        or tally.invented_done != 0
        or asked != expected
        or answered != expected
        or proxy.returncode != 0
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


async def _clean_redis(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache-backend", default="MEMORY", choices=("MEMORY", "LMDB", "REDIS"))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args: Any = parser.parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
