"""``aifd convert``: chat logs to ``Log/<kind>_<name>.json``, a JSON array of conversations.

Every kind with a conversation (:func:`openai_forward.kinds.converted_kinds`: chat completions
to ``chat_<name>.json``, the Responses API to ``responses_<name>.json``) converts to the same
shape. Request and response records are joined by ``uid`` and written in request order, reading
the rotated files oldest first. Lines of the original openai-forward (Python dict literals such as
``{'messages': [...], 'uid': '...'}``) are read too, with ``ast.literal_eval`` (never ``eval``), so
old logs convert alongside new ones.

A request whose answer is missing (the process died mid-call, the record was dropped) or not a
whole successful one (an upstream error, a stream cut short, a client that hung up) is left out of
the dataset and counted in the summary line.
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from openai_forward.kinds import CHAT, Kind, converted_kinds

PROGRESS_MIN_BYTES = 32 * 1024 * 1024  # below this a conversion is too quick for a progress bar
_NUMBERED = re.compile(r"\.log\.(\d+)$")


@dataclass
class Source:
    """The logs of one kind of one prefix and where their conversion goes."""

    name: str
    folder: Path  # the kind's folder (``chat``), or a folder of log files
    target: Path
    kind: Kind = CHAT


@dataclass
class Result:
    target: Path
    written: int = 0
    unanswered: int = 0
    unreadable: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list, repr=False)


def convert(
    log_folder: str | None = None,
    target_path: str | None = None,
    *,
    console: Console | None = None,
    progress_min_bytes: int = PROGRESS_MIN_BYTES,
) -> list[Result]:
    """Convert one prefix's logs (``log_folder``: ``Log/<name>``, or one kind's folder such as
    ``Log/<name>/chat``), or those of every prefix under a log root (``log_folder``: ``Log``; by
    default ``LOG_FOLDER``). Raises FileNotFoundError, NotADirectoryError or ValueError with a
    message for the user."""
    console = console or Console(stderr=True)
    sources = find_sources(log_folder, target_path)
    files = [log_files(source.folder) for source in sources]
    if len(sources) == 1 and not files[0]:
        raise FileNotFoundError(f"no chat log files in {str(sources[0].folder)!r}")
    total = sum(f.stat().st_size for paths in files for f in paths)
    results = []
    shown = total >= progress_min_bytes and console.is_terminal
    with _Progress(console, total if shown else 0) as progress:
        for source, paths in zip(sources, files, strict=True):
            result = join(paths, source.target, progress, source.kind)
            write_json(result.entries, source.target)
            result.entries = []
            results.append(result)
    for result in results:
        notes = []
        if result.unanswered:
            notes.append(f"{result.unanswered} without a complete answer left out")
        if result.unreadable:
            notes.append(f"{result.unreadable} unreadable line(s) skipped")
        extra = f" ({'; '.join(notes)})" if notes else ""
        line = f"{result.target}: {result.written} conversation(s){extra}"
        console.print(line, highlight=False, soft_wrap=True)  # one line, however narrow
    return results


def find_sources(log_folder: str | None, target_path: str | None) -> list[Source]:
    if log_folder is None:
        from openai_forward.settings import Settings

        root = Path(Settings.from_env().log_folder)
        if not root.is_dir():
            raise FileNotFoundError(f"no log folder {str(root)!r} here (LOG_CHAT=true writes it)")
        return _every_prefix(root, target_path)
    folder = Path(log_folder)
    if not folder.exists():
        raise FileNotFoundError(f"--log_folder={log_folder!r}: no such folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"--log_folder={log_folder!r}: not a folder")
    kinds = _kinds_in(folder)
    if kinds:  # Log/<name>
        return _one_prefix(folder, kinds, target_path)
    named = [kind for kind in converted_kinds() if kind.log.folder == folder.name]
    if named:  # Log/<name>/chat
        return _one_prefix(folder.parent, named, target_path)
    if any(_kinds_in(d) for d in folder.iterdir() if d.is_dir()):  # the root: Log
        return _every_prefix(folder, target_path)
    # a folder of log files: chat logs
    target = Path(target_path) if target_path else folder.parent / f"chat_{folder.name}.json"
    return [Source(folder.name, folder, target)]


def _kinds_in(folder: Path) -> list[Kind]:
    """The converted kinds whose log folder ``folder`` (a prefix's folder) holds."""
    return [kind for kind in converted_kinds() if (folder / kind.log.folder).is_dir()]


def _one_prefix(folder: Path, kinds: list[Kind], target_path: str | None) -> list[Source]:
    if target_path is not None:
        if len(kinds) > 1:
            found = " and ".join(kind.log.folder for kind in kinds)
            raise ValueError(
                f"--target_path names one file but {str(folder)!r} holds {found} logs: "
                f"choose one with --log_folder {folder}/{kinds[0].log.folder}"
            )
        return [Source(folder.name, folder / kinds[0].log.folder, Path(target_path), kinds[0])]
    return [
        Source(
            folder.name,
            folder / kind.log.folder,
            folder.parent / f"{kind.log.folder}_{folder.name}.json",
            kind,
        )
        for kind in kinds
    ]


def _every_prefix(root: Path, target_path: str | None) -> list[Source]:
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and _kinds_in(d))
    if not names:
        expected = " or ".join(f"{root}/<name>/{kind.log.folder}" for kind in converted_kinds())
        raise FileNotFoundError(f"no chat logs under {str(root)!r} (expected {expected})")
    if target_path is not None:
        if len(names) > 1:
            raise ValueError(
                f"--target_path names one file but {str(root)!r} holds the chat logs of "
                f"{len(names)} prefixes ({', '.join(names)}): choose one with --log_folder"
            )
        return _one_prefix(root / names[0], _kinds_in(root / names[0]), target_path)
    return [
        source
        for name in names
        for source in _one_prefix(root / name, _kinds_in(root / name), None)
    ]


