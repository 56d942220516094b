"""Who the client is: the peer address, or the one a trusted proxy reports in X-Forwarded-For.

The client is the right-most X-Forwarded-For address that is not itself a trusted proxy (as
uvicorn's and werkzeug's proxy-header handlers decide), so a client cannot forge its address by
sending an X-Forwarded-For of its own: the proxies it passes append to it. The ``Forwarded``
header (RFC 7239) is not read: the proxies in front of this one (nginx, Caddy, cloud load
balancers) send X-Forwarded-For.

Worked out only when a feature asks (limits per address, IP lists, chat logs), instead of a
middleware rewriting every request's scope, and then once per request: the answer is kept in the
ASGI scope for the next feature that asks.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from openai_forward.types import Scope

SCOPE_KEY = "openai_forward.client"  # where the scope keeps the address once worked out
TRUST_MEMO_SIZE = 4096  # hosts whose trust is remembered (parsing an address costs)


class ClientAddress:
    def __init__(self, trusted: Sequence[str]) -> None:
        self._any = "*" in trusted
        self._networks = tuple(ipaddress.ip_network(t, strict=False) for t in trusted if t != "*")
        self.is_trusted = functools.lru_cache(maxsize=TRUST_MEMO_SIZE)(self._is_trusted)

    def _is_trusted(self, host: str) -> bool:
        """Whether ``host`` is one of the proxies whose ``X-Forwarded-For`` is believed."""
        if self._any:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def __call__(self, scope: Scope) -> str:
        """The client's address: worked out on the first call for a request, then read from
        its scope."""
        found: str | None = scope.get(SCOPE_KEY)
        if found is None:
            found = scope[SCOPE_KEY] = self._resolve(scope)
        return found

    def _resolve(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.is_trusted(peer):
            return peer
        # Several X-Forwarded-For lines are one list, in order (RFC 9110, section 5.3).
        lines = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        if not lines:
            return peer
        hops = [h.strip() for h in b",".join(lines).decode("latin-1").split(",") if h.strip()]
        # Each trusted proxy appends the address it saw: walk back from the nearest one and stop
        # at the first address that is not a trusted proxy.
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer
