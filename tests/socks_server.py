"""A SOCKS5 server for tests (RFC 1928, and RFC 1929's user/password): CONNECT only, IPv4,
IPv6 and domain-name addresses. It records each CONNECT it is asked for."""

from __future__ import annotations

import asyncio
import socket
import struct

from tests.wire import LocalServer, pipe

NO_AUTH, USER_PASSWORD, NO_METHOD = 0x00, 0x02, 0xFF
CONNECT = 0x01
SUCCEEDED, REFUSED, COMMAND_NOT_SUPPORTED = 0x00, 0x05, 0x07


class Socks5Server(LocalServer):
    """With ``credentials``, only that user and password get in; without, anyone does.
    ``connects`` gets (user or None, host as sent, port) for each CONNECT."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.credentials = credentials
        self.connects: list[tuple[str | None, str, int]] = []
        self.refused_logins = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        method = USER_PASSWORD if self.credentials else NO_AUTH
        if version != 5 or method not in methods:
            writer.write(bytes([5, NO_METHOD]))
            return
        writer.write(bytes([5, method]))
        user = None
        if self.credentials is not None:
            _, size = await reader.readexactly(2)
            user = (await reader.readexactly(size)).decode()
            (size,) = await reader.readexactly(1)
            password = (await reader.readexactly(size)).decode()
            if (user, password) != self.credentials:
                self.refused_logins += 1
                writer.write(b"\x01\x01")
                return
            writer.write(b"\x01\x00")
        _, command, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif kind == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        else:
            (size,) = await reader.readexactly(1)
            host = (await reader.readexactly(size)).decode()
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if command != CONNECT:
            writer.write(self._reply(COMMAND_NOT_SUPPORTED))
            return
        self.connects.append((user, host, port))
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(self._reply(REFUSED))
            return
        writer.write(self._reply(SUCCEEDED))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    @staticmethod
    def _reply(status: int) -> bytes:
        return bytes([5, status, 0, 1]) + bytes(6)  # bound to 0.0.0.0:0: nobody looks

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"
