"""MEMORY: a per-process LRU bounded by entries and bytes. No I/O, so no thread."""

from __future__ import annotations

from collections import OrderedDict

MAX_ENTRIES = 10_000
MAX_BYTES = 256 * 1024 * 1024


class MemoryStore:
    name = "MEMORY"

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0  # bytes of keys and values held
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._items.clear()
        self.size = 0

    async def get(self, key: bytes) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None:
        self._remove(key)
        cost = len(key) + len(value)
        if cost > self.max_bytes // 4:
            return  # one answer may not push out most of the others
        self._items[key] = value
        self.size += cost
        while len(self._items) > self.max_entries or self.size > self.max_bytes:
            old_key, old_value = self._items.popitem(last=False)
            self.size -= len(old_key) + len(old_value)

    async def delete(self, key: bytes) -> None:
        self._remove(key)

    def _remove(self, key: bytes) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(key) + len(old)
