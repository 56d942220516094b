"""The road every proxied request walks (one raw ASGI forwarder per target):

route -> auth (keys) -> rate limit -> body -> cache -> upstream -> relay (pacing) -> client
                                                               \\-> chat log (off-path)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from openai_forward.auth import KeyResolver
from openai_forward.body import BodyTooLarge, ClientGone, read_body
from openai_forward.cache import ResponseCache, Ticket
from openai_forward.chatlog import ChatLog
from openai_forward.clientaddr import ClientAddress
from openai_forward.cors import Cors
from openai_forward.errors import ProxyError, send_error
from openai_forward.exchange import Call, CallKind, Observer, call_kind
from openai_forward.h1 import Response
from openai_forward.headers import read_request_head
from openai_forward.paths import is_safe_rest
from openai_forward.ratelimit import RequestLimiter
from openai_forward.ratelimit.rules import canonical_route
from openai_forward.relay import relay
from openai_forward.settings import Settings, Target
from openai_forward.types import Message, Receive, Scope, Send
from openai_forward.upstream import Upstream, UpstreamBroken

logger = logging.getLogger("openai_forward")


_UNKNOWN: Any = object()
_KINDS_MEMO = 1024  # distinct paths whose call kind is remembered

# Requests answered faster than this never pay for a watcher task (most of them, under load);
# a client that hangs up is noticed at most this late.
WATCH_AFTER = 0.1


class DisconnectGuard:
    """Cancels the request's task when the client hangs up, so the upstream request is aborted
    (uvicorn's ``send`` is silent after a disconnect).

    The watcher task starts only once the request has run for one to two :data:`WATCH_AFTER`
    periods (see :class:`Sweep`): a task per request costs more CPU than the rest of the
    forwarding logic. It is never cancelled: once the response is complete the server answers
    its ``receive()`` with ``http.disconnect`` by itself, and ``stop()`` has made that a no-op.
    """

    __slots__ = ("_receive", "_stopped", "_sweep", "_task", "gone")

    def __init__(self, receive: Receive, sweep: Sweep) -> None:
        self.gone = False
        self._stopped = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._sweep = sweep
        sweep.add(self)

    def _watch(self) -> None:
        # ensure_future: ``receive`` need only return an awaitable (uvicorn's is a coroutine)
        watcher: asyncio.Future[Message] = asyncio.ensure_future(self._receive())
        watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Future[Message]) -> None:
        if self._stopped or watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result()["type"] == "http.disconnect":
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        self._stopped = True
        self._sweep.discard(self)


class Sweep:
    """One timer for all guards of a forwarder, instead of one per request (a timer made and
    cancelled per request cost about 4 µs). Every :data:`WATCH_AFTER` seconds it starts the
    watchers of the guards that were already there at the previous tick."""

    __slots__ = ("_handle", "_old", "_young")

    def __init__(self) -> None:
        self._young: dict[DisconnectGuard, None] = {}
        self._old: dict[DisconnectGuard, None] = {}
        self._handle: asyncio.TimerHandle | None = None

    def add(self, guard: DisconnectGuard) -> None:
        self._young[guard] = None
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick)

    def discard(self, guard: DisconnectGuard) -> None:
        if guard in self._young:
            del self._young[guard]
        else:
            self._old.pop(guard, None)

    def _tick(self) -> None:
        due, self._old, self._young = self._old, self._young, {}
        self._handle = None
        for guard in due:
            try:
                guard._watch()
            except Exception:  # one request's receive must not stop the watch of the others
                logger.exception("Cannot watch a request for a client hang-up")
        if self._old and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick)


@dataclass(frozen=True)
class Features:
    """The optional steps of the road, shared by all forwarders (None: switched off)."""

    limiter: RequestLimiter | None = None
    cache: ResponseCache | None = None
    chatlog: ChatLog | None = None
    pacing: Mapping[str, float] = field(default_factory=dict)  # route -> seconds between events
    client_address: ClientAddress = field(default_factory=lambda: ClientAddress(("127.0.0.1",)))


class Forwarder:
    """Forwards everything under one target's prefix to its base URL."""

    def __init__(self, target: Target, settings: Settings, features: Features) -> None:
        self.target = target
        self._openai = target.kind == "openai"
        self._keys = KeyResolver(
            settings.api_keys if self._openai else (),
            settings.forward_keys if self._openai else (),
        )
        self.upstream = Upstream(
            target.base_url,
            connect_timeout=settings.timeout,
            read_timeout=settings.read_timeout,
            max_retries=settings.max_retries,
            pool=self._keys.pool,
            proxy=settings.proxy,
        )
        self._cors = Cors(settings.cors_allow_origins)
        self._max_body = settings.max_body_size
        self._limiter = features.limiter
        self._client = features.client_address
        self._pacing = dict(features.pacing)
        self._prefix = "" if target.prefix == "/" else target.prefix
        # Chat logs and the cache look into bodies of openai-type targets only.
        self._cache = features.cache if self._openai else None
        self._chatlog = features.chatlog if self._openai else None
        self._inspects = self._cache is not None or self._chatlog is not None
        self._sweep = Sweep()
        self._kinds: dict[bytes, CallKind | None] = {}  # path -> call kind, remembered

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rest: bytes) -> None:
        if not is_safe_rest(rest):
            await send_error(send, 400, "Invalid request path")
            return
        try:
            head = read_request_head(scope["headers"], self._openai)
        except ValueError:
            await send_error(send, 400, "Invalid Content-Length header")
            return
        cors: list[tuple[bytes, bytes]] = []
        if head.origin is not None:
            if Cors.is_preflight(scope):
                await self._cors.preflight(scope, send, head.origin)
                return
            cors = self._cors.response_headers(head.origin)
        if head.content_length is not None and head.content_length > self._max_body:
            await send_error(
                send, 413, f"Request body is larger than the limit of {self._max_body} bytes", cors
            )
            return
        creds = self._keys.resolve(head.authorization)
        route = self._prefix + rest.decode("latin-1") if rest else self.target.prefix

        client: str | None = None
        if self._limiter is not None:
            user = creds.user or (client := self._client.of(scope, head.forwarded_for))
            refusal = await self._limiter.check(user, route)
            if refusal is not None:
                await send_error(send, refusal.status, refusal.message, [*refusal.headers, *cors])
                return

        try:
            body = await read_body(receive, self._max_body)
        except ClientGone:
            return
        except BodyTooLarge as exc:
            await send_error(send, 413, str(exc), cors)
            return

        observers: list[Observer] = []
        ticket: Ticket | None = None
        extra = cors  # headers added to the relayed response
        if self._inspects and scope["method"] == "POST" and isinstance(body, bytes):
            if client is None and self._chatlog is not None:  # (only the chat log needs it)
                client = self._client.of(scope, head.forwarded_for)
            call = self._call(scope, rest, route, body, creds.user, client or "")
            if call is not None:
                if self._chatlog is not None:
                    observers.append(self._chatlog.request(call))
                if self._cache is not None:
                    ticket = await self._cache.begin(call)
                    if ticket is not None and ticket.answer is not None:
                        await ticket.replay(send, cors, call.stream, observers)
                        return
                    if ticket is not None:
                        observers.append(ticket)
                        extra = [*cors, *ticket.headers]
                body = call.body

        target = self.upstream.target(rest, scope["query_string"])
        guard = DisconnectGuard(receive, self._sweep) if isinstance(body, bytes) else None
        response: Response | None = None
        started = False
        try:
            response = await self.upstream.send(scope["method"], target, head.upstream, body, creds)
            started = True
            await relay(
                send,
                self.upstream,
                response,
                extra,
                interval=self._interval(route) if self._pacing else None,
                observers=observers,
            )
        except ProxyError as exc:
            if not started:
                await send_error(send, exc.status, exc.message, extra)
        except UpstreamBroken as exc:
            # Returning without finishing the body makes the server close the connection: the
            # client sees a cut response, never a made-up ending.
            logger.warning("Upstream broke off mid-response: %s", exc)
        except (ClientGone, BodyTooLarge):
            pass
        except asyncio.CancelledError:
            if guard is None or not guard.gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except Exception:
            # A defect of ours: logged in full here, and the client still gets the §10 shape.
            logger.exception("Failed to forward %s %s", scope["method"], route)
            if not started:
                await send_error(send, 502, "The proxy failed to forward the request", extra)
        finally:
            if guard is not None:
                guard.stop()
            if ticket is not None:
                ticket.release()
            if not started:
                for observer in observers:
                    observer.close(False)
            if response is not None:
                response.release()

    def _interval(self, route: str) -> float | None:
        interval = self._pacing.get(route)
        return self._pacing.get(canonical_route(route)) if interval is None else interval

    def _call(
        self,
        scope: Scope,
        rest: bytes,
        route: str,
        body: bytes,
        user: str | None,
        client: str,
    ) -> Call | None:
        kind = self._kinds.get(rest, _UNKNOWN)
        if kind is _UNKNOWN:
            kind = call_kind(rest.decode("latin-1"))
            if len(self._kinds) >= _KINDS_MEMO:
                self._kinds.clear()
            self._kinds[rest] = kind
        if kind is None:
            return None
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(payload, dict):
            return None
        query = scope["query_string"]
        return Call(self.target, kind, route, payload, body, client, user, query=query)
