"""Wiring: the ASGI application for a :class:`Settings`.

Requests under a target's prefix go straight to that target's raw ASGI :class:`Forwarder`;
Starlette serves the rest (``/healthz``, 404s) and owns the lifespan that opens and closes the
upstream sessions and the features' storage. Per-request framework routing stays off the hot path.
(Starlette rather than FastAPI on top of it: two plain routes need no validation layer, and
FastAPI's import alone costs 15 MiB of resident memory per worker; see the README.)
"""

from __future__ import annotations

import gc
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from openai_forward.cache import build_cache
from openai_forward.chatlog import build_chatlog
from openai_forward.clientaddr import ClientAddress
from openai_forward.errors import error_body, send_error
from openai_forward.exchange import Resource
from openai_forward.forward import Features, Forwarder
from openai_forward.paths import match_prefix
from openai_forward.ratelimit import build_limiter, pacing_intervals
from openai_forward.settings import Settings
from openai_forward.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("openai_forward")


class Gateway:
    """The outermost ASGI app: address filter, longest-prefix dispatch, FastAPI for the rest."""

    def __init__(
        self,
        settings: Settings,
        forwarders: list[Forwarder],
        fallback: ASGIApp,
        client_address: ClientAddress,
    ) -> None:
        self.settings = settings
        self.forwarders = forwarders
        self._routes = sorted(
            ((f.target.prefix.encode(), f) for f in forwarders), key=lambda r: -len(r[0])
        )
        self._fallback = fallback
        self._allow = settings.ip_whitelist
        self._deny = settings.ip_blacklist
        self._client = client_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._fallback(scope, receive, send)
            return
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        if path == b"/healthz":
            await self._fallback(scope, receive, send)
            return
        if (self._allow or self._deny) and not self._address_allowed(scope):
            await send_error(send, 403, "Your address is not allowed to use this service")
            return
        for prefix, forwarder in self._routes:
            rest = match_prefix(path, prefix)
            if rest is not None:
                await forwarder(scope, receive, send, rest)
                return
        await self._fallback(scope, receive, send)

    def _address_allowed(self, scope: Scope) -> bool:
        try:
            address = ipaddress.ip_address(self._client(scope))
        except ValueError:
            address = None
        if address is None:
            return not self._allow
        if any(address in net for net in self._deny):
            return False
        return not self._allow or any(address in net for net in self._allow)


def create_app(settings: Settings) -> Gateway:
    features = Features(
        limiter=build_limiter(settings),
        cache=build_cache(settings),
        chatlog=build_chatlog(settings),
        pacing=pacing_intervals(settings),
        client_address=ClientAddress(settings.forwarded_allow_ips),
    )
    forwarders = [Forwarder(target, settings, features) for target in settings.targets]
    resources: list[Resource] = [
        r for r in (features.limiter, features.cache, features.chatlog) if r is not None
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for resource in resources:
                await resource.open()
                stack.push_async_callback(resource.close)
            for forwarder in forwarders:
                await forwarder.upstream.open()
                stack.push_async_callback(forwarder.upstream.close)
            stack.callback(settle_garbage_collector())
            yield

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "Unknown route" if exc.status_code == 404 else str(exc.detail)
        return Response(
            error_body(exc.status_code, message),
            status_code=exc.status_code,
            media_type="application/json",
        )

    site = Starlette(
        routes=[Route("/healthz", healthz, methods=["GET", "HEAD"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    return Gateway(settings, forwarders, site, features.client_address)


# Container objects allocated, net, before a young-generation collection (CPython's default is
# 700). A request allocates dozens (headers, the parsed body, records for the chat log), nearly all
# freed by reference counting, yet the default made the collector run every few requests: with the
# chat log on, it cost about 10 µs per request (measured with gc.callbacks), now under 1.
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> Callable[[], None]:
    """Once started: what exists now (modules, settings, pools) lives as long as the app, so it is
    moved out of the collector's sight (``gc.freeze``): full collections then walk only what
    requests leave behind, not the ~40,000 objects of the imported code. Returns the undoing,
    for the app's shutdown (the frozen objects could never be collected otherwise)."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])

    def undo() -> None:
        gc.unfreeze()
        gc.set_threshold(*thresholds)

    return undo


def app_from_env() -> Gateway:
    """Factory used by uvicorn workers: settings from the environment and ``./.env``."""
    return create_app(Settings.from_env())
