"""Every cache backend through the one store interface: real files in tmp_path, the real Redis."""

from __future__ import annotations

import asyncio
import threading

import pytest

from openai_forward.cache.lmdb_store import LmdbStore
from openai_forward.cache.memory import MemoryStore
from openai_forward.cache.store import Store, build_store
from tests import cache_backends
from tests.conftest import make_settings

cache_env = cache_backends.cache_env  # the fixture: one run per backend


def new_store(env: dict[str, str]) -> Store:
    return build_store(make_settings({**env, "CACHE_CHAT_COMPLETION": "true"}))


async def test_set_get_overwrite_delete(cache_env):
    store = new_store(cache_env)
    await store.open()
    try:
        assert await store.get(b"k" * 32) is None
        await store.set(b"k" * 32, b"first", None)
        assert await store.get(b"k" * 32) == b"first"
        await store.set(b"k" * 32, b"second" * 1000, None)
        assert await store.get(b"k" * 32) == b"second" * 1000
        await store.delete(b"k" * 32)
        assert await store.get(b"k" * 32) is None
        await store.delete(b"absent")  # no error
    finally:
        await store.close()


async def test_concurrent_writes_all_land(cache_env):
    store = new_store(cache_env)
    await store.open()
    try:
        keys = [i.to_bytes(32, "big") for i in range(200)]
        await asyncio.gather(*(store.set(k, k[::-1], None) for k in keys))
        values = await asyncio.gather(*(store.get(k) for k in keys))
        assert values == [k[::-1] for k in keys]
    finally:
        await store.close()


async def test_entries_survive_reopening(cache_env):
    if cache_env["CACHE_BACKEND"] == "MEMORY":
        pytest.skip("MEMORY lives and dies with its process")
    store = new_store(cache_env)
    await store.open()
    await store.set(b"p" * 32, b"kept", None)
    await store.close()
    again = new_store(cache_env)
    await again.open()
    try:
        assert await again.get(b"p" * 32) == b"kept"
    finally:
        await again.close()


async def test_disk_io_runs_off_the_event_loop(cache_env):
    if cache_env["CACHE_BACKEND"] in ("MEMORY", "REDIS"):
        pytest.skip("no file I/O")
    store = new_store(cache_env)
    seen: set[str] = set()
    original_get, original_write = store._get_sync, store._write_sync  # type: ignore[attr-defined]

    def get(key):
        seen.add(threading.current_thread().name)
        return original_get(key)

    def write(batch):
        seen.add(threading.current_thread().name)
        return original_write(batch)

    store._get_sync, store._write_sync = get, write  # type: ignore[attr-defined]
    await store.open()
    try:
        await store.set(b"t" * 32, b"v", None)
        assert await store.get(b"t" * 32) == b"v"
    finally:
        await store.close()
    assert threading.current_thread().name not in seen
    assert all(name.startswith("aifd-cache-") for name in seen), seen


async def test_lmdb_grows_its_map_instead_of_failing(tmp_path):
    store = LmdbStore(tmp_path / "lmdb", map_size=256 * 1024)
    await store.open()
    try:
        values = {i.to_bytes(32, "big"): bytes([i]) * 100_000 for i in range(30)}  # ~3 MB
        for k, v in values.items():
            await store.set(k, v, None)
        assert store.map_size > 3 * 1024 * 1024
        assert [await store.get(k) for k in values] == list(values.values())
    finally:
        await store.close()


async def test_memory_is_bounded_by_entries_and_bytes_lru_out():
    store = MemoryStore(max_entries=3, max_bytes=10_000)
    for name in (b"a", b"b", b"c"):
        await store.set(name, b"x", None)
    assert await store.get(b"a") == b"x"  # now the most recently used
    await store.set(b"d", b"x", None)
    assert len(store) == 3
    assert await store.get(b"b") is None  # least recently used went out
    assert await store.get(b"a") == b"x"
    await store.set(b"big1", b"y" * 2400, None)
    await store.set(b"big2", b"y" * 2400, None)
    await store.set(b"big3", b"y" * 2400, None)
    await store.set(b"big4", b"y" * 2400, None)
    assert store.size <= 10_000 and len(store) <= 3
    assert await store.get(b"big4") is not None
    await store.set(b"huge", b"z" * 5000, None)  # over a quarter of the budget: not kept
    assert await store.get(b"huge") is None
