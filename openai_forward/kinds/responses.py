"""The Responses API (``POST /v1/responses``) in the cache and in ``aifd convert`` (pure).

A streamed answer is a sequence of typed events (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.output_text.delta``, ...) that ends with
``response.completed``, ``response.incomplete`` or ``response.failed``; there is no
``data: [DONE]``. Only ``response.completed`` ends a whole, successful answer, and its event
carries the final ``response`` object: that object is the entry, exactly what a non-stream
request gets. A stream hit renders the entry back as events, in the order the API sends them,
with sequence numbers, so that an SDK's stream helper assembles the same response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from openai_forward.sse import DONE, parse_data, stream_payloads

COMPLETED = "response.completed"
INCOMPLETE = "response.incomplete"
FAILED = "response.failed"
ENDINGS = frozenset({COMPLETED, INCOMPLETE, FAILED})  # the events that end a stream
_UNSUCCESSFUL = frozenset({"error", INCOMPLETE, FAILED})


def cacheable(payload: dict[str, Any]) -> bool:
    """Whether a request may be answered from the cache (and its answer stored).

    Not when its answer depends on state the upstream keeps (``previous_response_id``, a
    ``conversation``, the current version of a ``prompt`` template) or when the call has an
    effect a replay would skip (a ``conversation`` gets the turn appended; ``background`` queues
    a job to poll by id). ``store`` is part of the key like any field; see docs/cache.md.
    """
    if payload.get("previous_response_id") is not None or payload.get("conversation") is not None:
        return False
    if payload.get("background") is True:
        return False
    prompt = payload.get("prompt")
    return prompt is None or (isinstance(prompt, dict) and prompt.get("version") is not None)


def is_completed(response: Any) -> bool:
    """A whole successful response object: status ``completed``, no error, an output list."""
    return (
        isinstance(response, dict)
        and response.get("object", "response") == "response"
        and response.get("status") == "completed"
        and not response.get("error")
        and isinstance(response.get("output"), list)
    )


def is_whole(body: bytes) -> bool:
    """Whether a whole 2xx JSON body is a completed response. (Every response object has an
    ``"error": null`` key, so the first-bytes check of chat answers cannot serve here; a
    response is parsed, which costs little next to its generation.)"""
    try:
        return is_completed(orjson.loads(body))
    except orjson.JSONDecodeError:
        return False


def from_stream(body: bytes) -> bytes | None:
    """The final response of a whole stream, or None unless the stream reached
    ``response.completed`` with no error, failure or incompleteness on the way."""
    payloads = [data for data in stream_payloads(body) if data != DONE]
    events = parse_data(payloads)
    if events is None:
        return None
    added: set[int] = set()
    done: dict[int, Any] = {}
    for event in events:
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(kind, str) or kind in _UNSUCCESSFUL:
            return None
        index = event.get("output_index")
        if kind == "response.output_item.added" and isinstance(index, int):
            added.add(index)
        elif kind == "response.output_item.done" and isinstance(index, int):
            done[index] = event.get("item")
        elif kind == COMPLETED:
            response = event.get("response")
            if isinstance(response, dict) and not response.get("output") and done:
                # Some servers leave the output out of the last event: the items' own ``done``
                # events make it, provided every item that began also ended.
                if not added <= done.keys():
                    return None
                response = {**response, "output": [done[i] for i in sorted(done)]}
            return orjson.dumps(response) if is_completed(response) else None
    return None


Emit = Callable[..., None]


def to_stream(entry: bytes, payload: dict[str, Any]) -> bytes:
    """The event stream a stream request gets from a stored response: ``response.created`` and
    ``response.in_progress`` (the response without output), each output item added, filled
    (text and refusal parts, function call arguments) and done, then ``response.completed``
    with the stored response."""
    response = orjson.loads(entry)
    out: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        data = orjson.dumps({"type": kind, "sequence_number": len(out), **fields})
        out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")

    start = {**response, "status": "in_progress", "output": [], "usage": None}
    if "completed_at" in start:
        start["completed_at"] = None
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for index, item in enumerate(response.get("output") or ()):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            _message(emit, index, item)
        elif item.get("type") == "function_call":
            _function_call(emit, index, item)
        else:  # reasoning, hosted tool calls, ...: whole as they are
            emit("response.output_item.added", output_index=index, item=item)
            emit("response.output_item.done", output_index=index, item=item)
    emit(COMPLETED, response=response)
    return b"".join(out)


def _in_progress(item: dict[str, Any], **empty: Any) -> dict[str, Any]:
    started = {**item, **empty}
    if "status" in item:
        started["status"] = "in_progress"
    return started


def _message(emit: Emit, index: int, item: dict[str, Any]) -> None:
    emit("response.output_item.added", output_index=index, item=_in_progress(item, content=[]))
    item_id = item.get("id", "")
    for number, part in enumerate(item.get("content") or ()):
        where = {"item_id": item_id, "output_index": index, "content_index": number}
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "output_text":
            text, logprobs = part.get("text") or "", part.get("logprobs") or []
            empty = {**part, "text": "", "annotations": []}
            if "logprobs" in part:
                empty["logprobs"] = []
            emit("response.content_part.added", **where, part=empty)
            emit("response.output_text.delta", **where, delta=text, logprobs=logprobs)
            emit("response.output_text.done", **where, text=text, logprobs=logprobs)
        elif kind == "refusal":
            refusal = part.get("refusal") or ""
            emit("response.content_part.added", **where, part={**part, "refusal": ""})
            emit("response.refusal.delta", **where, delta=refusal)
            emit("response.refusal.done", **where, refusal=refusal)
        else:
            emit("response.content_part.added", **where, part=part)
        emit("response.content_part.done", **where, part=part)
    emit("response.output_item.done", output_index=index, item=item)


def _function_call(emit: Emit, index: int, item: dict[str, Any]) -> None:
    emit("response.output_item.added", output_index=index, item=_in_progress(item, arguments=""))
    where = {"item_id": item.get("id", ""), "output_index": index}
    arguments = item.get("arguments") or ""
    emit("response.function_call_arguments.delta", **where, delta=arguments)
    emit("response.function_call_arguments.done", **where, arguments=arguments)
    emit("response.output_item.done", output_index=index, item=item)


def conversation(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A request record's ``instructions`` and ``input`` as ``[{role: content}]``, the shape of
    chat conversations: the instructions as the system turn, an input string as the user turn,
    input messages as they are, a function call as an assistant turn holding the call, a
    function call's output as a tool turn, any other item as ``{type: item}``."""
    out: list[dict[str, Any]] = []
    instructions = request.get("instructions")
    if isinstance(instructions, str):
        out.append({"system": instructions})
    else:
        out += _items(instructions)
    given = request.get("input")
    if isinstance(given, str):
        out.append({"user": given})
    else:
        out += _items(given)
    return out


def _items(items: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if "role" in item and kind == "message":
            out.append({str(item["role"]): item.get("content")})
        elif kind == "function_call":
            out.append({"assistant": [item]})
        elif kind == "function_call_output":
            out.append({"tool": item.get("output")})
        else:
            out.append({str(kind): item})
    return out
