"""The chat log's reading of ``choices`` answers (chat completions, legacy completions): SSE
chunks or a whole JSON body.

Pure and forgiving: any shape of chunk is tolerated; what cannot be read is skipped and flagged
(``malformed``), so a record of what did arrive can always be written.
"""

from __future__ import annotations

from typing import Any

import orjson

from openai_forward.kinds.answer import Answer, Choice
from openai_forward.sse import DONE, parse_data, split_stream, stream_data, stream_payloads


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


def _add_object(answer: Answer, data: dict[str, Any], field: str) -> None:
    """One streamed chunk (``chat.completion.chunk``, ``text_completion``) or a whole answer;
    ``field`` holds each choice's part: ``delta``, ``message`` or a completion's ``text``."""
    if "usage" in data and isinstance(data["usage"], dict):
        answer.usage = data["usage"]
    if "error" in data:
        answer.take_error(data["error"])
    choices = data.get("choices")
    if not isinstance(choices, list):
        return
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


def stream_objects(head: bytes, tail: bytes, answer: Answer) -> list[Any]:
    """The JSON values of a stream's events, ``[DONE]`` left out. ``tail`` is the end of a body
    too long to keep whole (``head`` is its start): it begins mid-event, so its first, partial
    event is skipped. An event that is not JSON is skipped and marks ``answer`` malformed."""
    payloads = stream_payloads(head)
    if tail:
        payloads += stream_data(split_stream(tail)[1:])
    payloads = [data for data in payloads if data and data != DONE]
    values = parse_data(payloads)
    if values is None:  # some event is not JSON: skip it, and say so
        values = []
        for payload in payloads:
            try:
                values.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                answer.malformed = True
    return values


def read_stream(head: bytes, tail: bytes, field: str = "delta") -> Answer:
    """An answer assembled from a stream body (see :func:`stream_objects` for ``tail``)."""
    answer = Answer()
    for chunk in stream_objects(head, tail, answer):
        if isinstance(chunk, dict):
            _add_object(answer, chunk, field)
        else:
            answer.malformed = True
    return answer


def read_json(body: bytes, field: str = "message") -> Answer:
    """An answer from a whole (non-stream) JSON body."""
    answer = Answer()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        _add_object(answer, data, field)
    else:
        answer.malformed = True
    return answer


def read_completion_stream(head: bytes, tail: bytes) -> Answer:
    return read_stream(head, tail, "text")


def read_completion_json(body: bytes) -> Answer:
    return read_json(body, "text")


def summary(answer: Answer) -> dict[str, Any]:
    """The first choice's ``assistant``, ``is_tool_calls`` and ``finish_reason`` (and its
    ``content`` and ``reasoning`` when there are); with several choices, each one's too."""
    summaries = [answer.choices[i].summary() for i in sorted(answer.choices)]
    out = dict(summaries[0] if summaries else Choice().summary())
    if len(summaries) > 1:
        out["choices"] = summaries
    return out
