"""The cache backends every cache suite runs over (as ``limits`` runs its suite per storage)."""

from __future__ import annotations

import pytest

BACKENDS = [
    "MEMORY",
    "LMDB",
    "LEVELDB",
    "ROCKSDB",
    pytest.param("REDIS", marks=pytest.mark.redis),
]


@pytest.fixture(params=BACKENDS)
def cache_env(request, tmp_path) -> dict[str, str]:
    """Environment selecting one backend: disk ones in tmp_path, Redis under the test's prefix."""
    env = {"CACHE_BACKEND": request.param}
    if request.param == "REDIS":
        redis = request.getfixturevalue("redis_server")
        env |= {"CACHE_ROOT_PATH_OR_URL": redis.url, "REDIS_KEY_PREFIX": redis.prefix}
    else:
        env["CACHE_ROOT_PATH_OR_URL"] = str(tmp_path)
    return env
