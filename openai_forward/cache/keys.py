"""Cache keys: a hash of the canonical request (pure).

Two requests share an entry exactly when they would ask the upstream the same thing: same base
URL, same route and query, same body fields once JSON object keys are sorted. ``stream``,
``stream_options`` and ``caching`` only shape the delivery, so they stay out of the key; so do the
caller's key and address: an answer does not depend on who paid for it (a cache is shared).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

# Bumped when the key or the stored value changes shape, so old entries are simply never found.
KEY_VERSION = "aifd-cache-1"
NOT_IN_KEY = frozenset({"stream", "stream_options", "caching"})


def cache_key(base_url: str, route: str, query: bytes, payload: dict[str, Any]) -> bytes:
    """The 32-byte key of a request whose JSON body is ``payload``."""
    fields = {name: value for name, value in payload.items() if name not in NOT_IN_KEY}
    canonical = orjson.dumps(
        (KEY_VERSION, base_url, route, query.decode("latin-1"), fields),
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()


def without_caching_field(payload: dict[str, Any]) -> bytes | None:
    """The body to send upstream when the client added our ``caching`` field; None when there
    is no such field and the client's body goes as it came."""
    if "caching" not in payload:
        return None
    return orjson.dumps({name: value for name, value in payload.items() if name != "caching"})
