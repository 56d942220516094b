"""Keys: forward keys to real keys, rotation, cool-down. No I/O."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from openai_forward.settings import Secret


class KeyPool:
    """Real upstream keys used in turn; a key the upstream refused sits out a cool-down."""

    def __init__(self, keys: Sequence[Secret], clock=time.monotonic) -> None:
        self._headers = [f"Bearer {k.reveal()}".encode("latin-1") for k in keys]
        self._free_at = [0.0] * len(keys)
        self._next = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._headers)

    def acquire(self) -> int:
        """The next key in rotation not cooling down (if all are, the one free soonest)."""
        count = len(self._headers)
        now = self._clock()
        for step in range(count):
            index = (self._next + step) % count
            if self._free_at[index] <= now:
                self._next = index + 1
                return index
        return min(range(count), key=self._free_at.__getitem__)

    def header(self, index: int) -> bytes:
        return self._headers[index]

    def reveal(self, index: int) -> str:
        """The key itself, for where it travels outside a header (a WebSocket subprotocol)."""
        return self._headers[index].decode("latin-1").removeprefix("Bearer ")

    def bench(self, index: int, seconds: float | None) -> None:
        """Set a key aside for ``seconds`` (``None``: until restart)."""
        self._free_at[index] = float("inf") if seconds is None else self._clock() + seconds

    def has_free_other_than(self, index: int) -> bool:
        now = self._clock()
        return any(t <= now for i, t in enumerate(self._free_at) if i != index)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What to send upstream and who the client is, decided from its ``Authorization``."""

    authorization: str | None  # header to forward as is (None: none, or one from the pool)
    use_pool: bool  # take a real key from the pool for each attempt
    user: str | None  # hashed forward key, for limits and logs; None: identify by address


_OPEN = Credentials(None, True, None)
_ANONYMOUS = Credentials(None, False, None)


class KeyResolver:
    def __init__(self, api_keys: Sequence[Secret], forward_keys: Sequence[Secret]) -> None:
        self.pool = KeyPool(api_keys)
        # Keys are looked up by SHA-256: equal-length digests, so timing tells nothing useful
        # about a forward key, and the raw keys are not kept.
        self._forward = {hashlib.sha256(k.reveal().encode()).digest(): k for k in forward_keys}
        self._open = bool(api_keys) and not forward_keys

    def resolve(self, authorization: str | None) -> Credentials:
        if self._open:
            return _OPEN
        if authorization is None:
            return _ANONYMOUS
        if not self._forward:
            return Credentials(authorization, False, None)
        token = bearer_token(authorization)
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            if digest in self._forward:
                return Credentials(None, len(self.pool) > 0, digest.hex()[:24])
        return Credentials(authorization, False, None)


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyMask:
    """Masks keys in bytes that leave the proxy (an upstream's answer that quotes the key it
    got, as some OpenAI-compatible servers do in their error messages)."""

    REPLACEMENT = b"***"

    def __init__(self, keys: Sequence[Secret]) -> None:
        # longest first, so that a key containing another is masked whole
        self._keys = sorted({k.reveal().encode("latin-1") for k in keys}, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __call__(self, data: bytes) -> bytes:
        for key in self._keys:
            if key in data:
                data = data.replace(key, self.REPLACEMENT)
        return data
