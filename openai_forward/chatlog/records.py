"""Chat log records: pure functions from a call and its answer to JSON-ready dicts.

No I/O and no clock. Both records are made in the chat log's writer thread: the request record
is picked from the parsed body, the response record assembled from the answer's raw bytes.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import orjson

from openai_forward.chatlog.answers import (
    ERROR_TEXT_LIMIT,
    Answer,
    Choice,
    read_json,
    read_stream,
)
from openai_forward.exchange import CallKind

# Body fields that shape an answer, copied into the request record when the client sent them.
_SAMPLING = (
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "reasoning_effort",
)
_OPTIONAL: dict[CallKind, tuple[str, ...]] = {
    "chat": (
        *_SAMPLING,
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "user",
    ),
    "completion": ("suffix", *_SAMPLING, "best_of", "echo", "user"),
    "embedding": ("encoding_format", "dimensions", "user"),
}
_CONTENT: dict[CallKind, str] = {"chat": "messages", "completion": "prompt", "embedding": "input"}
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


def request_record(
    kind: CallKind, payload: dict[str, Any], client: str, uid: str, user: str | None
) -> dict[str, Any]:
    """What the client asked (a call's parsed body, address, id and forward key hash): never a
    header, so never a key (``datetime`` is added by the log)."""
    content = _CONTENT[kind]
    record: dict[str, Any] = {content: payload.get(content), "model": payload.get("model")}
    if kind != "embedding":
        record["stream"] = payload.get("stream") is True
    for name in _OPTIONAL[kind]:  # in this order, whatever the order of the body
        if name in payload:
            record[name] = payload[name]
    if kind == "chat":
        record["tools"] = payload.get("tools")
    record["ip"] = client
    record["uid"] = uid
    if user is not None:
        record["key_hash"] = user  # which forward key: its hash, never the key
    return record


def _usage_only(body: bytes, tail: bytes) -> Answer:
    """Only the ``usage`` of a JSON answer, found near either end without parsing the rest: an
    embedding answer is mostly vectors (megabytes of floats for a batch), which are not logged."""
    answer = Answer()
    for part in (tail[-8192:], body[-8192:], body[:8192]):
        found = _USAGE.search(part)
        if found is not None:
            try:
                usage = orjson.loads(found.group(1))
            except orjson.JSONDecodeError:
                continue
            answer.usage = usage if isinstance(usage, dict) else None
            break
    return answer


def _decoded(body: bytes, encoding: bytes) -> bytes | None:
    """The body without its content coding (the upstream is asked for none, but may use one)."""
    if encoding in (b"", b"identity"):
        return body
    if encoding in (b"gzip", b"x-gzip", b"deflate"):
        for wbits in (47, -15):  # gzip or zlib by header, else raw deflate
            try:
                return zlib.decompressobj(wbits).decompress(body)
            except zlib.error:
                continue
    return None


def response_record(
    kind: CallKind,
    uid: str,
    status: int | None,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    tail: bytes = b"",
    complete: bool,
    truncated: bool = False,
) -> dict[str, Any]:
    """The answer's record. ``status`` None: no response came (upstream unreachable, client
    gone first). ``truncated``: the body was too long to keep whole and ``tail`` is its end."""
    named = dict(reversed(headers))  # name -> value of the first header of that name
    ok = status is not None and 200 <= status < 300
    if kind == "embedding" and ok:
        truncated = False  # by design: only the ends of a batch of vectors are kept
    answer = _read_answer(kind, ok, named, body, tail, truncated)
    if status is not None and not ok and answer.error is None:
        answer.error = body.decode("utf-8", "replace")[:ERROR_TEXT_LIMIT]
    record: dict[str, Any] = {}
    if kind != "embedding":
        summaries = [answer.choices[i].summary() for i in sorted(answer.choices)]
        record.update(summaries[0] if summaries else Choice().summary())
        if len(summaries) > 1:
            record["choices"] = summaries
    usage, error, malformed = answer.usage, answer.error, answer.malformed
    record["uid"] = uid
    if usage is not None:
        record["usage"] = usage
    record["status"] = status
    record["cached"] = named.get(b"x-cache", b"").upper() == b"HIT"
    record["complete"] = complete and not truncated and not (ok and malformed)
    if error is not None:
        record["error"] = error
    if truncated:
        record["truncated"] = True
    return record


def _read_answer(
    kind: CallKind,
    ok: bool,
    headers: dict[bytes, bytes],
    body: bytes,
    tail: bytes,
    truncated: bool,
) -> Answer:
    if not (body or tail):
        return Answer()
    decoded = _decoded(body, headers.get(b"content-encoding", b"").lower())
    if decoded is None:
        return Answer(error="undecodable content-encoding")
    if decoded is not body:
        tail = b""  # the end of a compressed stream cannot be decoded on its own
    if kind == "embedding" and ok:
        return _usage_only(decoded, tail)
    if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        return read_stream(decoded, tail, kind)
    if truncated:
        return _usage_only(decoded, tail)  # a whole JSON answer over the limit: only its usage
    return read_json(decoded, kind)
