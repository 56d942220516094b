"""The shell shared by the on-disk backends: their I/O runs in threads, never on the event loop.

One reader thread serves lookups; one writer thread commits. Writes queue up and the writer
commits whatever has queued in one batch, so a burst of answers costs one commit (one fsync for
LMDB), and lookups never wait behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

Write = tuple[bytes, bytes | None]  # None deletes


class Worker:
    """One thread running calls in the order they came: a plain queue in, one
    ``call_soon_threadsafe`` back. Every hit on a disk backend pays this hop, and it asks less
    of the event loop than ``run_in_executor`` (which wraps a ``concurrent.futures.Future`` in
    an asyncio one and may hand calls to several threads)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._stopped:
            raise RuntimeError("the cache store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    async def stop(self) -> None:
        """Finish what was queued, then end the thread (joined off the loop)."""
        self._stopped = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:
                _deliver(loop, _fail, future, exc)
            else:
                _deliver(loop, _resolve, future, result)


def _deliver(loop: asyncio.AbstractEventLoop, how: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(how, *args)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class ThreadedStore:
    name = "DISK"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: deque[Write] = deque()
        self._reader: Worker | None = None
        self._writer: Worker | None = None

    # What each backend provides; called in its threads only.
    def _open_sync(self) -> None:
        raise NotImplementedError

    def _close_sync(self) -> None:
        raise NotImplementedError

    def _get_sync(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def _write_sync(self, batch: list[Write]) -> None:
        raise NotImplementedError

    def probe(self) -> None:
        """Open and close at once, in the calling thread: the start-up check."""
        self._open_path()
        self._close_sync()

    def _open_path(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._open_sync()

    async def open(self) -> None:
        prefix = f"aifd-cache-{self.name.lower()}"
        self._reader = Worker(prefix + "-read")
        self._writer = Worker(prefix + "-write")
        try:
            await self._writer.call(self._open_path)
        except BaseException:
            await self._stop_workers()
            raise

    async def close(self) -> None:
        if self._writer is None:
            return
        try:
            await self._writer.call(self._drain)
        finally:
            if self._reader is not None:
                await self._reader.stop()  # pending lookups finish before the store closes
                self._reader = None
            await self._writer.call(self._close_sync)
            await self._stop_workers()

    async def _stop_workers(self) -> None:
        for worker in (self._reader, self._writer):
            if worker is not None:
                await worker.stop()
        self._reader = self._writer = None

    async def get(self, key: bytes) -> bytes | None:
        if self._reader is None:
            raise RuntimeError("the cache store is not open")
        result: bytes | None = await self._reader.call(self._get_sync, key)
        return result

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None:
        await self._write(key, value)

    async def delete(self, key: bytes) -> None:
        await self._write(key, None)

    async def _write(self, key: bytes, value: bytes | None) -> None:
        if self._writer is None:
            raise RuntimeError("the cache store is not open")
        self._queue.append((key, value))
        await self._writer.call(self._drain)

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
