"""Chat logs: a request record and a response record per call, written off the request path.

On the event loop a call costs an id and appending relayed chunks to a list; both records are
picked (from the parsed body, and from those chunks) and serialized by the writer thread
(:mod:`openai_forward.chatlog.writer`). Files: ``<LOG_FOLDER>/<name>/<folder>/<folder>.log`` with
``<name>`` the target's :attr:`~openai_forward.settings.Target.log_name` and ``<folder>`` the
kind's (:class:`openai_forward.kinds.LogRules`), which also says what its records hold.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, NamedTuple

from openai_forward.chatlog.records import request_record, response_record
from openai_forward.chatlog.writer import LogWriter, Render
from openai_forward.exchange import Call, Headers, Observer
from openai_forward.kinds import Kind
from openai_forward.relay import ending_reason
from openai_forward.settings import ConfigError, Settings

# Past its kind's ``keep_bytes`` only the last bytes of an answer are kept (``truncated``).
TAIL_BYTES = 64 * 1024
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class ChatLog:
    def __init__(self, root: Path, tz: tzinfo | None, secrets: list[str]) -> None:
        self.root = root
        self._tz = tz
        self._writer = LogWriter(root, secrets=secrets)
        # A random prefix per process and a counter: unique across workers and restarts,
        # without a system call (``os.urandom``) per call.
        self._uid_prefix = os.urandom(8).hex()
        self._counter = itertools.count()
        self._second = -1
        self._second_text = ""

    async def open(self) -> None:
        self._writer.start()

    async def close(self) -> None:
        """Writes every queued record (the lifespan's shutdown waits for it)."""
        await asyncio.to_thread(self._writer.stop)

    def request(self, call: Call) -> Observer:
        """Record the request (sets ``call.uid``); the observer records the answer. Both records
        are made in the writer thread (the parsed body is never changed once parsed)."""
        uid = call.uid = f"{self._uid_prefix}{next(self._counter):016x}"
        kind = call.kind
        path = f"{call.target.log_name}/{kind.log.folder}/{kind.log.folder}.log"
        asked = Asked(kind, call.payload, call.client, uid, call.user, time.time())
        observer = AnswerObserver(self, path, asked, call)
        self._writer.submit(path, observer.request_record)
        return observer

    def submit(self, path: str, render: Render) -> None:
        self._writer.submit(path, render)

    def stamp(self, at: float) -> str:
        """``at`` as the records' ``datetime``. Runs in the writer thread, which alone touches
        the text of the last second (many records share a second: formatted once)."""
        second = int(at)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, self._tz).strftime(DATETIME_FORMAT)
        return self._second_text


class Asked(NamedTuple):
    """What the request record needs. Kept instead of the call, which holds the raw body too:
    that would stay in memory until the writer gets to the record."""

    kind: Kind
    payload: dict[str, Any]  # the parsed body
    client: str  # the client's address
    uid: str
    user: str | None  # hashed forward key
    at: float  # time of the request


class AnswerObserver:
    """Collects the relayed answer of one call; cheap on the loop and never raises.

    Until ``start``, ``_status`` is None (no answer came). ``_complete`` is None until
    ``close``, ``_reason`` says why an answer is not complete. Past its kind's ``keep_bytes``
    only the answer's last ``TAIL_BYTES`` are kept. At ``close`` the call's ``assembled``
    answer is taken if the cache made one of a stream (the observers before this one have
    closed by then), and the call is let go: it holds the request's raw body."""

    __slots__ = (
        "_asked",
        "_assembled",
        "_call",
        "_chunks",
        "_complete",
        "_headers",
        "_keep",
        "_log",
        "_path",
        "_reason",
        "_size",
        "_status",
        "_tail",
    )

    def __init__(self, log: ChatLog, path: str, asked: Asked, call: Call | None = None) -> None:
        self._log = log
        self._path = path
        self._asked = asked
        self._call = call
        self._assembled: bytes | None = None
        self._keep = asked.kind.log.keep_bytes
        self._status: int | None = None
        self._headers: tuple[tuple[bytes, bytes], ...] = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self._tail = b""
        self._complete: bool | None = None
        self._reason: str | None = None

    def start(self, status: int, headers: Headers) -> None:
        self._status = status
        self._headers = tuple(headers)  # read later, in the writer thread

    def feed(self, chunk: bytes) -> None:
        if self._size < self._keep:
            self._chunks.append(chunk)
        else:
            self._tail = (self._tail + chunk)[-TAIL_BYTES:]
        self._size += len(chunk)

    def close(self, complete: bool, reason: str | None = None) -> None:
        if self._complete is None:
            self._complete = complete
            if not complete:
                # A caller that does not say why (the cache's replay of a hit) closes from its
                # ``finally``: the exception that cut the answer says it.
                ended = sys.exception() if reason is None else None
                self._reason = ending_reason(ended) if ended is not None else reason
            if self._call is not None:
                self._assembled, self._call = self._call.assembled, None
            self._log.submit(self._path, self.response_record)

    def request_record(self) -> dict[str, Any]:
        """Runs in the writer thread."""
        asked = self._asked
        record = request_record(asked.kind, asked.payload, asked.client, asked.uid, asked.user)
        record["datetime"] = self._log.stamp(asked.at)
        return record

    def response_record(self) -> dict[str, Any]:
        """Runs in the writer thread."""
        body = b"".join(self._chunks)
        return response_record(
            self._asked.kind,
            self._asked.uid,
            self._status,
            self._headers,
            body,
            tail=self._tail,
            complete=bool(self._complete),
            truncated=self._size > len(body),
            reason=self._reason,
            assembled=self._assembled,
        )


def _zone(name: str | None) -> tzinfo | None:
    """``TZ`` as a zone; None means the system's local time."""
    if name is None:
        return None
    from zoneinfo import ZoneInfo

    return ZoneInfo(name.lstrip(":"))


def build_chatlog(settings: Settings) -> ChatLog | None:
    if not settings.log_chat:
        return None
    secrets = [k.reveal() for k in (*settings.api_keys, *settings.forward_keys)]
    return ChatLog(Path(settings.log_folder), _zone(settings.tz), secrets)


def check_startup(settings: Settings) -> None:
    """With ``LOG_CHAT`` on, the log folder must be creatable and writable."""
    if not settings.log_chat:
        return
    root = Path(settings.log_folder)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        expected = f"a folder this user can create ({exc.strerror})"
        raise ConfigError("LOG_FOLDER", settings.log_folder, expected) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError("LOG_FOLDER", settings.log_folder, "a folder this user can write to")
