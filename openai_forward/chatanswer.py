"""Assembling an answer from what the upstream sent: SSE deltas or a whole JSON body.

Pure and forgiving: any shape of chunk is tolerated; what cannot be read is skipped and flagged
(``malformed``), so a record of what did arrive can always be written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from openai_forward.exchange import CallKind
from openai_forward.sse import EventSplitter, event_data

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
        key = index if isinstance(index, int) else 0
        found = self.choices.get(key)
        if found is None:
            found = self.choices[key] = Choice()
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


def _add_chunk(answer: Answer, kind: CallKind, chunk: dict[str, Any]) -> None:
    """One streamed ``chat.completion.chunk`` / ``text_completion`` object."""
    if isinstance(chunk.get("usage"), dict):
        answer.usage = chunk["usage"]
    if "error" in chunk:
        answer.take_error(chunk["error"])
    choices = chunk.get("choices")
    for item in choices if isinstance(choices, list) else ():
        if not isinstance(item, dict):
            continue
        choice = answer.choice(item.get("index"))
        if item.get("finish_reason") is not None:
            choice.finish_reason = item["finish_reason"]
        if kind == "completion":
            if isinstance(item.get("text"), str):
                choice.parts.append(item["text"])
            continue
        delta = item.get("delta")
        if not isinstance(delta, dict):
            continue
        if isinstance(delta.get("content"), str):
            choice.parts.append(delta["content"])
        reasoning = delta.get("reasoning_content", delta.get("reasoning"))
        if isinstance(reasoning, str):
            choice.reasoning.append(reasoning)
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, tool_delta in enumerate(tool_calls):
                _add_tool_call_delta(choice, position, tool_delta)
        elif isinstance(delta.get("function_call"), dict):  # the pre-tools API
            _add_tool_call_delta(choice, 0, {"function": delta["function_call"]})


def read_stream(events: Iterable[bytes], kind: CallKind) -> Answer:
    """An answer assembled from SSE events (each a whole event; see :func:`split_events`)."""
    answer = Answer()
    for event in events:
        data = event_data(event)
        if data is None or data.strip() == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer.malformed = True
            continue
        if isinstance(chunk, dict):
            _add_chunk(answer, kind, chunk)
        else:
            answer.malformed = True
    return answer


def split_events(head: bytes, tail: bytes = b"") -> list[bytes]:
    """The events of a stream body. ``tail`` is the end of a body too long to keep whole: it
    starts mid-event, so everything before its first event boundary is skipped."""
    events = _events(head)
    if tail:
        boundary = _BOUNDARY.search(tail)
        if boundary is not None:
            events += _events(tail[boundary.end() :])
    return events


def _events(data: bytes) -> list[bytes]:
    splitter = EventSplitter()
    events = splitter.feed(data)
    rest = splitter.flush()
    if rest.strip():
        events.append(rest)  # an unterminated last event: used if it parses
    return events


def read_json(body: bytes, kind: CallKind) -> Answer:
    """An answer from a whole (non-stream) JSON body."""
    answer = Answer()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer.malformed = True
        return answer
    if not isinstance(data, dict):
        answer.malformed = True
        return answer
    if isinstance(data.get("usage"), dict):
        answer.usage = data["usage"]
    if "error" in data:
        answer.take_error(data["error"])
    choices = data.get("choices")
    for item in choices if isinstance(choices, list) else ():
        if not isinstance(item, dict):
            continue
        choice = answer.choice(item.get("index"))
        choice.finish_reason = item.get("finish_reason")
        if kind == "completion":
            if isinstance(item.get("text"), str):
                choice.parts.append(item["text"])
            continue
        message = item.get("message")
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("content"), str):
            choice.parts.append(message["content"])
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if isinstance(reasoning, str):
            choice.reasoning.append(reasoning)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                _add_tool_call_delta(choice, position, call)
        elif isinstance(message.get("function_call"), dict):
            _add_tool_call_delta(choice, 0, {"function": message["function_call"]})
    return answer
