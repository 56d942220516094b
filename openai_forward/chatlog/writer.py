"""Appending JSON lines to files off the event loop: a bounded queue, one writer thread.

The event loop only ever calls :meth:`LogWriter.submit` (a ``put_nowait``). The writer thread
renders each entry (so record assembly and serialization are not paid on the loop), then appends
the lines. Several worker processes may append to the same file:

- files are opened with ``O_APPEND``; each batch of whole lines goes out in one ``write``, under
  an ``flock`` on the file's folder, so lines of different processes never interleave;
- a write the disk cannot take whole (``ENOSPC``: the kernel writes what fits, then refuses) is
  truncated back to the size the file had before it (the lock makes that size exact), so no line
  is ever torn; its records are lost, counted and said (:class:`LogWriter`);
- rotation (``chat.log`` -> ``chat.log.1`` -> ... -> ``chat.log.<backups>``, the oldest dropped)
  happens under the same lock, and before each write a writer checks that its open file is still
  the one named ``chat.log`` (another process may have rotated it) and reopens it if not;
- a file found ending inside a line (a process killed mid-write) gets a newline before the next
  record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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


class Unwritten(Exception):
    """A write failed: the first ``written`` lines are in the file, none of the others (a write
    that failed part-way was rolled back)."""

    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(str(error))
        self.written = written
        self.error = error


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
        # Writes and rotation are serialized across processes by a lock on the folder (no lock
        # file needed).
        self._dir = os.open(path.parent, os.O_RDONLY) if fcntl is not None else -1
        self._fd = -1
        self._ino = -1
        self._check_end = True  # look whether the file ends a line before writing to it
        try:
            self._open()
        except OSError:
            self.close()
            raise

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        # read too: for a look at the last byte (``_append``)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        self._ino = os.fstat(self._fd).st_ino
        self._check_end = True

    def write(self, lines: list[bytes]) -> None:
        """Append whole lines, in as few writes as the size limit allows. A write that fails
        (a full disk) is rolled back and ends the call: raises :class:`Unwritten`."""
        done = 0
        with self._locked():
            try:
                while done < len(lines):
                    size = self._size()
                    if size and size + len(lines[done]) > self._max_bytes:
                        self._rotate(len(lines[done]))
                        size = self._size()
                    room = min(self._max_bytes - size, WRITE_BATCH)
                    end, total = done + 1, len(lines[done])
                    while end < len(lines) and total + len(lines[end]) <= room:
                        total += len(lines[end])
                        end += 1
                    self._append(b"".join(lines[done:end]), size)
                    done = end
            except OSError as exc:
                raise Unwritten(done, exc) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The folder's lock: no other writer appends, truncates or rotates meanwhile."""
        if self._dir < 0:
            yield
            return
        fcntl.flock(self._dir, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._dir, fcntl.LOCK_UN)

    def _append(self, data: bytes, size: int) -> None:
        """Write ``data`` at the end of the file, ``size`` bytes long (under the lock): whole,
        or not at all. A write the disk cannot take whole (``ENOSPC``: the kernel writes what
        fits, then refuses) is truncated away, so that no line is ever torn."""
        if self._check_end and size and os.pread(self._fd, 1, size - 1) != b"\n":
            # A cut line (a rollback that failed, a process killed mid-write) ends here: what
            # follows starts on a line of its own.
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                if not written:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
        except OSError:
            if len(view) < len(data):
                try:
                    os.ftruncate(self._fd, size)
                except OSError:
                    self._check_end = True
            raise
        self._check_end = False

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
        """Under the lock."""
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

    Every record lost is counted, by cause, and said: a full queue, at most once a minute, by
    the event loop; what the writer could not render or write (a full disk), at most once a
    minute while it lasts, and once more within a minute of the last loss; and at ``stop`` a
    last line with the exact total (when the queue's own line would not already be it).
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
        # Each count is changed by one thread only: no lock.
        self.dropped = 0  # entries refused because the queue was full (event loop side)
        self.late = 0  # entries submitted once stopped (event loop side)
        self.failed = 0  # entries that could not be rendered or written (writer side)
        self._causes: dict[str, int] = {}  # what ``failed`` counts, by cause
        self._unreported = 0
        self._warned_at = -WARN_EVERY
        self._late_warned_at = -WARN_EVERY
        self._failures_unreported = 0
        self._last_failure = ""
        self._failure_warned_at = -WARN_EVERY

    @property
    def lost(self) -> int:
        """Records lost so far, whatever the cause."""
        return self.dropped + self.late + self.failed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chat-log-writer", daemon=True)
        self._thread.start()

    def submit(self, path: str, render: Render) -> None:
        """Queue an entry without ever waiting: a full queue drops it (counted, warned)."""
        if len(self._pending) < self._capacity:
            self._pending.append((path, render))
        elif not self._closed:
            self._drop()
        else:
            self._late()

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

    def _late(self) -> None:
        """A call that ended after the log was closed (a task that outlived the shutdown)."""
        self.late += 1
        now = time.monotonic()
        if now - self._late_warned_at >= WARN_EVERY:
            self._late_warned_at = now
            logger.warning(
                "Chat log already closed: %d record(s) of calls that ended later lost", self.late
            )

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
                stuck = len(self._pending)
                logger.warning(
                    "Chat log writer is stuck; %d record(s) still queued are lost", stuck
                )
                self._report_total(stuck)
                return
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._report_total()

    def _report_total(self, stuck: int = 0) -> None:
        """The last line: every record lost, by cause. Not said when a full queue was the only
        cause: its own line, just before, gave the total."""
        if not (self.failed or self.late or stuck):
            return
        causes = dict(self._causes)
        for cause, count in (
            ("queue full", self.dropped),
            ("ended after shutdown", self.late),
            ("writer stuck", stuck),
        ):
            if count:
                causes[cause] = count
        logger.warning(
            "Chat log: %d record(s) lost in all (%s)",
            self.lost + stuck,
            ", ".join(f"{count} {cause}" for cause, count in causes.items()),
        )

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
                    self._write(batch)  # counts what it loses
                except Exception:  # a defect: the thread must live on, or the queue would fill
                    logger.exception("Chat log writer failed on a batch of %d", len(batch))
            if self._failures_unreported and not stopping:
                self._failure()  # losses since the last warning: said once the minute is up
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
            except Exception as exc:  # the thread must live on, or the queue would only fill
                written = exc.written if isinstance(exc, Unwritten) else 0
                error = exc.error if isinstance(exc, Unwritten) else exc
                broken = self._files.pop(path, None)
                if broken is not None:
                    with contextlib.suppress(OSError):
                        broken.close()  # reopened afresh with the next record
                if isinstance(error, OSError):
                    cause = (error.strerror or type(error).__name__).lower()
                else:
                    cause = f"write error ({type(error).__name__})"
                self._lose(len(lines) - written, f"write {self.root / path} ({cause})", cause)

    def _line(self, render: Render) -> bytes | None:
        """The entry's JSON line, secrets masked; None if it has no record or cannot be made."""
        try:
            record = render()
            if record is None:
                return None
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except Exception as exc:  # one bad entry must not stop the log
            self._lose(1, f"render a record ({type(exc).__name__})", "not rendered")
            return None
        for secret in self._secrets:
            line = line.replace(secret, b"***")
        return line

    def _lose(self, count: int, what: str, cause: str) -> None:
        self.failed += count
        self._causes[cause] = self._causes.get(cause, 0) + count
        self._failures_unreported += count
        self._last_failure = what
        self._failure()

    def _failure(self) -> None:
        """Say what was lost, at most once a minute."""
        now = time.monotonic()
        if now - self._failure_warned_at >= WARN_EVERY:
            self._failure_warned_at = now
            self._failures_unreported = 0
            logger.warning(
                "Chat log could not %s; %d record(s) lost so far", self._last_failure, self.lost
            )
