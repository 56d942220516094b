"""Helpers shared by several test files: a free port and a redis-server of a test's own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_redis_server() -> None:
    """Skip without ``redis-server``; fail instead when OPENAI_FORWARD_REQUIRE_REDIS=1 (CI)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("OPENAI_FORWARD_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed and OPENAI_FORWARD_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed")


class RedisProcess:
    """A redis-server on 127.0.0.1 without persistence, that a test may stop, kill, freeze and
    start again: always on the same port, so that clients find it again."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra  # more options, such as --requirepass or --unixsocket
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        """Start it and wait until it answers PING (with NOAUTH when it wants a password)."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: gone at once, also when frozen."""
        self._end(signal.SIGKILL)

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _end(self, signum: int) -> None:
        if self.process is not None:
            self.process.send_signal(signum)
            self.process.wait(10)
            self.process = None
