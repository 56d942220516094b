"""Graceful shutdown of ``aifd run``: a real process, SIGTERM while streams are in flight.

With ``SHUTDOWN_TIMEOUT=3`` the server stops accepting at once, lets the streams in flight finish
(each ends with the upstream's ``data: [DONE]``), cuts a stream that would take longer than the
timeout without a ``[DONE]`` of its own, writes every finished answer to the chat log, and
exits 0. With ``--workers 2`` SIGTERM to the master stops every worker the same way.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import RecordingUpstream
from tests.deploy_helpers import (
    CHAT,
    Aifd,
    StreamResult,
    answer_text,
    chat_body,
    clean_environ,
    read_stream,
    streaming_chat,
)

SHUTDOWN_TIMEOUT = 3
STREAMS = 20
EVENTS = 20  # per stream, 0.075 s apart: about 1.5 s


def chat_records(log_folder: Path) -> list[dict]:
    path = log_folder / "openai" / "chat" / "chat.log"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def start_streams(
    client: httpx.AsyncClient, url: str, queries: list[str]
) -> list[asyncio.Task[StreamResult]]:
    """One stream per query, returned once every one of them has received its first bytes."""
    started = [asyncio.Event() for _ in queries]
    tasks = [
        asyncio.create_task(read_stream(client, f"{url}{CHAT}?{q}", chat_body(), event))
        for q, event in zip(queries, started, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
    return tasks


@pytest.fixture
async def chat_upstream(upstream: RecordingUpstream) -> RecordingUpstream:
    upstream.route(CHAT, streaming_chat)
    return upstream


@pytest.mark.slow
async def test_sigterm_lets_streams_in_flight_finish_and_exits_0(
    chat_upstream: RecordingUpstream, tmp_path: Path
):
    aifd = Aifd(
        tmp_path / "aifd",
        {
            "OPENAI_BASE_URL": chat_upstream.url,
            "LOG_CHAT": "true",
            "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        },
    )
    try:
        await aifd.wait_healthy()
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            short = f"events={EVENTS}&interval=0.075"
            long = "events=100&interval=0.075"  # 7.5 s: longer than the timeout
            tasks = await start_streams(client, aifd.url, [short] * STREAMS + [long])
            signalled = time.monotonic()
            aifd.signal(signal.SIGTERM)

            # It stops accepting at once.
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.TransportError):
                await client.get(f"{aifd.url}/healthz")

            results = await asyncio.gather(*tasks)
            status = await aifd.wait(SHUTDOWN_TIMEOUT + 10)
            took = time.monotonic() - signalled
    finally:
        aifd.kill_all()
    output = aifd.output

    finished, cut = results[:STREAMS], results[STREAMS]
    expected = answer_text(EVENTS)
    for result in finished:
        assert result.status == 200
        assert result.done, (result.cut, result.body[-200:], output)
        assert result.body.count(b'"chat.completion.chunk"') == EVENTS
    # The long stream is cut when the timeout is up: closed without the last chunk, and
    # without a [DONE] the upstream never sent.
    assert cut.status == 200
    assert not cut.done and b"[DONE]" not in cut.body, cut.body[-200:]
    assert cut.cut is not None
    assert b"w99 " not in cut.body

    # Every finished answer is in the chat log, written before the process ended.
    records = chat_records(tmp_path / "aifd" / "Log")
    answers = [r for r in records if "ip" not in r]
    complete = [r for r in answers if r.get("complete")]
    assert len(complete) == STREAMS, (len(answers), answers[-1:], output)
    assert all(r["assistant"] == expected for r in complete)
    # ... and the cut one, marked as such.
    assert len(answers) == STREAMS + 1
    assert next(r for r in answers if not r.get("complete"))["complete"] is False
    assert len([r for r in records if "ip" in r]) == STREAMS + 1

    assert took < SHUTDOWN_TIMEOUT + 3, f"{took:.1f} s from SIGTERM to exit"
    assert "Finished server process" in output  # the graceful shutdown ran to its end
    assert status == 0, f"exit status {status} (negative: killed by that signal)\n{output}"


# Run in the master only: prints each worker's exit status when uvicorn's supervisor has
# joined it (the workers are the master's children: nobody else can see how they ended).
WORKER_EXIT_PROBE = """\
import sys
from uvicorn.supervisors import multiprocess

_join = multiprocess.Process.join

def join(self):
    _join(self)
    sys.stderr.write(f"probe: worker {self.pid} exit status {self.exitcode}\\n")
    sys.stderr.flush()

multiprocess.Process.join = join
"""


def worker_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", output)]


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_workers_end_on_sigterm_to_the_master(
    chat_upstream: RecordingUpstream, tmp_path: Path
):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(WORKER_EXIT_PROBE)
    aifd = Aifd(
        tmp_path / "aifd",
        {"OPENAI_BASE_URL": chat_upstream.url, "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)},
        workers=2,
        environ=clean_environ(
            PYTHONPATH=os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")]))
        ),
    )
    try:
        await aifd.wait_healthy()
        await wait_for(lambda: len(worker_pids(aifd.output)) == 2, 20, "two workers")
        # A worker that dies is replaced, and its death logged.
        dead = worker_pids(aifd.output)[0]
        os.kill(dead, signal.SIGKILL)
        await wait_for(lambda: len(worker_pids(aifd.output)) == 3, 20, aifd.output)
        assert f"Child process [{dead}] died" in aifd.output
        workers = worker_pids(aifd.output)[1:]

        # Streams over fresh connections, spread over the workers by the kernel.
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            tasks = await start_streams(client, aifd.url, ["events=20&interval=0.075"] * 10)
            aifd.signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
        status = await aifd.wait(SHUTDOWN_TIMEOUT + 10)
    finally:
        aifd.kill_all()
    output = aifd.output
    assert all(r.done for r in results), [r.cut for r in results]
    assert output.count("Finished server process") == 2, output
    exits = dict(re.findall(r"^probe: worker (\d+) exit status (-?\d+)$", output, re.M))
    assert exits.get(str(dead)) == str(-signal.SIGKILL), output
    assert status == 0, f"master exit status {status}\n{output}"
    statuses = {pid: exits.get(str(pid)) for pid in workers}
    assert statuses == {pid: "0" for pid in workers}
