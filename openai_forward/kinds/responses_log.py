"""The chat log's reading of Responses API answers: an event stream or a whole response object.

Forgiving, like the reading of chat answers: whatever arrived is recorded. The response carried
by the last event (``response.completed``, ``.incomplete`` or ``.failed``), or a JSON answer,
is the authority; a stream cut before it is assembled from its item and delta events. The answer
is ``finished`` only when the stream reached ``response.completed`` (or the JSON response says
``completed``).
"""

from __future__ import annotations

from typing import Any

import orjson

from openai_forward.kinds.answer import Answer, Choice
from openai_forward.kinds.chat_log import stream_objects
from openai_forward.kinds.responses import COMPLETED, ENDINGS

# Output items the client must act on, and the field holding what the model passed them.
_CALLS = {"function_call": "arguments", "custom_tool_call": "input"}
_PIECES = {
    "response.output_text.delta": "text",
    "response.function_call_arguments.delta": "arguments",
    "response.custom_tool_call_input.delta": "arguments",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.reasoning_text.delta": "reasoning",
}


class _Item:
    """One output item as assembled so far."""

    __slots__ = ("arguments", "call", "reasoning", "text")

    def __init__(self) -> None:
        self.call: dict[str, Any] | None = None  # a tool call's type, call_id and name
        self.text: list[str] = []
        self.arguments: list[str] = []
        self.reasoning: list[str] = []

    def begin(self, item: dict[str, Any]) -> None:
        kind = item.get("type")
        if kind in _CALLS:
            self.call = {"type": kind, "call_id": item.get("call_id"), "name": item.get("name")}

    def finish(self, item: dict[str, Any]) -> None:
        """The whole item (``output_item.done``, or a final response's output) replaces the
        pieces."""
        self.begin(item)
        kind = item.get("type")
        if kind == "message":
            self.text = [
                part["text"]
                for part in _list(item.get("content"))
                if isinstance(part, dict)
                and part.get("type") == "output_text"
                and isinstance(part.get("text"), str)
            ]
        elif kind in _CALLS:
            value = item.get(_CALLS[kind])
            self.arguments = [value] if isinstance(value, str) else []
        elif kind == "reasoning":
            texts = [
                part["text"]
                for part in (*_list(item.get("summary")), *_list(item.get("content")))
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]
            self.reasoning = ["\n\n".join(texts)] if texts else []


class _Output:
    def __init__(self) -> None:
        self.items: dict[int, _Item] = {}

    def item(self, index: Any) -> _Item:
        if not isinstance(index, int):
            index = -1  # pieces that do not say where they go are kept together
        found = self.items.get(index)
        if found is None:
            found = self.items[index] = _Item()
        return found

    def replace(self, output: list[Any]) -> None:
        self.items = {}
        for index, item in enumerate(output):
            if isinstance(item, dict):
                self.item(index).finish(item)

    def fill(self, choice: Choice) -> None:
        for index in sorted(self.items):
            item = self.items[index]
            choice.parts += item.text
            choice.reasoning += item.reasoning
            if item.call is not None:
                arguments = "".join(item.arguments)
                field = _CALLS.get(item.call["type"], "arguments")
                choice.tool_calls[index] = {**item.call, field: arguments}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _take_response(answer: Answer, output: _Output, response: Any) -> None:
    """What a response object says: its id and status, why it is incomplete, its error, its
    usage, and (when it has one) its whole output."""
    if not isinstance(response, dict):
        answer.malformed = True
        return
    for name in ("id", "status"):
        if response.get(name) is not None:
            answer.about[name] = response[name]
    details = response.get("incomplete_details")
    if isinstance(details, dict) and details.get("reason") is not None:
        answer.about["incomplete_reason"] = details["reason"]
    if response.get("error"):
        answer.take_error(response["error"])
    if isinstance(response.get("usage"), dict):
        answer.usage = response["usage"]
    if _list(response.get("output")):
        output.replace(response["output"])


def read_stream(head: bytes, tail: bytes) -> Answer:
    """An answer assembled from a stream body (``tail`` as for chat streams)."""
    answer = Answer(finished=False)
    output = _Output()
    for event in stream_objects(head, tail, answer):
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            answer.malformed = True
            continue
        kind = event["type"]
        piece = _PIECES.get(kind)
        if piece is not None:
            delta = event.get("delta")
            if isinstance(delta, str):
                getattr(output.item(event.get("output_index")), piece).append(delta)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict) and kind.endswith(".added"):
                output.item(event.get("output_index")).begin(item)
            elif isinstance(item, dict):
                output.item(event.get("output_index")).finish(item)
        elif kind in ENDINGS:
            _take_response(answer, output, event.get("response"))
            answer.finished = kind == COMPLETED
        elif kind in ("response.created", "response.in_progress", "response.queued"):
            _take_response(answer, output, event.get("response"))
        elif kind == "error":
            answer.take_error(event)
    output.fill(answer.choice(0))
    return answer


def read_json(body: bytes) -> Answer:
    """An answer from a whole JSON body: a response object, or an error document."""
    answer = Answer()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        answer.malformed = True
    elif "output" in data or data.get("object") == "response":
        output = _Output()
        _take_response(answer, output, data)
        answer.finished = data.get("status") == "completed"
        output.fill(answer.choice(0))
    elif data.get("error"):
        answer.take_error(data["error"])
    return answer


def summary(answer: Answer) -> dict[str, Any]:
    """``assistant`` (the output text, or the tool calls the model made, each
    ``{type, call_id, name, arguments}``), ``is_tool_calls``, ``content`` and ``reasoning`` when
    there are, the response's id and status, and why it is incomplete when it is."""
    out = (answer.choices.get(0) or Choice()).said()
    out["response_id"] = answer.about.get("id")
    out["response_status"] = answer.about.get("status")
    if "incomplete_reason" in answer.about:
        out["incomplete_reason"] = answer.about["incomplete_reason"]
    return out
