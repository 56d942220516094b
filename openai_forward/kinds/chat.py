"""Chat completions in the cache and in ``aifd convert`` (pure).

An entry holds one JSON document whatever form filled it: the upstream's own bytes for a JSON
answer, or a ``chat.completion`` assembled from the deltas of a stream, which ends with
``data: [DONE]``. A non-stream hit sends it as it is; a stream hit renders it as chunks (role,
content, tool calls, finish, ``[DONE]``) that an SDK reassembles into the same message.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from openai_forward.sse import parse_until_done

_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
# Message fields rendered as deltas of their own, in this order, before any other field.
_ORDERED = ("content", "refusal")
_SPECIAL = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})


_HEAD_BYTES = 512
_LIST_KEY = {name: re.compile(rb'"%s"\s*:\s*\[' % name.encode()) for name in ("choices", "data")}


def is_document(body: bytes, list_field: str) -> bool:
    """Whether a whole 2xx body is the expected document (``choices`` of a chat completion,
    ``data`` of an embedding list) and not an error document.

    Only the first bytes of a plain answer are read: parsing an embedding batch (megabytes of
    floats) would stall the event loop. A body that opens and closes as an object, with the list
    field as a key and no ``"error"`` key in its first 512 bytes, is taken as it is; anything
    less plain is parsed to be sure. (Inside a JSON string every quote is escaped, so those byte
    patterns can only be keys.) The trade: an ``"error"`` key placed after the first 512 bytes
    of such a body goes unseen, and that answer is stored.
    """
    head = body[:_HEAD_BYTES]
    if (
        head.lstrip().startswith(b"{")
        and body.rstrip().endswith(b"}")
        and b'"error"' not in head
        and _LIST_KEY[list_field].search(head) is not None
    ):
        return True
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(answer, dict)
        and "error" not in answer
        and isinstance(answer.get(list_field), list)
    )


def is_chat_completion(body: bytes) -> bool:
    return is_document(body, "choices")


def is_embedding_list(body: bytes) -> bool:
    return is_document(body, "data")


def chat_from_sse(body: bytes) -> bytes | None:
    """A ``chat.completion`` assembled from a whole stream, or None unless the stream reached
    ``data: [DONE]`` with no error event on the way."""
    chunks = parse_until_done(body)
    if chunks is None:
        return None
    choices: dict[int, _Choice] = {}
    usage = None
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("error") is not None:
            return None
        if chunk.get("usage"):
            usage = chunk["usage"]
        for part in chunk.get("choices") or ():
            if not isinstance(part, dict):
                return None
            index = part.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                choice = choices[index] = _Choice()
            choice.add(part)
    if not choices:
        return None
    head: dict[str, Any] = {}
    for name in _HEAD_FIELDS:  # each from the first chunk that has it
        for chunk in chunks:
            if chunk.get(name) is not None:
                head[name] = chunk[name]
                break
    answer: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "chat.completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [choices[i].finish(i) for i in sorted(choices)],
    }
    for name in ("system_fingerprint", "service_tier"):
        if name in head:
            answer[name] = head[name]
    if usage is not None:
        answer["usage"] = usage
    return orjson.dumps(answer)


class _Pieces(list[str]):
    """The pieces of a streamed text field, joined once at the end."""


class _Choice:
    """One choice's deltas, accumulated."""

    __slots__ = ("finish_reason", "logprobs", "message", "tools")

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish_reason: Any = None
        self.logprobs: dict[str, Any] | None = None

    def add(self, part: dict[str, Any]) -> None:
        delta = part.get("delta")
        for name, value in delta.items() if isinstance(delta, dict) else ():
            if name == "tool_calls":
                for call in value if isinstance(value, list) else ():
                    if isinstance(call, dict):
                        self._tool_call(call)
            elif name == "function_call" and isinstance(value, dict):
                _merge_call(self.message.setdefault("function_call", {}), value)
            elif name == "role":
                if value:  # some servers repeat the role in every chunk
                    self.message["role"] = value
            elif isinstance(value, str):
                pieces = self.message.get(name)
                if isinstance(pieces, _Pieces):
                    pieces.append(value)
                else:
                    self.message[name] = _Pieces([value])
            elif value is not None or name not in self.message:
                self.message[name] = value
        if part.get("finish_reason") is not None:
            self.finish_reason = part["finish_reason"]
        logprobs = part.get("logprobs")
        if isinstance(logprobs, dict):
            if self.logprobs is None:
                self.logprobs = {}
            for name, items in logprobs.items():
                if isinstance(items, list):
                    held = self.logprobs.get(name)
                    if isinstance(held, list):
                        held.extend(items)
                    else:
                        self.logprobs[name] = list(items)
                else:
                    self.logprobs.setdefault(name, items)

    def _tool_call(self, delta: dict[str, Any]) -> None:
        call = self.tools.setdefault(delta.get("index", len(self.tools)), {})
        for name in ("id", "type"):
            if delta.get(name):
                call[name] = delta[name]
        if isinstance(delta.get("function"), dict):
            _merge_call(call.setdefault("function", {}), delta["function"])

    def finish(self, index: int) -> dict[str, Any]:
        message = {"role": self.message.get("role") or "assistant", "content": None}
        for name, value in self.message.items():
            if name != "role":
                message[name] = "".join(value) if isinstance(value, _Pieces) else value
        if self.tools:
            message["tool_calls"] = [self.tools[i] for i in sorted(self.tools)]
        return {
            "index": index,
            "message": message,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }


