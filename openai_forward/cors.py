"""CORS for browser clients: preflights answered locally, origin echoed on responses."""

from __future__ import annotations

from collections.abc import Sequence

from openai_forward.types import Scope, Send

_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD"


class Cors:
    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._allowed = frozenset(o.rstrip("/").encode() for o in origins)

    def response_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """Headers that let a browser at ``origin`` read the response (none if refused)."""
        if self._any:
            return [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", b"*"),
            ]
        if origin in self._allowed:
            return [
                (b"access-control-allow-origin", origin),
                (b"access-control-expose-headers", b"*"),
                (b"vary", b"Origin"),
            ]
        return []

    @staticmethod
    def is_preflight(scope: Scope) -> bool:
        return scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        )

    async def preflight(self, scope: Scope, send: Send, origin: bytes) -> None:
        allowed = self.response_headers(origin)
        if not allowed:
            from openai_forward.errors import send_error

            await send_error(send, 403, "Origin not allowed")
            return
        requested = next(
            (v for n, v in scope["headers"] if n == b"access-control-request-headers"), b"*"
        )
        headers = [
            *allowed,
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-allow-headers", requested),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
