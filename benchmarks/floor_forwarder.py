"""The floor: the least a forwarder on this stack can do per request, for comparison only.

A raw ASGI app on uvicorn (uvloop, httptools) with one pooled aiohttp session (no cookie jar, no
decompression, no automatic headers, as the proxy's own): it reads the body, sends it to
``OPENAI_BASE_URL`` + path, and relays status, content type and body as they arrive. No header
filtering, keys, limits, error handling or disconnect handling: what is left of our proxy's cost
above this is the price of its features.

    OPENAI_BASE_URL=http://127.0.0.1:9000 python benchmarks/floor_forwarder.py --port 9100
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import aiohttp
import uvicorn

BASE = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000").rstrip("/")
REQUEST_HEADERS = {"Content-Type": "application/json"}
state: dict[str, aiohttp.ClientSession] = {}


async def lifespan(receive: Any, send: Any) -> None:
    """Open the one session at start-up, close it at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            state["session"] = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
            await send({"type": "lifespan.startup.complete"})
        else:
            await state["session"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    url = BASE + scope["path"]
    if scope["query_string"]:
        url += "?" + scope["query_string"].decode()
    session = state["session"]
    async with session.request(scope["method"], url, data=body, headers=REQUEST_HEADERS) as r:
        ctype = r.headers.get("Content-Type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": r.status,
                "headers": [(b"content-type", ctype)],
            }
        )
        async for chunk in r.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
