"""OpenAI-shaped answers for the recording upstream, so the real OpenAI SDK can be the client."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

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


# --- The Responses API ---------------------------------------------------------------------

RESPONSE_CALL = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "get_weather",
    "arguments": '{"city": "Paris", "unit": "c"}',
    "status": "completed",
}
RESPONSE_USAGE = {
    "input_tokens": 5,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 12,
}
_response_ids = itertools.count(1)


def _input_text(body: dict) -> str:
    """The text of an input string, or of the last input message that has some."""
    given = body.get("input")
    if isinstance(given, str):
        return given
    for item in reversed(given if isinstance(given, list) else []):
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def response_object(body: dict, status: str = "completed") -> dict[str, Any]:
    """A response as the API gives it: a text message, or a function call when the request
    has tools. Each one made has an id of its own (``resp_1``, ``resp_2``, ...)."""
    text = f"echo: {_input_text(body)}"
    message = {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }
    return {
        "id": f"resp_{next(_response_ids)}",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model", "gpt-test"),
        "output": [dict(RESPONSE_CALL) if body.get("tools") else message],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": RESPONSE_USAGE,
        "user": None,
        "metadata": {},
    }


def event(kind: str, number: int, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": number, **fields})
    return f"event: {kind}\n".encode() + b"data: " + data + b"\n\n"


def response_events(body: dict, end: str = "completed") -> list[bytes]:
    """The typed events of a streamed response, as the API sends them: the text in word
    deltas, a function call's arguments in slices of 7 characters. ``end``: ``completed``,
    ``incomplete`` or ``failed`` (the last event), ``error`` (an error event instead), or
    ``none`` (no last event at all)."""
    final = response_object(body)
    if end in ("incomplete", "failed"):
        final["status"] = end
    if end == "incomplete":
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    if end == "failed":
        final["error"] = {"code": "server_error", "message": "The model failed"}
    start = {**final, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict]] = [
        ("response.created", {"response": start}),
        ("response.in_progress", {"response": start}),
    ]
    item = final["output"][0]
    if item["type"] == "function_call":
        where = {"item_id": item["id"], "output_index": 0}
        added = {**item, "arguments": "", "status": "in_progress"}
        events.append(("response.output_item.added", {"output_index": 0, "item": added}))
        arguments = item["arguments"]
        for i in range(0, len(arguments), 7):
            events.append(
                ("response.function_call_arguments.delta", {**where, "delta": arguments[i : i + 7]})
            )
        events.append(("response.function_call_arguments.done", {**where, "arguments": arguments}))
    else:
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        added = {**item, "status": "in_progress", "content": []}
        events.append(("response.output_item.added", {"output_index": 0, "item": added}))
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        events.append(("response.content_part.added", {**where, "part": part}))
        text = item["content"][0]["text"]
        words = text.split(" ")
        for number, word in enumerate(words):
            delta = word if number == 0 else " " + word
            events.append(("response.output_text.delta", {**where, "delta": delta, "logprobs": []}))
        events.append(("response.output_text.done", {**where, "text": text, "logprobs": []}))
        events.append(("response.content_part.done", {**where, "part": item["content"][0]}))
    events.append(("response.output_item.done", {"output_index": 0, "item": item}))
    if end == "error":
        events.append(("error", {"code": "server_error", "message": "overloaded", "param": None}))
    elif end != "none":
        events.append((f"response.{end}", {"response": final}))
    return [event(kind, number, **fields) for number, (kind, fields) in enumerate(events)]


def responses_ending(end: str = "completed", cut: bool = False):
    """A ``/v1/responses`` handler: JSON for a non-stream request (with the status ``end``
    gives), else the events of :func:`response_events`; ``cut``: the connection is closed
    instead of ending the stream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            status = end if end in ("incomplete", "failed") else "completed"
            return web.json_response(response_object(body, status))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for chunk in response_events(body, end):
            await response.write(chunk)
        if cut:
            await asyncio.sleep(0.05)
            request.transport.close()  # type: ignore[union-attr]
            return response
        await response.write_eof()
        return response

    return handler


responses = responses_ending()


def install(upstream: RecordingUpstream) -> RecordingUpstream:
    upstream.route("/v1/chat/completions", chat)
    upstream.route("/v1/responses", responses)
    upstream.route("/v1/completions", completions)
    upstream.route("/v1/embeddings", embeddings)
    upstream.route("/v1/models", models)
    upstream.route("/v1/audio/transcriptions", transcriptions)
    upstream.route("/v1/audio/speech", speech)
    upstream.route("/v1/files", files)
    return upstream
