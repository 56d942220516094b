"""Helpers shared by several test files: a free port and a redis-server of a test's own (plain,
over TLS with a local CA, or in Sentinel mode)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
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
    start again: always on the same port, so that clients find it again.

    With ``tls`` it serves TLS only, with a certificate for 127.0.0.1 from a CA of its own
    (``ca_file``). With ``config`` (a file it may rewrite) it starts from that file: Sentinel
    mode needs one.
    """

    def __init__(
        self, directory: Path, *extra: str, tls: bool = False, config: Path | None = None
    ) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra  # more options, such as --requirepass or --unixsocket
        self.tls = tls
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        if tls:
            import trustme

            ca = trustme.CA()
            ca.cert_pem.write_to_path(self.ca_file)
            server = ca.issue_cert("127.0.0.1")
            server.private_key_pem.write_to_path(directory / "key.pem")
            server.cert_chain_pems[0].write_to_path(directory / "cert.pem")

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        command = ["redis-server", *([str(self.config)] if self.config else [])]
        if self.tls:
            d = self.directory
            command += ["--port", "0", "--tls-port", str(self.port),
                        "--tls-cert-file", str(d / "cert.pem"), "--tls-key-file", str(d / "key.pem"),
                        "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]  # fmt: skip
        else:
            command += ["--port", str(self.port)]
        return [*command, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), *self.extra]  # fmt: skip

    def _connect(self) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if not self.tls:
            return conn
        context = ssl.create_default_context(cafile=self.ca_file)
        return context.wrap_socket(conn, server_hostname="127.0.0.1")

    def start(self) -> RedisProcess:
        """Start it and wait until it answers PING (with NOAUTH when it wants a password)."""
        log = self.directory / "redis-server.log"
        with log.open("ab") as output:
            self.process = subprocess.Popen(self._command(), stdout=output, stderr=output)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with self._connect() as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        last = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError("redis-server did not start: " + " | ".join(last))

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
