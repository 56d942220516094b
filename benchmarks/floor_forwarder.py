"""The floor: the least a forwarder on this stack can do per request, for comparison only.

A raw ASGI app on uvicorn (uvloop, httptools) with one pooled aiohttp session: it reads the body,
sends it to ``OPENAI_BASE_URL`` + path, and relays status, content type and body as they arrive.
No header filtering, keys, limits, error handling or disconnect handling: what is left of our
proxy's cost above this is the price of its features.

    OPENAI_BASE_URL=http://127.0.0.1:9000 python benchmarks/floor_forwarder.py --port 9100
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

BASE = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000").rstrip("/")
state: dict[str, Any] = {}


async def lifespan(
    receive: Any, send: Any, start: Callable[[], Any], stop: Callable[[], Awaitable[None]]
) -> None:
    """The ASGI lifespan of both floors: ``start()`` its client, later ``await stop()``."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            start()
            await send({"type": "lifespan.startup.complete"})
        else:
            await stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _open_session() -> None:
    import aiohttp  # here, so that floor_raw_forwarder (sharing this module) never loads it

    state["session"] = aiohttp.ClientSession(auto_decompress=False)


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send, _open_session, lambda: state["session"].close())
        return
    body = (await receive())["body"]
    url = (
        BASE
        + scope["path"]
        + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
    )
    headers = {"Content-Type": "application/json"}
    async with state["session"].request(scope["method"], url, data=body, headers=headers) as r:
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


def main(asgi_app: Any, description: str | None) -> None:
    """``--host``/``--port`` and uvicorn with uvloop and httptools (shared by both floors)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    uvicorn.run(
        asgi_app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main(app, __doc__)
