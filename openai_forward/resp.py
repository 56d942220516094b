"""A small asyncio Redis client: one pipelined connection, replies matched in order.

Why not ``redis.asyncio``: it costs 200-300 µs of CPU per command here (pool, retry and
response-callback layers), a raw protocol about 25 µs, and the limiter and the cache pay it on
every request. This client does only what they need:

- one connection per client, opened on first use (one attempt at a time however many commands
  wait for it) and again on the first command after it was lost;
- commands written back to back without waiting; each one's future waits in a FIFO for its reply;
- one timeout for every command: a command unanswered in time closes the connection and fails
  everything pending on it (a late reply could otherwise be matched to the wrong command);
- :class:`Script`: ``EVALSHA`` with ``EVAL`` when the server does not know the script yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

from openai_forward.resp_wire import (
    Address,
    Arg,
    Parser,
    RedisError,
    RedisProtocolError,
    RedisReplyError,
    RedisUnavailable,
    Reply,
    encode,
    handshake,
    parse_url,
)

# Commands held back for one write are joined up to this size, and written one by one past it.
HELD_JOIN_LIMIT = 64 * 1024

__all__ = ["RedisClient", "RedisError", "RedisReplyError", "RedisUnavailable", "Script"]


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._parser = Parser()
        # (future, deadline) in the order the commands were written; deadlines only grow,
        # so one timer for the oldest is enough
        self._pending: deque[tuple[asyncio.Future[Reply], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        # Commands held back until the end of this turn of the event loop, then written at once
        self._held: list[bytes] = []
        self.closed = False
        self.gone = self._loop.create_future()  # done once the transport is really closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes) -> asyncio.Future[Reply]:
        if self.closed or self._transport is None:
            raise RedisUnavailable("the connection to Redis is closed")
        future = self._loop.create_future()
        deadline = self._loop.time() + self._timeout
        if not self._pending:
            self._transport.write(payload)  # an idle connection: at once
        else:
            # Others are in flight: under load, many requests send a command in the same turn
            # of the loop, and one write for all of them saves a system call per command.
            if not self._held:
                self._loop.call_soon(self._write_held)
            self._held.append(payload)
        self._pending.append((future, deadline))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
        return future

    def _write_held(self) -> None:
        held, self._held = self._held, []
        if self._transport is None:  # the commands have failed with the connection
            return
        try:
            if len(held) == 1 or sum(map(len, held)) > HELD_JOIN_LIMIT:
                for payload in held:  # a large cached answer is not copied into a joined buffer
                    self._transport.write(payload)
            else:
                self._transport.write(b"".join(held))
        except Exception as exc:  # the boundary: fail the commands now, not at their deadline
            self.fail(RedisUnavailable(f"cannot write to Redis ({type(exc).__name__}: {exc})"))

    def data_received(self, data: bytes) -> None:
        pending = self._pending
        # The usual read: one integer reply to the one command waiting (a limit check), taken
        # without the parser.
        if (
            data[:1] == b":"
            and len(pending) == 1
            and data.find(b"\r\n") == len(data) - 2
            and not self._parser.buffer
        ):
            try:
                number = int(data[1:-2])
            except ValueError:
                pass  # the parser reports it
            else:
                future = pending.popleft()[0]
                if not future.done():
                    future.set_result(number)
                return
        try:
            replies = self._parser.feed(data)
        except RedisProtocolError as exc:
            self.fail(RedisUnavailable(f"Redis sent something unreadable ({exc})"))
            return
        for reply in replies:
            if not pending:
                self.fail(RedisUnavailable("Redis sent a reply nobody asked for"))
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled; the reply still had to be consumed
                continue
            if isinstance(reply, RedisReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending:
            return
        deadline = self._pending[0][1]
        if deadline <= self._loop.time():
            self.fail(RedisUnavailable(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {type(exc).__name__}: {exc}" if exc else ""
        self.fail(RedisUnavailable(f"Redis closed the connection{reason}"))
        if not self.gone.done():
            self.gone.set_result(None)

    def fail(self, error: RedisUnavailable) -> None:
        """Close the connection and fail every command still waiting on it."""
        self.closed = True
        self._held.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()  # at once: nothing more is read from or written to it
            self._transport = None
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(error)


class RedisClient:
    """One Redis at ``url`` for this event loop. Every failure to reach it or to hear back in
    ``timeout`` seconds raises :class:`RedisUnavailable`; an error reply :class:`RedisReplyError`.
    """

    def __init__(self, url: str, *, timeout: float = 1.0, connect_timeout: float = 1.0) -> None:
        self.address: Address = parse_url(url)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (a :data:`Reply`; typed ``Any`` because each
        command's caller knows which shape its command answers with)."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await connection.send(encode(args))

    def execute_encoded(self, payload: bytes) -> Awaitable[Any]:
        """:meth:`execute` for a command already encoded (hot paths pre-encode what is fixed).
        Once connected this is the reply's future itself: no coroutine per command."""
        connection = self._connection
        if connection is None or connection.closed:
            return self._execute_encoded_later(payload)
        return connection.send(payload)

    async def _execute_encoded_later(self, payload: bytes) -> Any:
        connection = await self._connect()
        return await connection.send(payload)

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RedisUnavailable("the Redis client is closed")
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._connecting is None:
            # one attempt for everyone waiting; shielded so a cancelled waiter does not end it
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:  # retrieved here: never "unseen"
            self._connection = task.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address
        connection: _Connection | None = None

        def factory() -> _Connection:
            nonlocal connection
            connection = _Connection(self._timeout)
            return connection

        try:
            async with asyncio.timeout(self._connect_timeout):
                if address.path is not None:
                    await loop.create_unix_connection(factory, address.path)
                else:
                    tls = ssl.create_default_context() if address.tls else None
                    await loop.create_connection(factory, address.host, address.port, ssl=tls)
                assert connection is not None
                # AUTH and SELECT pipelined; each raises RedisReplyError if refused
                for future in [connection.send(command) for command in handshake(address)]:
                    await future
        except (OSError, TimeoutError) as exc:
            if connection is not None:
                connection.fail(RedisUnavailable("connection abandoned"))
            detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise RedisUnavailable(f"cannot connect to Redis at {address} ({detail})") from None
        except BaseException:
            if connection is not None:
                connection.fail(RedisUnavailable("connection abandoned"))
            raise
        return connection

    async def close(self) -> None:
        """Fail whatever is pending and close the connection; the client is not used again."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await self._connecting
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.fail(RedisUnavailable("the Redis client was closed"))
            try:
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(connection.gone)
            except TimeoutError:
                pass


class Script:
    """A Lua script run by its SHA1; sent in full only when the server does not know it."""

    def __init__(self, client: RedisClient, source: str | bytes) -> None:
        self._client = client
        self._source = source.encode() if isinstance(source, str) else source
        self.sha = hashlib.sha1(self._source).hexdigest()

    async def __call__(self, keys: Sequence[Arg], args: Sequence[Arg] = ()) -> Any:
        execute = self._client.execute
        try:
            return await execute(b"EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # EVAL also loads it, so the next EVALSHA finds it
        return await execute(b"EVAL", self._source, len(keys), *keys, *args)
