"""Who the client is: the peer address, or the one a trusted proxy reports in X-Forwarded-For.

Worked out only when a feature asks (limits per address, IP lists, chat logs), instead of a
middleware rewriting every request's scope.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from openai_forward.types import Scope

_CACHE_KEY = "openai_forward.client"
_IN_HEADERS: Any = object()  # "look for X-Forwarded-For in the request's headers"
_MEMO_SIZE = 4096  # distinct hosts whose trust is remembered (parsing an address is costly)


class ClientAddress:
    def __init__(self, trusted: Sequence[str]) -> None:
        self._any = "*" in trusted
        self._networks = tuple(ipaddress.ip_network(t, strict=False) for t in trusted if t != "*")
        self._trust: dict[str, bool] = {}

    def is_trusted(self, host: str) -> bool:
        trusted = self._trust.get(host)
        if trusted is None:
            if len(self._trust) >= _MEMO_SIZE:
                self._trust.clear()
            trusted = self._trust[host] = self._any or self._judge(host)
        return trusted

    def _judge(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def __call__(self, scope: Scope) -> str:
        return self.of(scope, _IN_HEADERS)

    def of(self, scope: Scope, forwarded_for: Any) -> str:
        """The client's address, worked out once per request. ``forwarded_for``: the request's
        first ``X-Forwarded-For`` if the caller has found it already (None: there is none),
        else ``_IN_HEADERS``."""
        cached: str | None = scope.get(_CACHE_KEY)
        if cached is None:
            cached = scope[_CACHE_KEY] = self._resolve(scope, forwarded_for)
        return cached

    def _resolve(self, scope: Scope, forwarded_for: Any) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.is_trusted(peer):
            return peer
        if forwarded_for is _IN_HEADERS:
            forwarded_for = next(
                (value for name, value in scope["headers"] if name == b"x-forwarded-for"), None
            )
        if forwarded_for is None:
            return peer
        hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        # Each trusted proxy appends the address it saw: walk back from the nearest one and stop
        # at the first address that is not a trusted proxy.
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer
