"""Chat log records: pure functions from a call and its answer to JSON-ready dicts.

No I/O and no clock. Both records are made in the chat log's writer thread: the request record
is picked from the parsed body, the response record assembled from the answer's raw bytes. Which
fields, and how an answer is read, is the kind's (:class:`~openai_forward.kinds.LogRules`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from openai_forward.kinds import Kind
from openai_forward.kinds.answer import ERROR_TEXT_LIMIT, Answer, usage_only


def request_record(
    kind: Kind, payload: dict[str, Any], client: str, uid: str, user: str | None
) -> dict[str, Any]:
    """What the client asked (a call's parsed body, address, id and forward key hash): never a
    header, so never a key (``datetime`` is added by the log)."""
    rules = kind.log
    record: dict[str, Any] = {}
    for name in rules.head:
        record[name] = payload.get("stream") is True if name == "stream" else payload.get(name)
    for name in rules.optional:  # in this order, whatever the order of the body
        if name in payload:
            record[name] = payload[name]
    for name in rules.tail:
        record[name] = payload.get(name)
    record["ip"] = client
    record["uid"] = uid
    if user is not None:
        record["key_hash"] = user  # which forward key: its hash, never the key
    return record


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
    kind: Kind,
    uid: str,
    status: int | None,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    tail: bytes = b"",
    complete: bool,
    truncated: bool = False,
    reason: str | None = None,
    assembled: bytes | None = None,
) -> dict[str, Any]:
    """The answer's record. ``status`` None: no response came (upstream unreachable, client
    gone first). ``truncated``: the body was too long to keep whole and ``tail`` is its end.
    ``reason``: why the answer did not reach the client whole (``complete`` False), if known.
    ``assembled``: the whole stream ``body`` as one JSON document (the cache's entry made of
    it), read instead of the stream: the same record, without assembling the stream again."""
    named = dict(reversed(headers))  # name -> value of the first header of that name
    ok = status is not None and 200 <= status < 300
    if kind.log.usage_only and ok:
        truncated = False  # by design: only the ends of the answer are kept
    if assembled is not None and not truncated:
        answer = kind.log.read_json(assembled)
    else:
        answer = _read_answer(kind, ok, named, body, tail, truncated)
    if status is not None and not ok and answer.error is None:
        answer.error = body.decode("utf-8", "replace")[:ERROR_TEXT_LIMIT]
    record = kind.log.summary(answer)
    record["uid"] = uid
    if answer.usage is not None:
        record["usage"] = answer.usage
    record["status"] = status
    record["cached"] = named.get(b"x-cache", b"").upper() == b"HIT"
    unread = ok and (answer.malformed or not answer.finished)
    record["complete"] = complete and not truncated and not unread
    if not complete and reason is not None:
        record["reason"] = reason
    if answer.error is not None:
        record["error"] = answer.error
    if truncated:
        record["truncated"] = True
    return record


def _read_answer(
    kind: Kind,
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
    if kind.log.usage_only and ok:
        return usage_only(decoded, tail)
    if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        return kind.log.read_stream(decoded, tail)
    if truncated:
        return usage_only(decoded, tail)  # a whole JSON answer over the limit: only its usage
    return kind.log.read_json(decoded)
