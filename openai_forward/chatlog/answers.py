"""Assembling an answer from what the upstream sent: SSE deltas or a whole JSON body.

Pure and forgiving: any shape of chunk is tolerated; what cannot be read is skipped and flagged
(``malformed``), so a record of what did arrive can always be written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from openai_forward.exchange import CallKind
from openai_forward.sse import DONE, parse_data, split_stream, stream_data

ERROR_TEXT_LIMIT = 2000


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
        if isinstance(value, dict):
            _add_message(choice, value)
        elif isinstance(value, str):  # a completion's text
            choice.parts.append(value)


def read_stream(head: bytes, tail: bytes, kind: CallKind) -> Answer:
    """An answer assembled from a stream body. ``tail`` is the end of a body too long to keep
    whole (``head`` is its start): it begins mid-event, so its first, partial event is skipped."""
    payloads = stream_data(split_stream(head))
    if tail:
        payloads += stream_data(split_stream(tail)[1:])
    payloads = [data for data in payloads if data and data != DONE]
    answer = Answer()
    chunks = parse_data(payloads)
    if chunks is None:  # some event is not JSON: skip it, and say so
        chunks = []
        for payload in payloads:
            try:
                chunks.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                answer.malformed = True
    for chunk in chunks:
        if isinstance(chunk, dict):
            _add_object(answer, kind, chunk, stream=True)
        else:
            answer.malformed = True
    return answer


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
