"""The shell shared by the on-disk backends: their I/O runs in threads, never on the event loop.

One reader thread serves lookups; one writer thread commits. Writes queue up and the writer
commits whatever has queued in one batch, so a burst of answers costs one commit (one fsync for
LMDB), and lookups never wait behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

Write = tuple[bytes, bytes | None]  # None deletes


class ThreadedStore:
    name = "DISK"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: deque[Write] = deque()
        self._reader: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None

    # What each backend provides; called in its threads only.
    def _open_sync(self) -> None:
        raise NotImplementedError

    def _close_sync(self) -> None:
        raise NotImplementedError

    def _get_sync(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def _write_sync(self, batch: list[Write]) -> None:
        raise NotImplementedError

    async def open(self) -> None:
        prefix = f"aifd-cache-{self.name.lower()}"
        self._reader = ThreadPoolExecutor(1, thread_name_prefix=prefix + "-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=prefix + "-write")
        await asyncio.get_running_loop().run_in_executor(self._writer, self._open_path)

    def probe(self) -> None:
        """Open and close at once, in the calling thread: the start-up check."""
        self._open_path()
        self._close_sync()

    def _open_path(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._open_sync()

    async def close(self) -> None:
        if self._writer is None or self._reader is None:
            return
        loop = asyncio.get_running_loop()
        reader, writer = self._reader, self._writer
        try:
            await loop.run_in_executor(writer, self._drain)
        finally:
            # Joining threads blocks: done in the default executor, never on the loop.
            await loop.run_in_executor(None, reader.shutdown)
            await loop.run_in_executor(writer, self._close_sync)
            await loop.run_in_executor(None, writer.shutdown)
            self._reader = self._writer = None

    async def get(self, key: bytes) -> bytes | None:
        assert self._reader is not None, "open() was not awaited"
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._get_sync, key)

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None:
        await self._write(key, value)

    async def delete(self, key: bytes) -> None:
        await self._write(key, None)

    async def _write(self, key: bytes, value: bytes | None) -> None:
        assert self._writer is not None, "open() was not awaited"
        self._queue.append((key, value))
        await asyncio.get_running_loop().run_in_executor(self._writer, self._drain)

    def _drain(self) -> None:
        """Commit everything queued so far; a later call finds the queue empty and returns."""
        batch: list[Write] = []
        while True:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                break
        if batch:
            self._write_sync(batch)
