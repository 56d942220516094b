"""LMDB: one memory-mapped file, safe for several worker processes at once.

A full map is grown (doubled) and the write retried, instead of failing. Another process that
grew the map is followed with ``set_mapsize(0)``. Resizing needs no transaction open in this
process, so the reader thread holds ``_resize`` around each lookup and the writer takes it to
resize. Commits are synchronous (durable across a killed process and a crashed machine); the
writer batches them (see :mod:`openai_forward.cache.disk`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import lmdb

from openai_forward.cache.disk import ThreadedStore, Write

INITIAL_MAP_SIZE = 64 * 1024 * 1024
_MAX_GROWTHS = 24


class LmdbStore(ThreadedStore):
    name = "LMDB"

    def __init__(self, path: Path, map_size: int = INITIAL_MAP_SIZE) -> None:
        super().__init__(path)
        self._map_size = map_size
        self._env: lmdb.Environment | None = None
        self._resize = threading.Lock()

    @property
    def map_size(self) -> int:
        assert self._env is not None
        return int(self._env.info()["map_size"])

    def _open_sync(self) -> None:
        self._env = lmdb.open(
            str(self.path),
            map_size=self._map_size,
            subdir=True,
            readahead=False,
            max_dbs=0,
            lock=True,
        )
        self._env.reader_check()  # clear reader slots left by a killed process

    def _close_sync(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def _get_sync(self, key: bytes) -> bytes | None:
        assert self._env is not None
        with self._resize:
            try:
                with self._env.begin() as txn:
                    return txn.get(key)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
                with self._env.begin() as txn:
                    return txn.get(key)

    def _write_sync(self, batch: list[Write]) -> None:
        env = self._env
        assert env is not None
        for _ in range(_MAX_GROWTHS):
            try:
                with env.begin(write=True) as txn:
                    for key, value in batch:
                        if value is None:
                            txn.delete(key)
                        else:
                            txn.put(key, value)
                return
            except lmdb.MapFullError:
                with self._resize:
                    env.set_mapsize(int(env.info()["map_size"]) * 2)
            except lmdb.MapResizedError:
                with self._resize:
                    env.set_mapsize(0)
        raise lmdb.MapFullError("the LMDB cache could not grow enough for this write")
