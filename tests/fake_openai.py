"""OpenAI-shaped answers for the recording upstream, so the real OpenAI SDK can be the client."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from tests.conftest import RecordingUpstream


def _reply_text(body: dict) -> str:
    messages = body.get("messages") or [{"content": body.get("prompt", "")}]
    last = messages[-1].get("content") or ""
    return f"echo: {last}"


def _chunk(cid: str, model: str, delta: dict, finish: str | None = None, index: int = 0) -> bytes:
    payload = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
}


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    model = body.get("model", "gpt-test")
    text = _reply_text(body)
    wants_tools = bool(body.get("tools"))
    n = int(body.get("n", 1))
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    if not body.get("stream"):
        choices = []
        for i in range(n):
            message: dict = {"role": "assistant", "content": None if wants_tools else text}
            if wants_tools:
                message["tool_calls"] = [TOOL_CALL]
            finish = "tool_calls" if wants_tools else "stop"
            choices.append({"index": i, "message": message, "finish_reason": finish})
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": choices,
                "usage": usage,
            },
            headers={"x-request-id": "req-chat"},
        )
    delay = float(request.query.get("delay", "0"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(n):
        await response.write(
            _chunk("chatcmpl-1", model, {"role": "assistant", "content": ""}, index=i)
        )
        if wants_tools:
            args = TOOL_CALL["function"]["arguments"]
            first = {
                "index": 0,
                "id": TOOL_CALL["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
            await response.write(_chunk("chatcmpl-1", model, {"tool_calls": [first]}, index=i))
            for j in range(0, len(args), 7):
                part = {"index": 0, "function": {"arguments": args[j : j + 7]}}
                await response.write(_chunk("chatcmpl-1", model, {"tool_calls": [part]}, index=i))
            await response.write(_chunk("chatcmpl-1", model, {}, "tool_calls", index=i))
        else:
            for word in text.split(" "):
                piece = word if word == text.split(" ")[0] else " " + word
                await response.write(_chunk("chatcmpl-1", model, {"content": piece}, index=i))
                if delay:
                    await asyncio.sleep(delay)
            await response.write(_chunk("chatcmpl-1", model, {}, "stop", index=i))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.json_response(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1700000000,
            "model": body.get("model", "m"),
            "choices": [{"index": 0, "text": _reply_text(body), "finish_reason": "stop"}],
        }
    )


async def embeddings(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": [len(str(x)) / 10, 0.5, -0.25]}
        for i, x in enumerate(inputs)
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "e"),
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": "gpt-test", "object": "model", "created": 1, "owned_by": "me"}],
        }
    )


def _form(request: web.Request, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Multipart fields as name -> (filename, bytes), parsed from the recorded body."""
    from email.parser import BytesParser
    from email.policy import HTTP

    head = b"Content-Type: " + request.headers["Content-Type"].encode() + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    fields = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True))
    return fields


async def transcriptions(request: web.Request) -> web.Response:
    form = _form(request, await request.read())
    model = form["model"][1].decode()
    return web.json_response({"text": f"{model} heard {len(form['file'][1])} bytes"})


SPEECH = bytes(range(256)) * 400


async def speech(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await response.prepare(request)
    for i in range(0, len(SPEECH), 8192):
        await response.write(SPEECH[i : i + 8192])
    await response.write_eof()
    return response


async def files(request: web.Request) -> web.Response:
    form = _form(request, await request.read())
    filename, content = form["file"]
    return web.json_response(
        {
            "id": "file-1",
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": form["purpose"][1].decode(),
            "status": "processed",
        }
    )


def install(upstream: RecordingUpstream) -> RecordingUpstream:
    upstream.route("/v1/chat/completions", chat)
    upstream.route("/v1/completions", completions)
    upstream.route("/v1/embeddings", embeddings)
    upstream.route("/v1/models", models)
    upstream.route("/v1/audio/transcriptions", transcriptions)
    upstream.route("/v1/audio/speech", speech)
    upstream.route("/v1/files", files)
    return upstream
