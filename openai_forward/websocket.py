"""WebSocket pass-through (OpenAI's Realtime API and anything else that upgrades under a prefix).

The upgrade is checked like any request (path, address lists, keys, one hit of the request
limit), then the proxy opens its own WebSocket to the upstream's ``ws(s)://`` URL and relays
frames both ways, text and binary, each side waiting for the other to take a frame before it
reads the next (back-pressure), and the close code of whichever side closes first. An upstream
that refuses the upgrade is answered as an HTTP error before the client's upgrade completes.

Browser clients cannot set ``Authorization`` on a WebSocket and pass their key in a subprotocol
``openai-insecure-api-key.<key>`` instead: a forward key there is swapped for a real key just as
in the header. No chat-log record is written for a session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from openai_forward.auth import Credentials
from openai_forward.errors import ProxyError, error_body
from openai_forward.outcome import Outcome
from openai_forward.types import Message, Receive, Scope, Send
from openai_forward.upstream import Upstream, UpstreamSocket

logger = logging.getLogger("openai_forward")

KEY_PROTOCOL = "openai-insecure-api-key."
# Close codes that mark a missing or abnormal close: they may not be sent in a close frame.
_NOT_SENDABLE = frozenset({1005, 1006, 1015})


def swap_key_protocol(
    protocols: Sequence[str], real_key: str | None
) -> tuple[list[str], str | None]:
    """The subprotocols to offer upstream, and the client's key if one travelled among them.

    With ``real_key`` the key protocol is replaced by one carrying the real key."""
    offered: list[str] = []
    client_key = None
    for protocol in protocols:
        if protocol.startswith(KEY_PROTOCOL):
            client_key = protocol[len(KEY_PROTOCOL) :]
            if real_key is not None:
                protocol = KEY_PROTOCOL + real_key
        offered.append(protocol)
    return offered, client_key


def key_from_protocols(scope: Scope) -> str | None:
    """The client's key as an ``Authorization`` value, if it came in a subprotocol."""
    key = swap_key_protocol(scope.get("subprotocols", []), None)[1]
    return None if key is None else f"Bearer {key}"


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """Answer an upgrade with an HTTP error in OpenAI's shape, where the server allows it (the
    ASGI ``websocket.http.response`` extension), else with a policy-violation close."""
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before the handshake
    await _refuse_connected(scope, send, status, message)


async def _refuse_connected(scope: Scope, send: Send, status: int, message: str) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_body(status, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})


async def relay_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    upstream: Upstream,
    url_path: bytes,
    headers: list[tuple[bytes, bytes]],
    creds: Credentials,
    outcome: Outcome,
) -> None:
    """Open the upstream WebSocket for an accepted upgrade request and relay until one side
    closes. ``creds`` decide the key sent upstream, in the place the client put its own."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client left before the handshake
    key = upstream.pool_key() if creds.use_pool else None
    protocols, client_key = swap_key_protocol(scope.get("subprotocols", []), key)
    sent = list(headers)
    if key is not None and client_key is None:
        sent.append((b"authorization", b"Bearer " + key.encode("latin-1")))
    elif creds.authorization is not None and client_key is None:
        sent.append((b"authorization", creds.authorization.encode("latin-1")))
    try:
        socket = await upstream.websocket(url_path, scope["query_string"], sent, protocols)
    except ProxyError as exc:
        outcome.status = exc.status
        await _refuse_connected(scope, send, exc.status, exc.message)
        return
    try:
        chosen = socket.protocol
        if chosen is not None and chosen.startswith(KEY_PROTOCOL):
            chosen = KEY_PROTOCOL + (client_key or "")  # never show the real key
        await send({"type": "websocket.accept", "subprotocol": chosen})
        outcome.status = 101
        await _pump(receive, send, socket, outcome)
    finally:
        await socket.close()


async def _pump(receive: Receive, send: Send, socket: UpstreamSocket, outcome: Outcome) -> None:
    client_closed = asyncio.Event()

    async def client_to_upstream() -> None:
        while True:
            message: Message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    await socket.send_text(text)
                else:
                    await socket.send_bytes(message.get("bytes") or b"")
            elif kind == "websocket.disconnect":
                client_closed.set()
                code = message.get("code", 1000)
                await socket.close(1000 if code in _NOT_SENDABLE else code, message.get("reason"))
                return

    upward = asyncio.create_task(client_to_upstream())
    try:
        while True:
            frame = await socket.receive()
            if frame.text is not None:
                await send({"type": "websocket.send", "text": frame.text})
                outcome.bytes_sent += len(frame.text)
            elif frame.data is not None:
                await send({"type": "websocket.send", "bytes": frame.data})
                outcome.bytes_sent += len(frame.data)
            else:  # the upstream closed, or the connection to it was lost
                if not client_closed.is_set():
                    code = frame.close_code or 1011
                    code = 1011 if code in _NOT_SENDABLE else code
                    await send({"type": "websocket.close", "code": code, "reason": frame.reason})
                return
    except (ConnectionError, OSError) as exc:  # the upstream socket broke while writing
        logger.warning("WebSocket to the upstream broke off: %s", exc)
        if not client_closed.is_set():
            await send({"type": "websocket.close", "code": 1011})
    finally:
        if not client_closed.is_set():
            upward.cancel()
        # else it is closing the upstream socket with the client's code: let it finish
        await asyncio.gather(upward, return_exceptions=True)
