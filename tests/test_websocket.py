"""WebSocket pass-through through the real proxy: a real WebSocket client (``websockets``) to a
local aiohttp WebSocket upstream that records the handshake it got."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from aiohttp import WSMsgType, web
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import RecordingUpstream

REAL = "sk-real-key-0123456789"
FORWARD = "fk-forward-key"


class WebSocketUpstream(RecordingUpstream):
    """Echoes text and binary frames; ``close <code>`` makes it close with that code."""

    def __init__(self) -> None:
        super().__init__()
        self.handshakes: list[dict[str, str]] = []
        self.client_close_codes: list[int | None] = []
        self.route("/v1/realtime", self._realtime)

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        if request.headers.get("Authorization", "").endswith("bad-key"):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        ws = web.WebSocketResponse(protocols=("realtime",), autoclose=False)
        await ws.prepare(request)
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.TEXT:
                if message.data.startswith("close "):
                    await ws.close(code=int(message.data.split()[1]), message=b"as asked")
                    break
                await ws.send_str("echo:" + message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + message.data)
            else:  # the proxy closed: note the code its close frame carried
                self.client_close_codes.append(
                    message.data if message.type is WSMsgType.CLOSE else None
                )
                await ws.close()
                break
        return ws


@pytest.fixture
async def ws_upstream():
    server = WebSocketUpstream()
    await server.start()
    yield server
    await server.stop()


def ws_url(proxy, path: str = "/v1/realtime?model=gpt-realtime") -> str:
    return proxy.url.replace("http://", "ws://") + path


async def test_frames_both_ways_with_the_key_swapped_in_the_header(proxy_factory, ws_upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=ws_upstream.url, OPENAI_API_KEY=REAL, FORWARD_KEY=FORWARD)
    async with websockets.connect(
        ws_url(proxy), additional_headers={"Authorization": f"Bearer {FORWARD}"}
    ) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:hello"
        await ws.send(b"\x00\x01binary")
        assert await asyncio.wait_for(ws.recv(), 5) == b"echo:\x00\x01binary"
    (handshake,) = ws_upstream.handshakes
    assert handshake["Authorization"] == f"Bearer {REAL}"
    assert FORWARD not in str(handshake)
    assert ws_upstream.requests[0].path_qs == "/v1/realtime?model=gpt-realtime"


async def test_key_in_the_subprotocol_is_swapped_and_never_shown(proxy_factory, ws_upstream):
    """Browsers pass their key as ``openai-insecure-api-key.<key>``."""
    proxy = proxy_factory(OPENAI_BASE_URL=ws_upstream.url, OPENAI_API_KEY=REAL, FORWARD_KEY=FORWARD)
    offered = ["realtime", f"openai-insecure-api-key.{FORWARD}"]
    async with websockets.connect(ws_url(proxy), subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "realtime"
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:hi"
    (handshake,) = ws_upstream.handshakes
    offered_upstream = [p.strip() for p in handshake["Sec-WebSocket-Protocol"].split(",")]
    assert offered_upstream == ["realtime", f"openai-insecure-api-key.{REAL}"]
    assert "Authorization" not in handshake


async def test_close_codes_are_relayed_both_ways(proxy_factory, ws_upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=ws_upstream.url)
    async with websockets.connect(ws_url(proxy)) as ws:
        await ws.send("close 4001")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert closed.value.rcvd.reason == "as asked"

    async with websockets.connect(ws_url(proxy)) as ws:
        await ws.send("x")
        await asyncio.wait_for(ws.recv(), 5)
        await ws.close(code=4002)
    for _ in range(100):
        if ws_upstream.client_close_codes:
            break
        await asyncio.sleep(0.02)
    assert ws_upstream.client_close_codes[-1] == 4002


async def test_upstream_refusal_is_an_http_error_before_the_upgrade(proxy_factory, ws_upstream):
    proxy = proxy_factory(OPENAI_BASE_URL=ws_upstream.url, FORWARD_KEY=FORWARD)
    # not a forward key: forwarded as it is, and the upstream refuses it
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            ws_url(proxy), additional_headers={"Authorization": "Bearer bad-key"}
        )
    assert refused.value.response.status_code == 401
    assert b"refused the WebSocket upgrade (401)" in refused.value.response.body

    with pytest.raises(InvalidStatus) as missing:  # the upstream has no WebSocket there
        await websockets.connect(ws_url(proxy, "/v1/chat/completions"))
    assert missing.value.response.status_code == 502  # it answered 200 instead of 101

    dead = proxy_factory(OPENAI_BASE_URL="http://127.0.0.1:9", MAX_RETRIES=0)
    with pytest.raises(InvalidStatus) as down:
        await websockets.connect(ws_url(dead))
    assert down.value.response.status_code == 502
    assert b"unreachable" in down.value.response.body


async def test_an_upgrade_is_one_request_for_limits_and_address_lists(proxy_factory, ws_upstream):
    limited = proxy_factory(
        OPENAI_BASE_URL=ws_upstream.url, REQ_RATE_LIMIT='{"/v1/realtime": "1/minute"}'
    )
    async with websockets.connect(ws_url(limited)) as ws:
        await ws.send("one")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:one"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(ws_url(limited))
    assert refused.value.response.status_code == 429
    assert refused.value.response.headers.get("Content-Type") == "application/json"

    barred = proxy_factory(OPENAI_BASE_URL=ws_upstream.url, IP_BLACKLIST="127.0.0.1")
    with pytest.raises(InvalidStatus) as forbidden:
        await websockets.connect(ws_url(barred))
    assert forbidden.value.response.status_code == 403
    bad_path = proxy_factory(OPENAI_BASE_URL=ws_upstream.url)
    with pytest.raises(InvalidStatus) as invalid:
        await websockets.connect(ws_url(bad_path, "/v1/%2e%2e/realtime"))
    assert invalid.value.response.status_code == 400
    assert len(ws_upstream.handshakes) == 1


async def test_proxy_is_honoured_for_websockets(proxy_factory, ws_upstream):
    """PROXY carries WebSockets too (here a SOCKS proxy, which tunnels any connection)."""
    from tests.socks_server import Socks5Server

    async with Socks5Server() as socks:
        proxy = proxy_factory(
            OPENAI_BASE_URL=ws_upstream.url, PROXY=f"socks5://127.0.0.1:{socks.port}"
        )
        async with websockets.connect(ws_url(proxy)) as ws:
            await ws.send("through the proxy")
            assert await asyncio.wait_for(ws.recv(), 5) == "echo:through the proxy"
    assert socks.connects == [(None, "127.0.0.1", int(ws_upstream.url.rsplit(":", 1)[1]))]
    assert len(ws_upstream.handshakes) == 1