def _merge_call(call: dict[str, Any], delta: dict[str, Any]) -> None:
    """A function name comes whole (some servers repeat it); arguments come in pieces."""
    if delta.get("name"):
        call["name"] = delta["name"]
    if delta.get("arguments"):
        call["arguments"] = call.get("arguments", "") + delta["arguments"]
    else:
        call.setdefault("arguments", "")


def wants_usage(payload: dict[str, Any]) -> bool:
    """Whether a stream request asked for the final usage chunk (``stream_options``)."""
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def replay(entry: bytes, payload: dict[str, Any]) -> bytes:
    """The stream a stream request gets from a stored chat completion."""
    return chat_to_sse(entry, wants_usage(payload))


def chat_to_sse(body: bytes, include_usage: bool = False) -> bytes:
    """A well-formed stream for a stored chat completion, ending in ``data: [DONE]``."""
    answer = orjson.loads(body)
    head = {
        "id": answer.get("id", ""),
        "object": "chat.completion.chunk",
        "created": answer.get("created", 0),
        "model": answer.get("model", ""),
    }
    for name in ("system_fingerprint", "service_tier"):
        if name in answer:
            head[name] = answer[name]
    out = []

    def emit(index: int, delta: dict[str, Any], finish: Any = None, logprobs: Any = None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        out.append(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")

    for position, choice in enumerate(answer.get("choices") or ()):
        index = choice.get("index", position)
        message = choice.get("message") or {}
        content = message.get("content")
        role = message.get("role") or "assistant"
        emit(index, {"role": role, "content": "" if isinstance(content, str) else content})
        for name in _ORDERED:
            if message.get(name):
                emit(index, {name: message[name]})
        for name, value in message.items():
            if name not in _SPECIAL and value not in (None, "", [], {}):
                emit(index, {name: value})
        for number, call in enumerate(message.get("tool_calls") or ()):
            emit(index, {"tool_calls": [{"index": number, **call}]})
        if message.get("function_call"):
            emit(index, {"function_call": message["function_call"]})
        emit(index, {}, choice.get("finish_reason") or "stop", choice.get("logprobs"))
    if include_usage and answer.get("usage"):
        out.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": answer["usage"]}))
        out.append(b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def conversation(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A request record's ``messages`` as ``[{role: content}]``; an assistant turn that only
    called tools keeps its tool calls."""
    messages = request.get("messages")
    out = []
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            content = message.get("content")
            if content is None:
                content = message.get("tool_calls") or message.get("function_call")
            out.append({str(message.get("role", "user")): content})
    return out
