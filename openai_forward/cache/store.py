"""The one small interface every cache backend implements, and the backends by name.

Backends are dumb byte stores: keys are 32-byte digests, values are opaque. Expiry travels inside
the value (see :func:`pack`) so every backend honours ``CACHE_TTL`` the same way; Redis is also
given the TTL so it can drop entries by itself. Drivers are imported only when their backend is
chosen: the modules are named here by import string (as uvicorn does for its loops).
"""

from __future__ import annotations

import importlib
import struct
import time
from pathlib import Path
from typing import Protocol

from openai_forward.settings import ConfigError, Settings

# version byte, expiry (unix seconds; 0 = never)
_HEADER = struct.Struct("<Bd")
_VERSION = 1


class Store(Protocol):
    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: bytes) -> bytes | None: ...

    async def set(self, key: bytes, value: bytes, ttl: float | None) -> None: ...

    async def delete(self, key: bytes) -> None: ...


def pack(body: bytes, ttl: float | None) -> bytes:
    return _HEADER.pack(_VERSION, time.time() + ttl if ttl else 0.0) + body


def unpack(value: bytes) -> tuple[bytes | None, bool]:
    """``(body, expired)``; the body is None for an expired or unreadable value."""
    if len(value) < _HEADER.size:
        return None, True
    version, expires = _HEADER.unpack_from(value)
    if version != _VERSION:
        return None, True
    if expires and expires <= time.time():
        return None, True
    return value[_HEADER.size :], False


# name -> (module:class, driver module, pip extra)
BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "MEMORY": ("openai_forward.cache.memory:MemoryStore", None, None),
    "LMDB": ("openai_forward.cache.lmdb_store:LmdbStore", "lmdb", "lmdb"),
    "LEVELDB": ("openai_forward.cache.leveldb_store:LevelDbStore", "plyvel", "leveldb"),
    "ROCKSDB": ("openai_forward.cache.rocksdb_store:RocksDbStore", "rocksdict", "rocksdb"),
    "REDIS": ("openai_forward.cache.redis_store:RedisStore", None, None),  # our own client
}
ON_DISK = frozenset({"LMDB", "LEVELDB", "ROCKSDB"})


def store_path(settings: Settings) -> Path:
    """Where an on-disk backend keeps its files: ``<CACHE_ROOT_PATH_OR_URL>/cache/<backend>``."""
    return Path(settings.cache_root_path_or_url) / "cache" / settings.cache_backend.lower()


def check_driver(backend: str) -> None:
    """Raise ``ConfigError`` naming the extra to install when the backend's driver is missing."""
    _, driver, extra = BACKENDS[backend]
    if driver is None:
        return
    try:
        importlib.import_module(driver)
    except ImportError:
        raise ConfigError(
            "CACHE_BACKEND",
            backend,
            f"its driver {driver!r} installed: pip install 'openai-forward[{extra}]'",
        ) from None


def build_store(settings: Settings) -> Store:
    module_name, class_name = BACKENDS[settings.cache_backend][0].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if settings.cache_backend == "REDIS":
        return cls(settings.cache_root_path_or_url, settings.redis_key_prefix)
    if settings.cache_backend in ON_DISK:
        return cls(store_path(settings))
    return cls()
