"""Wiring: the FastAPI application for a :class:`Settings`.

``openai_forward.app:app`` is built from the environment and ``./.env`` when first looked up,
so ``uvicorn openai_forward.app:app`` serves what ``aifd run`` serves; :func:`create_app` builds
one for given settings (tests, embedding).

FastAPI owns the proxy's own routes (``/healthz``, and any route added to the app), the error
answers in OpenAI's shape and the lifespan that opens and closes the upstream sessions and the
features' storage. A request for any other path under a target's prefix goes straight to that
target's forwarder: no framework routing or middleware runs per forwarded request.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from openai_forward.cache import build_cache
from openai_forward.chatlog import build_chatlog
from openai_forward.clientaddr import ClientAddress
from openai_forward.errors import error_body, send_error
from openai_forward.exchange import Resource
from openai_forward.forward import REST, Features, Forwarder
from openai_forward.outcome import Reporter
from openai_forward.paths import match_prefix
from openai_forward.ratelimit import build_limiter, pacing_intervals
from openai_forward.settings import ConfigError, Settings
from openai_forward.types import Receive, Scope, Send
from openai_forward.websocket import refuse

HEALTHZ = "/healthz"
FORBIDDEN = "Your address is not allowed to use this service"


class ProxyApp(FastAPI):
    """FastAPI for the proxy's own routes; longest-prefix dispatch to the forwarders for the rest.

    A path that the app's route table serves is never forwarded, whatever the prefixes (a
    target at ``/`` cannot shadow ``/healthz``). The address lists apply to forwarded requests.
    """

    def __init__(self, settings: Settings, forwarders: Sequence[Forwarder], **options: Any):
        super().__init__(**options)
        self.settings = settings
        self.forwarders = list(forwarders)
        self._routes = sorted(
            ((f.target.prefix.encode(), f) for f in forwarders), key=lambda r: -len(r[0])
        )
        self._allow = settings.ip_whitelist
        self._deny = settings.ip_blacklist
        self._client_address = ClientAddress(settings.forwarded_allow_ips)
        self._local: tuple[int, frozenset[bytes]] = (-1, frozenset())

    def local_paths(self) -> frozenset[bytes]:
        """The exact paths of the app's own routes (taken again when routes were added)."""
        count, paths = self._local
        routes = self.router.routes
        if count != len(routes):
            paths = frozenset(
                p.encode() for r in routes if isinstance(p := getattr(r, "path", None), str)
            )
            self._local = (len(routes), paths)
        return paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: bytes = scope.get("raw_path") or scope["path"].encode()
            if path not in self.local_paths():
                for prefix, forwarder in self._routes:
                    rest = match_prefix(path, prefix)
                    if rest is not None:
                        if (self._allow or self._deny) and not self._address_allowed(scope):
                            await self._forbidden(scope, receive, send)
                            return
                        scope[REST] = rest
                        await forwarder(scope, receive, send)
                        return
        await super().__call__(scope, receive, send)

    @staticmethod
    async def _forbidden(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await refuse(scope, receive, send, 403, FORBIDDEN)
        else:
            await send_error(send, 403, FORBIDDEN)

    def _address_allowed(self, scope: Scope) -> bool:
        try:
            address = ipaddress.ip_address(self._client_address(scope))
        except ValueError:
            return not self._allow
        if any(address in net for net in self._deny):
            return False
        return not self._allow or any(address in net for net in self._allow)


def create_app(settings: Settings, *, reporters: Sequence[Reporter] = ()) -> ProxyApp:
    """The application for ``settings``. ``reporters`` are told of every finished forwarded
    request (see :mod:`openai_forward.outcome`)."""
    features = Features(
        limiter=build_limiter(settings),
        cache=build_cache(settings),
        chatlog=build_chatlog(settings),
        pacing=pacing_intervals(settings),
        client_address=ClientAddress(settings.forwarded_allow_ips),
        reporters=tuple(reporters),
    )
    forwarders = [Forwarder(target, settings, features) for target in settings.targets]
    resources: list[Resource] = [
        r for r in (features.limiter, features.cache, features.chatlog) if r is not None
    ]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for resource in resources:
                await resource.open()
                stack.push_async_callback(resource.close)
            for forwarder in forwarders:
                await forwarder.upstream.open()
                stack.push_async_callback(forwarder.upstream.close)
            yield

    docs = settings.api_docs
    app = ProxyApp(
        settings,
        forwarders,
        title="openai-forward",
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )

    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    app.add_api_route(HEALTHZ, healthz, methods=["GET"])
    app.add_api_route(HEALTHZ, healthz, methods=["HEAD"], include_in_schema=False)

    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _server_error)
    return app


def _json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        error_body(status, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "Unknown route" if exc.status_code == 404 else str(exc.detail)
    return _json_error(exc.status_code, message, exc.headers)


async def _invalid_request(_: Request, exc: Exception) -> Response:
    return _json_error(400, "Invalid request")


async def _server_error(_: Request, exc: Exception) -> Response:
    # starlette's ServerErrorMiddleware has logged the exception; the client sees no trace of it
    return _json_error(500, "The proxy failed to handle the request")


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use, from the environment and ./.env, and kept.
    if name == "app":
        try:
            settings = Settings.from_env()
        except ConfigError as exc:  # one line, as `aifd run` gives it, not a traceback
            print(f"openai-forward: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        built = globals()["app"] = create_app(settings)
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
