"""Appending JSON lines to files off the event loop: a bounded queue, one writer thread.

The event loop only ever calls :meth:`LogWriter.submit` (a ``put_nowait``). The writer thread
renders each entry (so record assembly and serialization are not paid on the loop), then appends
the lines. Several worker processes may append to the same file:

- files are opened with ``O_APPEND`` and each batch of whole lines goes out in one ``write``,
  which the kernel applies atomically to a local file, so lines of different processes never
  interleave;
- rotation (``chat.log`` -> ``chat.log.1`` -> ... -> ``chat.log.<backups>``, the oldest dropped)
  happens under an ``flock`` on the folder, and before each write a writer checks that its open
  file is still the one named ``chat.log`` (another process may have rotated it) and reopens it
  if not. A line written in that instant lands in ``chat.log.1``: still kept, still read by
  ``aifd convert``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process, no locking needed
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("openai_forward.chatlog")

MAX_BYTES = 50 * 1024 * 1024
BACKUPS = 20
QUEUE_SIZE = 4096
WRITE_BATCH = 1024 * 1024  # bytes of lines joined into one write
WARN_EVERY = 60.0  # seconds between two warnings of the same kind
LINGER = 0.02  # seconds a record may wait for others to be written with it
BATCH_ENTRIES = 4096  # entries taken off the queue at a time
YIELD_EVERY = 0.001  # seconds of rendering after which the writer offers the GIL
YIELD_CHECK = 32  # entries rendered between two looks at the clock

Render = Callable[[], dict[str, Any] | None]


class _LogFile:
    """One log file, kept open, rotated by size in agreement with other processes."""

    def __init__(self, root: Path, relative: str, max_bytes: int, backups: int) -> None:
        self.path = path = root / relative
        self._max_bytes = max_bytes
        self._backups = backups
        # Chat logs hold what users wrote: folders for the owner (and group) only, every level
        # (``mkdir(parents=True)`` would give the levels above the last one the default mode).
        root.mkdir(parents=True, exist_ok=True, mode=0o750)
        folder = root
        for part in Path(relative).parent.parts:
            folder = folder / part
            folder.mkdir(exist_ok=True, mode=0o750)
        # Rotation is serialized across processes by a lock on the folder (no lock file needed).
        self._dir = os.open(path.parent, os.O_RDONLY) if fcntl is not None else -1
        self._fd = -1
        self._ino = -1
        try:
            self._open()
        except OSError:
            self.close()
            raise

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._ino = os.fstat(self._fd).st_ino

    def write(self, lines: list[bytes]) -> None:
        """Append whole lines, in as few writes as the size limit allows."""
        start = 0
        while start < len(lines):
            size = self._size()
            if size and size + len(lines[start]) > self._max_bytes:
                self._rotate(len(lines[start]))
                size = self._size()
            room = min(self._max_bytes - size, WRITE_BATCH)
            end, total = start + 1, len(lines[start])
            while end < len(lines) and total + len(lines[end]) <= room:
                total += len(lines[end])
                end += 1
            self._write_all(b"".join(lines[start:end]))
            start = end

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _size(self) -> int:
        """Size of the file now named ``path``, reopened first if another process rotated it."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or current.st_ino != self._ino:
            self._open()
            return os.fstat(self._fd).st_size
        return current.st_size

    def _rotate(self, incoming: int) -> None:
        if self._dir >= 0:
            fcntl.flock(self._dir, fcntl.LOCK_EX)
        try:
            # Another process may have rotated while this one waited for the lock.
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(self.path)
                if current.st_ino == self._ino and current.st_size + incoming > self._max_bytes:
                    name = str(self.path)
                    for i in range(self._backups - 1, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.replace(f"{name}.{i}", f"{name}.{i + 1}")
                    os.replace(name, f"{name}.1")
            self._open()
        finally:
            if self._dir >= 0:
                fcntl.flock(self._dir, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._dir):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dir = -1


class LogWriter:
    """Queues ``(relative path, render)`` entries and appends ``render()`` as JSON lines.

    ``secrets`` are replaced by ``***`` in every line: keys never reach a request record by
    design (no headers are logged), but a user may paste one into a message, or an upstream
    may quote one in an error.
    """

    def __init__(
        self,
        root: Path,
        *,
        secrets: Sequence[str] = (),
        max_bytes: int = MAX_BYTES,
        backups: int = BACKUPS,
        queue_size: int = QUEUE_SIZE,
        linger: float = LINGER,
    ) -> None:
        self.root = root
        self._linger = linger
        self._secrets = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self._max_bytes = max_bytes
        self._backups = max(1, backups)
        # A deque, not a queue.Queue: the event loop appends without a lock or a wake-up, and
        # the writer collects every ``linger`` seconds.
        self._pending: deque[tuple[str, Render]] = deque()
        self._queue_size = queue_size
        self._capacity = queue_size  # entries the queue takes; 0 once stopped
        self._stopping = threading.Event()
        self._files: dict[str, _LogFile] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # entries refused because the queue was full (event loop side)
        self.failed = 0  # entries that could not be rendered or written (writer side)
        self._unreported = 0
        self._warned_at = -WARN_EVERY
        self._failure_warned_at = -WARN_EVERY

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chat-log-writer", daemon=True)
        self._thread.start()

    def submit(self, path: str, render: Render) -> None:
        """Queue an entry without ever waiting: a full queue drops it (counted, warned)."""
        if len(self._pending) < self._capacity:
            self._pending.append((path, render))
        elif not self._closed:
            self._drop()

    def _drop(self) -> None:
        self.dropped += 1
        self._unreported += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            self._report_drops()

    def _report_drops(self) -> None:
        logger.warning(
            "Chat log queue full (%d entries): dropped %d record(s), %d in all",
            self._queue_size,
            self._unreported,
            self.dropped,
        )
        self._unreported = 0

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything queued so far, then stop the thread and close the files (blocks)."""
        if self._closed:
            return
        self._closed = True
        self._capacity = 0
        if self._unreported:
            self._report_drops()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("Chat log writer is stuck; records still queued are lost")
                return
        for file in self._files.values():
            file.close()
        self._files.clear()

    def _run(self) -> None:
        pending = self._pending
        while True:
            # Records gather for ``linger`` seconds, then go out in one batch: under load one
            # wake-up and one write serve many of them.
            stopping = self._stopping.wait(self._linger)
            while pending:
                # Taken off the left while the event loop appends on the right: each deque
                # operation is atomic, so neither side needs a lock.
                batch = [pending.popleft() for _ in range(min(len(pending), BATCH_ENTRIES))]
                try:
                    self._write(batch)
                except Exception as exc:  # the thread must live on, or the queue would only fill
                    self._failure(f"write a batch ({type(exc).__name__})")
            if stopping:
                return

    def _write(self, entries: list[tuple[str, Render]]) -> None:
        lines_by_path: dict[str, list[bytes]] = {}
        held_since = time.monotonic()
        for count, (path, render) in enumerate(entries, 1):
            if count % YIELD_CHECK == 0:
                # This thread shares the GIL with the event loop. Left alone, the interpreter
                # takes it back from a busy thread only every switch interval (5 ms), and a
                # request waits that long; offering it after each millisecond of rendering
                # bounds the loop's wait.
                now = time.monotonic()
                if now - held_since > YIELD_EVERY:
                    time.sleep(0)
                    held_since = now
            line = self._line(render)
            if line is not None:
                lines_by_path.setdefault(path, []).append(line)
        for path, lines in lines_by_path.items():
            try:
                file = self._files.get(path)
                if file is None:
                    file = self._files[path] = _LogFile(
                        self.root, path, self._max_bytes, self._backups
                    )
                file.write(lines)
            except OSError as exc:
                broken = self._files.pop(path, None)
                if broken is not None:
                    with contextlib.suppress(OSError):
                        broken.close()  # reopened afresh with the next record
                self.failed += len(lines) - 1
                self._failure(f"write {self.root / path} ({exc.strerror or exc})")

    def _line(self, render: Render) -> bytes | None:
        """The entry's JSON line, secrets masked; None if it has no record or cannot be made."""
        try:
            record = render()
            if record is None:
                return None
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except Exception as exc:  # one bad entry must not stop the log
            self._failure(f"render a record ({type(exc).__name__})")
            return None
        for secret in self._secrets:
            line = line.replace(secret, b"***")
        return line

    def _failure(self, what: str) -> None:
        self.failed += 1
        now = time.monotonic()
        if now - self._failure_warned_at >= WARN_EVERY:
            self._failure_warned_at = now
            logger.warning("Chat log could not %s; %d record(s) lost so far", what, self.failed)
