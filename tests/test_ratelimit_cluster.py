"""Limits shared by every process: two ``aifd run --workers 2`` instances on two ports.

With Redis the four processes together admit exactly the configured number, also when 100
requests arrive at once over fresh connections. With ``memory://`` every process counts alone
and two instances admit far more, which shows that the burst does reach several processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RecordingUpstream
from tests.support import free_port

CHAT = "/v1/chat/completions"
AIFD_RUN = [sys.executable, "-m", "openai_forward", "run"]
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


class Instance:
    """``aifd run --workers N`` in a session of its own, so that it and its workers can be
    stopped together."""

    def __init__(self, directory: Path, env: dict[str, str], workers: int) -> None:
        directory.mkdir()
        self.port = free_port()
        self.log = directory / "aifd.log"
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))
        }
        full_env.update(env, COLUMNS="200")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    *AIFD_RUN,
                    "--workers",
                    str(workers),
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                ],
                cwd=directory,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_healthy(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output
            try:
                response = await client.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"aifd on port {self.port} did not start:\n{self.output}")

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        self.interrupt()
        try:
            self.process.wait(15)
            return
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # its session: the parent and workers
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


def stop_all(instances: list[Instance]) -> None:
    for instance in instances:  # all at once: their graceful shutdowns overlap
        instance.interrupt()
    for instance in instances:
        instance.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    stop_all(started)


async def burst(ports: list[int], n: int) -> list[int]:
    """``n`` requests at once, spread over ``ports``, each on a connection of its own."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"http://127.0.0.1:{ports[i % len(ports)]}{CHAT}", json=BODY)
                for i in range(n)
            )
        )
    return [r.status_code for r in responses]


@pytest.mark.redis
@pytest.mark.slow
async def test_two_instances_of_two_workers_share_the_limit(
    cluster: list[Instance], upstream: RecordingUpstream, redis_server, tmp_path: Path
):
    common = {"OPENAI_BASE_URL": upstream.url, "GLOBAL_RATE_LIMIT": "30/minute"}
    shared = {"REQ_RATE_LIMIT_BACKEND": redis_server.url, "REDIS_KEY_PREFIX": redis_server.prefix}
    alone = {"REQ_RATE_LIMIT_BACKEND": "memory://"}
    # All instances start at once. The memory:// pair has one worker each: it only has to show
    # that the burst reaches both ports, and the fewer processes the faster the test.
    for name, backend, workers in (
        ("redis-a", shared, 2),
        ("redis-b", shared, 2),
        ("mem-a", alone, 1),
        ("mem-b", alone, 1),
    ):
        cluster.append(Instance(tmp_path / name, {**common, **backend}, workers))
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + 60
        for instance in cluster:
            await instance.wait_healthy(client, deadline)
    redis_ports = [cluster[0].port, cluster[1].port]
    memory_ports = [cluster[2].port, cluster[3].port]

    statuses = await burst(redis_ports, 100)
    assert statuses.count(200) == 30
    assert statuses.count(429) == 70
    assert len(upstream.requests) == 30

    upstream.requests.clear()
    statuses = await burst(memory_ports, 100)
    # each instance gets 50 requests and counts alone: at least 30 + 30 pass
    assert statuses.count(200) >= 60
    assert statuses.count(200) + statuses.count(429) == 100
    assert len(upstream.requests) == statuses.count(200)

    stop_all(cluster)
    banner = cluster[0].output
    assert banner.count("Rate Limit configuration") == 1
    assert "each worker counts alone" not in banner
    assert "storage down" in banner
