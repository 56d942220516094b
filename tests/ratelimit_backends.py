"""The request-limit backends every limit test runs on: ``memory://`` and the real Redis."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limit_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment selecting the backend; on Redis under this test's own key prefix."""
    if request.param == "memory":
        return {"REQ_RATE_LIMIT_BACKEND": "memory://"}
    redis = request.getfixturevalue("redis_server")
    return {"REQ_RATE_LIMIT_BACKEND": redis.url, "REDIS_KEY_PREFIX": redis.prefix}
