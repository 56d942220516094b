"""ROCKSDB (rocksdict): a single-process store, like LevelDB: one process per folder. Values are
raw bytes (``raw_mode``), never pickled. The write-ahead log keeps what a killed process wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict, WriteBatch

from openai_forward.cache.disk import ThreadedStore, Write


class RocksDbStore(ThreadedStore):
    name = "ROCKSDB"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._db: Any = None

    def _open_sync(self) -> None:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(self.path), options=options)

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _get_sync(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def _write_sync(self, batch: list[Write]) -> None:
        writes = WriteBatch(raw_mode=True)
        for key, value in batch:
            if value is None:
                writes.delete(key)
            else:
                writes.put(key, value)
        self._db.write(writes)
