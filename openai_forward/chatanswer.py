"""Assembling an answer from what the upstream sent: SSE deltas or a whole JSON body.

Pure and forgiving: any shape of chunk is tolerated; what cannot be read is skipped and flagged
(``malformed``), so a record of what did arrive can always be written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from openai_forward.exchange import CallKind
from openai_forward.sse import EventSplitter, event_data, parse_plain_stream

ERROR_TEXT_LIMIT = 2000
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass(slots=True)
class Choice:
    """One choice of an answer, as assembled so far."""

    parts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def summary(self) -> dict[str, Any]:
        text = "".join(self.parts)
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        out: dict[str, Any] = {
            "assistant": calls if calls else text,
            "is_tool_calls": bool(calls),
            "finish_reason": self.finish_reason,
        }
        if calls and text:
            out["content"] = text  # text said alongside the tool calls
        if self.reasoning:
            out["reasoning"] = "".join(self.reasoning)
        return out


@dataclass(slots=True)
class Answer:
    choices: dict[int, Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    error: str | None = None
    malformed: bool = False

    def choice(self, index: Any) -> Choice:
        if not isinstance(index, int):
            index = 0
        found = self.choices.get(index)
        if found is None:
            found = self.choices[index] = Choice()
        return found

    def take_error(self, error: Any) -> None:
        if isinstance(error, dict):
            error = error.get("message", error)
        text = error if isinstance(error, str) else orjson.dumps(error).decode()
        self.error = text[:ERROR_TEXT_LIMIT]


def _add_tool_call_delta(choice: Choice, position: int, delta: Any) -> None:
    """Joins the pieces of one streamed tool call: id, type and name come once, the arguments
    arrive in slices under the same ``index``."""
    if not isinstance(delta, dict):
        return
    index = delta.get("index")
    key = index if isinstance(index, int) else position
    call = choice.tool_calls.get(key)
    if call is None:
        call = choice.tool_calls[key] = {
            "id": None,
            "type": "function",
            "function": {"name": "", "arguments": ""},
        }
    if isinstance(delta.get("id"), str):
        call["id"] = delta["id"]
    if isinstance(delta.get("type"), str):
        call["type"] = delta["type"]
    function = delta.get("function")
    if isinstance(function, dict):
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str) and not call["function"]["name"]:
            call["function"]["name"] = name
        if isinstance(arguments, str):
            call["function"]["arguments"] += arguments


def _add_message(choice: Choice, message: dict[str, Any]) -> None:
    """A streamed ``delta`` or a whole ``message``: they have the same fields."""
    content = message.get("content")
    if isinstance(content, str):
        choice.parts.append(content)
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if isinstance(reasoning, str):
        choice.reasoning.append(reasoning)
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for position, tool_delta in enumerate(tool_calls):
            _add_tool_call_delta(choice, position, tool_delta)
    elif isinstance(message.get("function_call"), dict):  # the pre-tools API
        _add_tool_call_delta(choice, 0, {"function": message["function_call"]})


def _add_object(answer: Answer, kind: CallKind, data: dict[str, Any], stream: bool) -> None:
    """One streamed chunk (``chat.completion.chunk``, ``text_completion``) or a whole answer."""
    if "usage" in data and isinstance(data["usage"], dict):
        answer.usage = data["usage"]
    if "error" in data:
        answer.take_error(data["error"])
    choices = data.get("choices")
    if not isinstance(choices, list):
        return
    field = "text" if kind == "completion" else "delta" if stream else "message"
    for item in choices:
        if not isinstance(item, dict):
            continue
        choice = answer.choice(item.get("index"))
        finish = item.get("finish_reason")
        if finish is not None:
            choice.finish_reason = finish
        value = item.get(field)
        if value.__class__ is dict:
            if len(value) == 1 and "content" in value:  # the usual delta: just text
                content = value["content"]
                if isinstance(content, str):
                    choice.parts.append(content)
            else:
                _add_message(choice, value)
        elif isinstance(value, str):  # a completion's text
            choice.parts.append(value)


def read_stream(head: bytes, tail: bytes, kind: CallKind) -> Answer:
    """An answer assembled from a stream body (``tail``: see :func:`stream_payloads`)."""
    answer = Answer()
    chunks = None if tail else parse_plain_stream(head)
    if chunks is None:
        chunks = _parse_each(stream_payloads(head, tail), answer)
    text: list[str] | None = None
    for chunk in chunks:
        if chunk.__class__ is not dict:
            answer.malformed = True
            continue
        # Fast path for the bulk of a chat stream, one text delta of choice 0: no calls, few
        # look-ups (this loop is most of the chat log's cost).
        choices = chunk.get("choices")
        if (
            kind == "chat"
            and choices.__class__ is list
            and len(choices) == 1
            and chunk.get("usage") is None
            and "error" not in chunk
        ):
            item = choices[0]
            if (
                item.__class__ is dict
                and not item.get("index")
                and item.get("finish_reason") is None
            ):
                delta = item.get("delta")
                if delta.__class__ is dict and len(delta) == 1:
                    content = delta.get("content")
                    if content.__class__ is str:
                        if text is None:
                            text = answer.choice(0).parts
                        text.append(content)
                        continue
        _add_object(answer, kind, chunk, stream=True)
    return answer


def _parse_each(payloads: list[bytes], answer: Answer) -> list[Any]:
    """Every payload parsed; the ones that are not JSON are skipped and flag the answer."""
    if not payloads:
        return []
    try:
        # One parse of them all as an array is several times cheaper than one call each.
        parsed = orjson.loads(b"[" + b",".join(payloads) + b"]")
        if isinstance(parsed, list) and len(parsed) == len(payloads):
            return parsed
    except orjson.JSONDecodeError:
        pass
    parsed = []
    for payload in payloads:
        try:
            parsed.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            answer.malformed = True
    return parsed


def stream_payloads(head: bytes, tail: bytes = b"") -> list[bytes]:
    """The ``data`` of the events of a stream body, ``[DONE]`` left out. ``tail`` is the end of
    a body too long to keep whole: it starts mid-event, so its first partial event is skipped."""
    payloads = _payloads(head)
    if tail:
        boundary = _BOUNDARY.search(tail)
        if boundary is not None:
            payloads += _payloads(tail[boundary.end() :])
    return payloads


def _payloads(body: bytes) -> list[bytes]:
    """An unterminated last event is included: it is used if it parses."""
    if b"\r" in body:
        splitter = EventSplitter()
        events = splitter.feed(body)
        events.append(splitter.flush())
    else:  # the usual case, where a plain split is much faster than the splitter's regex
        events = body.split(b"\n\n")
    out = []
    for event in events:
        if event.startswith(b"data: ") and b"\n" not in event.rstrip():
            data: bytes | None = event[6:].rstrip()
        else:
            data = event_data(event)
            data = data.strip() if data is not None else None
        if data and data != b"[DONE]":
            out.append(data)
    return out


def read_json(body: bytes, kind: CallKind) -> Answer:
    """An answer from a whole (non-stream) JSON body."""
    answer = Answer()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        _add_object(answer, kind, data, stream=False)
    else:
        answer.malformed = True
    return answer
