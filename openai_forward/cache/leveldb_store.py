"""LEVELDB (plyvel): a single-process store: only one process may open the folder at a time,
so use it with one worker (LMDB or REDIS serve several). Writes go to LevelDB's log before they
return, so a killed process loses nothing that was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plyvel

from openai_forward.cache.disk import ThreadedStore, Write


class LevelDbStore(ThreadedStore):
    name = "LEVELDB"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._db: Any = None

    def _open_sync(self) -> None:
        self._db = plyvel.DB(str(self.path), create_if_missing=True)

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _get_sync(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def _write_sync(self, batch: list[Write]) -> None:
        with self._db.write_batch() as writes:
            for key, value in batch:
                if value is None:
                    writes.delete(key)
                else:
                    writes.put(key, value)
