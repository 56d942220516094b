"""What the chat log reads out of an answer, whatever its kind: text, tool calls, usage, error.

Each kind's reader (:mod:`~openai_forward.kinds.chat_log`,
:mod:`~openai_forward.kinds.responses_log`) fills an :class:`Answer`; its ``summary`` makes the
first fields of the response record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

ERROR_TEXT_LIMIT = 2000
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


@dataclass(slots=True)
class Choice:
    """One choice of an answer, as assembled so far."""

    parts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def said(self) -> dict[str, Any]:
        """What the model said: ``assistant`` (its text, or its tool calls), ``is_tool_calls``,
        and ``content`` (text said alongside tool calls) and ``reasoning`` when there are."""
        text = "".join(self.parts)
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        out: dict[str, Any] = {"assistant": calls if calls else text, "is_tool_calls": bool(calls)}
        if calls and text:
            out["content"] = text
        if self.reasoning:
            out["reasoning"] = "".join(self.reasoning)
        return out

    def summary(self) -> dict[str, Any]:
        """A chat or completion choice: what it said and its ``finish_reason``."""
        said = self.said()
        first = {"assistant": said.pop("assistant"), "is_tool_calls": said.pop("is_tool_calls")}
        return {**first, "finish_reason": self.finish_reason, **said}


@dataclass(slots=True)
class Answer:
    choices: dict[int, Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    error: str | None = None
    malformed: bool = False  # some part could not be read
    finished: bool = True  # False: the answer never said it was over (no ``response.completed``)
    about: dict[str, Any] = field(
        default_factory=dict
    )  # fields of the kind's own (an id, a status)

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


def usage_only(body: bytes, tail: bytes = b"") -> Answer:
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


def no_summary(answer: Answer) -> dict[str, Any]:
    """For kinds whose answer is not text (embeddings): the record has no ``assistant``."""
    return {}