def log_files(folder: Path) -> list[Path]:
    """The folder's log files, oldest first: the original's rotated files (by name), then ours
    from ``chat.log.<N>`` down to ``chat.log.1``, then the current ``chat.log``."""

    def age(path: Path) -> tuple[int, int, str]:
        numbered = _NUMBERED.search(path.name)
        if numbered is not None:
            return (1, -int(numbered.group(1)), path.name)
        if path.name.endswith(".log") and path.name.count(".") == 1:
            return (2, 0, path.name)
        return (0, 0, path.name)

    found = [p for p in folder.iterdir() if p.is_file() and ".log" in p.name]
    return sorted(found, key=age)


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A record from a line in our format (JSON) or the original's (a Python dict literal)."""
    line = line.strip()
    start = line.find(b"{")
    if start < 0:
        return None
    line = line[start:]  # tolerates a logger's prefix before the record
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            value = ast.literal_eval(line.decode("utf-8", "replace"))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _answered(response: dict[str, Any] | None) -> bool:
    if response is None or "assistant" not in response:
        return False
    status = response.get("status", 200)  # the original's records have no status
    ok = isinstance(status, int) and 200 <= status < 300
    return ok and response.get("complete", True) is True


def entry(request: dict[str, Any], response: dict[str, Any], kind: Kind = CHAT) -> dict[str, Any]:
    assert kind.conversation is not None
    out = {
        "datetime": request.get("datetime"),
        "ip": request.get("ip") or request.get("forwarded-for"),  # the latter: old records
        "model": request.get("model"),
        "temperature": request.get("temperature"),
        "messages": kind.conversation(request),
        "tools": request.get("tools"),
        "is_tool_calls": bool(response.get("is_tool_calls", False)),
        "assistant": response.get("assistant"),
    }
    choices = response.get("choices")
    if isinstance(choices, list) and len(choices) > 1:  # n > 1: every answer, first one included
        out["choices"] = [c.get("assistant") for c in choices if isinstance(c, dict)]
    return out


def join(files: list[Path], target: Path, progress: _Progress, kind: Kind = CHAT) -> Result:
    result = Result(target)
    requests: list[dict[str, Any]] = []
    responses: dict[Any, dict[str, Any]] = {}
    for record in _records(files, result, progress):
        if kind.prompt in record:
            requests.append(record)
        elif ("assistant" in record or "is_tool_calls" in record) and _is_uid(record.get("uid")):
            responses[record["uid"]] = record
    for request in requests:
        uid = request.get("uid")
        response = responses.get(uid) if _is_uid(uid) else None
        if response is not None and _answered(response):
            result.entries.append(entry(request, response, kind))
        else:
            result.unanswered += 1
    result.written = len(result.entries)
    return result


def _is_uid(uid: Any) -> bool:
    return isinstance(uid, str | int)


def _records(files: list[Path], result: Result, progress: _Progress) -> Iterator[dict[str, Any]]:
    for path in files:
        with path.open("rb") as file:
            for line in file:
                progress.advance(len(line))
                if not line.strip():
                    continue
                record = parse_line(line)
                if record is None:
                    result.unreadable += 1
                else:
                    yield record


def write_json(entries: list[dict[str, Any]], target: Path) -> None:
    """A JSON array, one conversation per line, replacing ``target`` only once whole."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise ValueError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(b"[")
            for i, item in enumerate(entries):
                out.write(b"\n" if i == 0 else b",\n")
                out.write(orjson.dumps(item, default=_plain))
            out.write(b"\n]\n" if entries else b"]\n")
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """What JSON lacks but a Python literal of an old log line may hold (a set, bytes, ...)."""
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _Progress:
    """A rich progress bar over the bytes read, shown only when ``total`` is non-zero."""

    def __init__(self, console: Console, total: int) -> None:
        self._bar = None
        self._pending = 0
        if total:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("converting chat logs"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._task = self._bar.add_task("convert", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, size: int) -> None:
        if self._bar is None:
            return
        self._pending += size
        if self._pending >= 1024 * 1024:  # a refresh per MiB, not per line
            self._bar.advance(self._task, self._pending)
            self._pending = 0
