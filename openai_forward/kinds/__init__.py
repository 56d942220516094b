"""The API kinds the cache, the chat log and ``aifd convert`` know: one entry each.

A call's kind is found by the end of its route (``/v1/chat/completions``). Its entry says which
request fields matter, how a whole answer is recognised, how a stream is assembled and how it
ends, how a stored answer is replayed, where its log goes and how its records convert. The cache,
the chat log and convert read these entries and know nothing else about a kind: adding one is an
entry here, the module that reads its wire format, and their tests.

The wire formats: :mod:`.chat` (chat completions in the cache and convert, and OpenAI's
list documents), :mod:`.chat_log` (``choices`` answers in the chat log), :mod:`.responses` and
:mod:`.responses_log` (the Responses API), :mod:`.answer` (what the chat log reads of any answer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openai_forward.kinds import answer, chat, chat_log, responses, responses_log

if TYPE_CHECKING:
    from openai_forward.settings import Settings

Payload = dict[str, Any]


def _always(payload: Payload) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class CacheRules:
    """How the response cache treats a kind. The key is every body field but ``stream``,
    ``stream_options`` and ``caching`` (:mod:`openai_forward.cache.keys`), for every kind."""

    switch: Callable[[Settings], bool]  # the setting that turns caching of this kind on
    # Whether this request may be answered from the cache (and its answer stored); a request
    # that may not still goes upstream, marked ``X-Cache: MISS``.
    allows: Callable[[Payload], bool]
    # Whether a whole 2xx JSON body is a complete, successful answer, worth storing as it is.
    is_whole: Callable[[bytes], bool]
    # The entry made of a whole stream body; None when the stream did not end as a whole,
    # successful answer. (None here: streams of this kind are not stored.)
    from_stream: Callable[[bytes], bytes | None] | None = None
    # The stream a stream request gets from an entry (with the request's body, for its
    # options). None here: an entry is always replayed as JSON.
    to_stream: Callable[[bytes, Payload], bytes] | None = None


@dataclass(frozen=True, slots=True)
class LogRules:
    """How the chat log records a kind: ``<LOG_FOLDER>/<name>/<folder>/<folder>.log``."""

    folder: str
    # The request record: ``head`` fields always (``stream`` as a boolean), ``optional`` ones
    # when the client sent them, then ``tail`` fields always (null when not sent), in order.
    head: tuple[str, ...]
    optional: tuple[str, ...]
    tail: tuple[str, ...] = ()
    keep_bytes: int = 8 * 1024 * 1024  # of an answer; past that only its end is kept
    # The answer: read from a stream (its kept start, and its end when it was too long) or
    # from a whole JSON body, then summed up as the first fields of the response record.
    read_stream: Callable[[bytes, bytes], answer.Answer] = chat_log.read_stream
    read_json: Callable[[bytes], answer.Answer] = chat_log.read_json
    summary: Callable[[answer.Answer], dict[str, Any]] = chat_log.summary
    # A 2xx answer is read for its ``usage`` only, near its ends (embedding vectors are not
    # logged), so an answer longer than ``keep_bytes`` is not a truncated record.
    usage_only: bool = False


@dataclass(frozen=True, eq=False)
class Kind:
    """One API kind. Compared by identity: there is one object per kind."""

    name: str  # the call's kind for reporters (``Outcome.kind``) and tests
    suffix: str  # the end of its route
    prompt: str  # the request field holding what the model is asked
    log: LogRules
    cache: CacheRules | None = None  # None: never cached
    # The messages of a request record as ``[{role: content}]`` for ``aifd convert``, which
    # writes ``<LOG_FOLDER>/<log.folder>_<name>.json``; None: not converted.
    conversation: Callable[[Payload], list[dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        return f"<Kind {self.name}>"


# Body fields that shape a chat or completion answer, copied into request records when sent.
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

CHAT = Kind(
    "chat",
    "/chat/completions",
    "messages",
    LogRules(
        "chat",
        head=("messages", "model", "stream"),
        optional=(
            *_SAMPLING,
            "tool_choice",
            "parallel_tool_calls",
            "functions",
            "function_call",
            "response_format",
            "user",
        ),
        tail=("tools",),
    ),
    CacheRules(
        lambda settings: settings.cache_chat_completion,
        _always,
        chat.is_chat_completion,
        chat.chat_from_sse,  # a stream ends with data: [DONE]
        chat.replay,
    ),
    chat.conversation,
)

COMPLETION = Kind(
    "completion",
    "/completions",
    "prompt",
    LogRules(
        "completion",
        head=("prompt", "model", "stream"),
        optional=("suffix", *_SAMPLING, "best_of", "echo", "user"),
        read_stream=chat_log.read_completion_stream,
        read_json=chat_log.read_completion_json,
    ),
)

EMBEDDING = Kind(
    "embedding",
    "/embeddings",
    "input",
    LogRules(
        "embedding",
        head=("input", "model"),
        optional=("encoding_format", "dimensions", "user"),
        keep_bytes=64 * 1024,  # the head and the tail (usage) suffice
        summary=answer.no_summary,
        usage_only=True,
    ),
    CacheRules(lambda settings: settings.cache_embedding, _always, chat.is_embedding_list),
)

RESPONSES = Kind(
    "responses",
    "/responses",
    "input",
    LogRules(
        "responses",
        head=("input", "instructions", "model", "stream"),
        optional=(
            "temperature",
            "top_p",
            "max_output_tokens",
            "max_tool_calls",
            "top_logprobs",
            "reasoning",
            "text",
            "tool_choice",
            "parallel_tool_calls",
            "truncation",
            "include",
            "prompt",
            "previous_response_id",
            "conversation",
            "store",
            "background",
            "service_tier",
            "user",
            "safety_identifier",
        ),
        tail=("tools",),
        read_stream=responses_log.read_stream,
        read_json=responses_log.read_json,
        summary=responses_log.summary,
    ),
    CacheRules(
        lambda settings: settings.cache_chat_completion,  # one switch for both ways to chat
        responses.cacheable,
        responses.is_whole,
        responses.from_stream,  # a stream ends with response.completed; no [DONE]
        responses.to_stream,
    ),
    responses.conversation,
)

# In the order routes are matched: /chat/completions before /completions.
KINDS: tuple[Kind, ...] = (CHAT, COMPLETION, EMBEDDING, RESPONSES)
BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}


def kind_of(route: str) -> Kind | None:
    """The kind of a route, by its end (``/v1/chat/completions``, ``/team/v1/responses``)."""
    for kind in KINDS:
        if route.endswith(kind.suffix):
            return kind
    return None


def cached_kinds(settings: Settings) -> frozenset[Kind]:
    """The kinds whose answers the cache keeps under these settings."""
    return frozenset(k for k in KINDS if k.cache is not None and k.cache.switch(settings))


def converted_kinds() -> tuple[Kind, ...]:
    """The kinds ``aifd convert`` turns into datasets."""
    return tuple(kind for kind in KINDS if kind.conversation is not None)
