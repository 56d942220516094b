"""The floor forwarder with aiohttp replaced by the proxy's own upstream client
(``openai_forward.h1``): for comparison only (``--targets floor,floor-raw`` in ``run.py``).

Same CLI, environment and behaviour as ``floor_forwarder.py``: read the body, POST it to
``OPENAI_BASE_URL`` + path (+ query), relay status, content type and body as they arrive. No header
filtering, keys, limits, retries or disconnect handling: what is left of our proxy's cost above
this is the price of its features.

    OPENAI_BASE_URL=http://127.0.0.1:9000 python benchmarks/floor_raw_forwarder.py --port 9101
"""

from __future__ import annotations

import os
from typing import Any

from floor_forwarder import lifespan

from openai_forward.h1 import Origin, Pool

BASE = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000").rstrip("/")
HEADERS = [(b"content-type", b"application/json")]
state: dict[str, Any] = {}


def _open_pool() -> None:
    state["pool"] = Pool(Origin(BASE), connect_timeout=10, read_timeout=600)


async def _close_pool() -> None:
    state["pool"].close()


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send, _open_pool, _close_pool)
        return
    body = (await receive())["body"]
    target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
    r = await state["pool"].request(scope["method"], target, HEADERS, body)
    try:
        ctype = r.header(b"content-type") or b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": r.status,
                "headers": [(b"content-type", ctype)],
            }
        )
        async for chunk in r:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        r.release()


if __name__ == "__main__":
    from floor_forwarder import main

    main(app, __doc__)
