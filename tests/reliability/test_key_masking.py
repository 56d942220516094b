"""No real key in a response, ever: an upstream that quotes the key it got (some
OpenAI-compatible servers echo it in their error messages) reaches the client masked."""

from __future__ import annotations

import httpx
from aiohttp import web

REAL = "sk-real-0123456789abcdef"
FORWARD = "fk-team"


async def test_a_quoted_key_is_masked_in_bodies_and_headers(proxy_factory, upstream):
    async def quoting(request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        message = {"error": {"message": f"Incorrect API key provided: {key}", "code": "bad"}}
        return web.json_response(message, status=401, headers={"X-Debug-Key": key})

    async def quoting_chunked(request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        response = web.StreamResponse(status=500)
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(f"upstream failed for key {key}".encode())
        await response.write_eof()
        return response

    async def fine(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return web.json_response({"note": f"you used {key}"})

    upstream.route("/v1/models", quoting)
    upstream.route("/v1/chunked", quoting_chunked)
    upstream.route("/v1/fine", fine)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY=REAL, FORWARD_KEY=FORWARD, MAX_RETRIES=0
    )
    headers = {"Authorization": f"Bearer {FORWARD}"}
    async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as client:
        answers = [await client.get(path) for path in ("/v1/models", "/v1/chunked", "/v1/fine")]
    refused, failed, ok = answers
    for answer in answers:
        assert REAL not in answer.text
        assert REAL not in str(answer.headers)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Incorrect API key provided: ***"
    assert refused.headers["x-debug-key"] == "***"
    assert int(refused.headers["content-length"]) == len(refused.content)
    assert failed.status_code == 500 and failed.text == "upstream failed for key ***"
    assert ok.json() == {"note": "you used ***"}
    # the upstream did get the real key each time
    assert all(r.headers["Authorization"] == f"Bearer {REAL}" for r in upstream.requests)
