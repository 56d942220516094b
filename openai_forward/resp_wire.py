"""The Redis wire format (RESP2), pure: errors, URL parsing, command encoding, reply parsing.

No I/O here; :mod:`openai_forward.resp` runs it over an asyncio connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union
from urllib.parse import parse_qs, unquote, urlsplit

# A reply: simple strings and bulk strings as bytes, integers, nil (None), arrays of replies;
# an error inside an array stays a value (a top-level error is raised by the client).
Reply = Union[bytes, int, None, list["Reply"], "RedisReplyError"]
Arg = bytes | str | int | float


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisUnavailable(RedisError, ConnectionError):
    """Redis cannot be reached or did not answer in time: refused, reset, timed out, closed."""


class RedisReplyError(RedisError):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``)."""


class RedisProtocolError(RedisError):
    """Bytes that are not RESP2: the connection they came on cannot be trusted any more."""


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host and port
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0

    def __str__(self) -> str:
        """Where, for messages: never the credentials."""
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_url(url: str) -> Address:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
    ``unix://[[user]:password@]/path?db=N``; ``?db=N`` works with every scheme."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss:// or unix://"
        )
    query = parse_qs(parts.query)
    db_text = query["db"][0] if "db" in query else ""
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        return Address(
            path=unquote(parts.path), username=username, password=password, db=_db(db_text)
        )
    path = parts.path.strip("/")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the port of a Redis URL must be a number") from None
    return Address(
        host=parts.hostname or "127.0.0.1",
        port=port,
        tls=parts.scheme == "rediss",
        username=username,
        password=password,
        db=_db(db_text or path),
    )


def _db(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"the database of a Redis URL must be a number, not {text!r}")
    return int(text)


def handshake(address: Address) -> list[bytes]:
    """The commands that make a fresh connection ready: AUTH and SELECT, as needed."""
    commands = []
    if address.password is not None:
        user = [address.username] if address.username else []
        commands.append(encode(("AUTH", *user, address.password)))
    if address.db:
        commands.append(encode(("SELECT", address.db)))
    return commands


def encode(args: tuple[Arg, ...] | list[Arg]) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):  # before int: True is an int, and never meant as "1" here
            raise TypeError("a bool is not a Redis argument")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()  # shortest exact form, as Redis and Lua parse it
        else:
            raise TypeError(f"a {type(arg).__name__} is not a Redis argument")
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


class _Incomplete:
    pass


INCOMPLETE = _Incomplete()  # the reply has not fully arrived yet


class Parser:
    """Replies out of a byte stream cut anywhere: :meth:`feed` what arrived, get whole replies.

    A reply that is cut is parsed again from its start when more arrives; replies are small
    except cached bodies, which are single bulk strings whose length is checked before any copy.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()  # received, not parsed yet (the start of a cut reply)

    def feed(self, data: bytes) -> list[Reply]:
        buffer = self.buffer
        buffer += data
        replies = []
        pos = 0
        while pos < len(buffer):
            reply, end = _parse(buffer, pos)
            if reply is INCOMPLETE:
                break
            replies.append(reply)
            pos = end
        del buffer[:pos]
        return replies  # type: ignore[return-value]


def _parse(buf: bytearray, pos: int) -> tuple[Reply | _Incomplete, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return INCOMPLETE, pos
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == 0x24:  # $ bulk string
        size = _int(line)
        if size < 0:
            return None, after
        stop = after + size
        if len(buf) < stop + 2:
            return INCOMPLETE, pos
        if buf[stop : stop + 2] != b"\r\n":
            raise RedisProtocolError("a bulk string does not end where its length says")
        return bytes(buf[after:stop]), stop + 2
    if kind == 0x3A:  # : integer
        return _int(line), after
    if kind == 0x2B:  # + simple string
        return line, after
    if kind == 0x2D:  # - error
        return RedisReplyError(line.decode("utf-8", "replace")), after
    if kind == 0x2A:  # * array
        count = _int(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            item, after = _parse(buf, after)
            if item is INCOMPLETE:
                return INCOMPLETE, pos
            items.append(item)  # type: ignore[arg-type]
        return items, after
    raise RedisProtocolError(f"unknown RESP2 reply type {chr(kind)!r}")


def _int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RedisProtocolError(f"not a number in a reply: {line[:20]!r}") from None
