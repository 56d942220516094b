"""The road every proxied request walks, one ASGI app per target:

route -> auth (keys) -> rate limit -> body -> cache -> upstream -> relay (pacing) -> client
                                                               \\-> chat log (off-path)

Every request ends in one place, :meth:`Forwarder.__call__`, which reports its
:class:`~openai_forward.outcome.Outcome` to the reporters.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from openai_forward.auth import Credentials, KeyMask, KeyResolver
from openai_forward.body import BodyTooLarge, ClientGone, StreamedBody, read_body
from openai_forward.cache import ResponseCache, Ticket
from openai_forward.chatlog import ChatLog
from openai_forward.clientaddr import ClientAddress
from openai_forward.cors import Cors
from openai_forward.errors import ProxyError, send_error
from openai_forward.exchange import CLIENT_LEFT, Call, CallKind, Observer, call_kind
from openai_forward.headers import RequestHead, read_request_head
from openai_forward.outcome import Outcome, Reporter, report
from openai_forward.paths import is_safe_rest, match_prefix
from openai_forward.ratelimit import RequestLimiter
from openai_forward.ratelimit.rules import canonical_route
from openai_forward.relay import ending_reason, relay
from openai_forward.settings import Settings, Target
from openai_forward.types import CUT, HANG_UP, HangUpHook, Message, Receive, Scope, Send
from openai_forward.upstream import Response, Upstream, UpstreamBroken
from openai_forward.websocket import key_from_protocols, refuse, relay_websocket

logger = logging.getLogger("openai_forward")

# The scope key under which the gateway passes the path below the target's prefix.
REST = "openai_forward.rest"


class HangUpWatch:
    """Cancels the request's task when the client hangs up while the proxy waits on or relays
    the upstream's answer, so the upstream request is aborted at once.

    The server's ``send`` does not fail after a hang-up (uvicorn's is silent then). The proxy's
    own server protocol calls back when the connection is lost (the scope's ``HANG_UP``);
    under another server, a task waits on ``receive()``, which no one else calls once the body
    is in, for ``http.disconnect``. The watch starts when the request body has been read whole.
    """

    __slots__ = ("_hook", "_receive", "_started", "_stopped", "_task", "_watcher", "gone")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.gone = False
        self._started = self._stopped = False
        self._hook: HangUpHook | None = scope.get(HANG_UP)
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Future[Message] | None = None

    def start(self) -> None:
        if self._started or self._stopped:
            return
        self._started = True
        if self._hook is not None:
            self._hook(self._hung_up)
            return
        try:
            # ensure_future: ``receive`` need only return an awaitable
            self._watcher = asyncio.ensure_future(self._receive())
        except Exception:  # the request goes on, unwatched
            logger.exception("Cannot watch a request for a client hang-up")
            self._stopped = True
            return
        self._watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Future[Message]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result()["type"] == "http.disconnect":
            self._hung_up()

    def _hung_up(self) -> None:
        if self._stopped or self._task is None:
            return
        self.gone = True
        # the message tells observers why (a shutdown's cancellation has another)
        self._task.cancel(CLIENT_LEFT)

    def stop(self) -> None:
        self._stopped = True
        if self._hook is not None and self._started:
            self._hook(None)
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


@dataclass(frozen=True)
class Features:
    """The optional steps of the road, shared by all forwarders (None: switched off)."""

    limiter: RequestLimiter | None = None
    cache: ResponseCache | None = None
    chatlog: ChatLog | None = None
    pacing: Mapping[str, float] = field(default_factory=dict)  # route -> seconds between events
    client_address: ClientAddress = field(default_factory=lambda: ClientAddress(("127.0.0.1",)))
    reporters: Sequence[Reporter] = ()  # told of every finished request


class Forwarder:
    """An ASGI app that forwards everything under one target's prefix to its base URL.

    The gateway passes the path below the prefix in ``scope["openai_forward.rest"]``; without
    it (the forwarder mounted on its own) the prefix is matched here.
    """

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
            max_connections=settings.upstream_max_connections,
        )
        self._cors = Cors(settings.cors_allow_origins)
        # Real keys quoted back by an upstream are masked before the answer is relayed.
        self._mask = KeyMask(settings.api_keys) if self._openai else None
        self._max_body = settings.max_body_size
        self._limiter = features.limiter
        self._client = features.client_address
        self._pacing = dict(features.pacing)
        self._reporters = tuple(features.reporters)
        self._prefix = target.prefix.encode()
        self._route_prefix = "" if target.prefix == "/" else target.prefix
        # Chat logs and the cache look into bodies of openai-type targets only.
        self._cache = features.cache if self._openai else None
        self._chatlog = features.chatlog if self._openai else None
        self._inspects = self._cache is not None or self._chatlog is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rest: bytes | None = scope.get(REST)
        if rest is None:
            rest = match_prefix(scope.get("raw_path") or scope["path"].encode(), self._prefix)
            if rest is None:
                await send_error(send, 404, "Unknown route")
                return
        route = self._route_prefix + rest.decode("latin-1") if rest else self.target.prefix
        outcome = Outcome(scope.get("method", "GET"), route, self.target.prefix)
        kind = call_kind(route) if self._openai else None
        if kind is not None:
            outcome.kind = kind.name
        if scope["type"] == "websocket":
            try:
                await self._websocket(scope, receive, send, rest, outcome)
            finally:
                if self._reporters:
                    report(outcome, self._reporters)
            return
        watch = HangUpWatch(scope, receive)
        try:
            await self._forward(
                scope,
                receive,
                outcome.counting(send) if self._reporters else send,
                rest,
                outcome,
                watch,
                kind,
            )
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            watch.stop()
            outcome.client_left = watch.gone or outcome.client_left
            if self._reporters:
                report(outcome, self._reporters)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rest: bytes,
        outcome: Outcome,
        watch: HangUpWatch,
        kind: CallKind | None,
    ) -> None:
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

        if self._limiter is not None:
            user = creds.user or self._client(scope)
            refusal = await self._limiter.check(user, outcome.route)
            if refusal is not None:
                await send_error(send, refusal.status, refusal.message, [*refusal.headers, *cors])
                return

        try:
            body = await read_body(receive, self._max_body)
        except ClientGone:
            outcome.client_left = True
            return
        except BodyTooLarge as exc:
            await send_error(send, 413, str(exc), cors)
            return
        if isinstance(body, StreamedBody):
            body.length = head.content_length
            body.on_complete = watch.start
        else:
            watch.start()

        observers: list[Observer] = []
        ticket: Ticket | None = None
        extra = cors  # headers added to the relayed response
        if (
            kind is not None
            and self._inspects
            and scope["method"] == "POST"
            and isinstance(body, bytes)
        ):
            call = self._call(scope, kind, outcome, body, creds)
            if call is not None:
                # A feature that cannot take a request (a body nested past what its encoder
                # goes, say) is skipped for it: the request still goes upstream.
                logged: Observer | None = None
                if self._chatlog is not None:
                    try:
                        logged = self._chatlog.request(call)
                    except Exception as exc:
                        _skipped("chat log", outcome, exc)
                if self._cache is not None:
                    try:
                        ticket = await self._cache.begin(call)
                    except Exception as exc:
                        _skipped("cache", outcome, exc)
                    if ticket is not None and ticket.answer is not None:
                        outcome.cache = "HIT"
                        await ticket.replay(send, cors, call.stream, [logged] if logged else [])
                        return
                    if ticket is not None:
                        outcome.cache = "MISS"
                        observers.append(ticket)
                        extra = [*cors, *ticket.headers]
                if logged is not None:
                    # After the cache's ticket, which closes first: the chat log then reads the
                    # answer the ticket assembled from a stream (``call.assembled``), if any.
                    observers.append(logged)
                body = call.body

        try:
            await self._exchange(scope, send, rest, head, body, creds, outcome, extra, observers)
        finally:
            if ticket is not None:
                ticket.release()

    async def _exchange(
        self,
        scope: Scope,
        send: Send,
        rest: bytes,
        head: RequestHead,
        body: bytes | StreamedBody,
        creds: Credentials,
        outcome: Outcome,
        extra: list[tuple[bytes, bytes]],
        observers: list[Observer],
    ) -> None:
        """Send the request upstream and relay the answer; every failure has its answer here."""
        url = self.upstream.url(rest, scope["query_string"])
        response: Response | None = None
        ended: BaseException | None = None  # what ended it, for observers when no response came
        try:
            response = await self.upstream.send(
                scope["method"], url, head.upstream, body, creds, outcome
            )
            await relay(
                send,
                response,
                extra,
                interval=self._interval(outcome.route) if self._pacing else None,
                observers=observers,
                mask=self._mask,
            )
        except ProxyError as exc:
            ended = exc
            await send_error(send, exc.status, exc.message, extra)
        except BodyTooLarge as exc:  # a streamed body that outgrew the limit (never observed)
            await send_error(send, 413, str(exc), extra)
        except ClientGone as exc:  # during a streamed body
            ended = exc
            outcome.client_left = True
        except asyncio.CancelledError as exc:  # the client left, or a shutdown
            ended = exc
            raise
        except UpstreamBroken as exc:
            # Returning without finishing the body makes the server close the connection: the
            # client sees a cut response, never a made-up ending. (The mark spares the log a
            # second line from the server about it.)
            logger.warning("Upstream broke off mid-response: %s", exc)
            scope[CUT] = True
        except Exception as exc:
            # A defect of ours: logged in full here, and the client still gets an answer in
            # OpenAI's shape if nothing was sent yet.
            ended = exc
            logger.exception("Failed to forward %s %s", scope["method"], outcome.route)
            if response is None:
                await send_error(send, 502, "The proxy failed to forward the request", extra)
        finally:
            if response is None:
                reason = None if ended is None else ending_reason(ended)
                for observer in observers:
                    observer.close(False, reason)
            else:
                response.release()

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, rest: bytes, outcome: Outcome
    ) -> None:
        """An upgrade passes the same checks as a request (one hit of the limit), then its
        frames are relayed (:mod:`openai_forward.websocket`)."""
        if not is_safe_rest(rest):
            await refuse(scope, receive, send, 400, "Invalid request path")
            return
        head = read_request_head(scope["headers"], self._openai, websocket=True)
        creds = self._keys.resolve(head.authorization or key_from_protocols(scope))
        if self._limiter is not None:
            user = creds.user or self._client(scope)
            refusal = await self._limiter.check(user, outcome.route)
            if refusal is not None:
                outcome.status = refusal.status
                await refuse(scope, receive, send, refusal.status, refusal.message)
                return
        await relay_websocket(
            scope, receive, send, self.upstream, rest, head.upstream, creds, outcome
        )

    def _interval(self, route: str) -> float | None:
        interval = self._pacing.get(route)
        return self._pacing.get(canonical_route(route)) if interval is None else interval

    def _call(
        self, scope: Scope, kind: CallKind, outcome: Outcome, body: bytes, creds: Credentials
    ) -> Call | None:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(payload, dict):
            return None
        if _has_long_number(body) and not _read_exactly(body, payload):
            return None  # the features would not see what the client sent: they step aside
        # Only the chat log records the client's address.
        client = self._client(scope) if self._chatlog is not None else ""
        return Call(
            self.target,
            kind,
            outcome.route,
            payload,
            body,
            client,
            creds.user,
            query=scope["query_string"],
        )


# orjson reads an integer beyond 64 bits as a float: re-serialized (without the cache's field),
# hashed into a cache key or logged, such a body would not say what the client sent. A body
# with a run of 19 digits is compared with Python's exact reading. The run is found by mapping
# every digit to "0" and every other byte to " ": a megabyte in 0.7 ms, a regex took 10.
_DIGIT_OR_NOT = bytes(ord("0") if ord("0") <= i <= ord("9") else ord(" ") for i in range(256))
_LONG_RUN = b"0" * 19


def _has_long_number(body: bytes) -> bool:
    return _LONG_RUN in body.translate(_DIGIT_OR_NOT)


def _read_exactly(body: bytes, payload: dict[str, object]) -> bool:
    try:
        return bool(json.loads(body) == payload)
    except (ValueError, RecursionError):
        return False


def _skipped(feature: str, outcome: Outcome, exc: Exception) -> None:
    logger.warning(
        "The %s skipped %s %s (%s: %s); it goes upstream as it is",
        feature,
        outcome.method,
        outcome.route,
        type(exc).__name__,
        str(exc)[:200],
    )
