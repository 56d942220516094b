"""The cache in ``aifd run`` processes: start-up errors, and LMDB after a ``kill -9``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import lmdb
import plyvel
import pytest

from tests import fake_openai
from tests.support import free_port

AIFD = [sys.executable, "-m", "openai_forward"]
CHAT = "/v1/chat/completions"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "backend, driver, extra",
    [
        ("LMDB", "lmdb", "lmdb"),
        ("LEVELDB", "plyvel", "leveldb"),
        ("ROCKSDB", "rocksdict", "rocksdb"),
    ],
)
def test_missing_driver_is_a_one_line_start_up_error(tmp_path: Path, backend, driver, extra):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / f"{driver}.py").write_text(f'raise ImportError("No module named {driver}")\n')
    root = "redis://127.0.0.1:6379" if backend == "REDIS" else str(tmp_path)
    env = _env(
        PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]),
        CACHE_CHAT_COMPLETION="true",
        CACHE_BACKEND=backend,
        CACHE_ROOT_PATH_OR_URL=root,
    )
    result = subprocess.run(
        [*AIFD, "run", "--port", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"CACHE_BACKEND='{backend}'" in lines[0]
    assert f"pip install 'openai-forward[{extra}]'" in lines[0]


def test_leveldb_folder_held_by_another_process_stops_start_up(tmp_path: Path):
    (tmp_path / "cache").mkdir()
    held = plyvel.DB(str(tmp_path / "cache" / "leveldb"), create_if_missing=True)
    try:
        env = _env(
            CACHE_CHAT_COMPLETION="true",
            CACHE_BACKEND="LEVELDB",
            CACHE_ROOT_PATH_OR_URL=str(tmp_path),
        )
        result = subprocess.run(
            [*AIFD, "run", "--port", "1"], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=20,
        )  # fmt: skip
    finally:
        held.close()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"aifd: CACHE_ROOT_PATH_OR_URL='{tmp_path}'")
    assert "lock" in lines[0].lower()


def _popen(port: int, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    with (folder / f"aifd-{port}.log").open("w") as log:
        return subprocess.Popen(
            [*AIFD, "run", "--port", str(port), "--host", "127.0.0.1"],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _start(tmp_path: Path, upstream_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = _env(
        OPENAI_BASE_URL=upstream_url,
        CACHE_CHAT_COMPLETION="true",
        CACHE_BACKEND="LMDB",
        CACHE_ROOT_PATH_OR_URL=str(tmp_path),
        DEFAULT_REQUEST_CACHING_VALUE="true",
    )
    process = _popen(port, tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                if (await client.get(url + "/healthz", timeout=1)).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    process.kill()
    raise RuntimeError("aifd did not start: " + (tmp_path / f"aifd-{port}.log").read_text())


def _ask(n: int) -> dict:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": f"question {n}"}]}


def _stored_entries(folder: Path) -> int:
    env = lmdb.open(str(folder), readonly=True, lock=True)
    try:
        return int(env.stat()["entries"])
    finally:
        env.close()


@pytest.mark.slow
async def test_lmdb_entries_survive_kill_9_during_a_burst_of_writes(upstream, tmp_path):
    fake_openai.install(upstream)
    process, url = await _start(tmp_path, upstream.url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for n in range(20):
                assert (await client.post(CHAT, json=_ask(n))).headers["x-cache"] == "MISS"
            deadline = time.monotonic() + 10
            while _stored_entries(tmp_path / "cache" / "lmdb") < 20:
                assert time.monotonic() < deadline, "the first 20 answers were not committed"
                await asyncio.sleep(0.05)

            # A burst of new answers, 16 at a time; the process is killed in the middle of it.
            answered = 0
            gate = asyncio.Semaphore(16)

            async def one(n: int) -> None:
                nonlocal answered
                async with gate:
                    try:
                        await client.post(CHAT, json=_ask(n))
                    except httpx.TransportError:
                        return
                    answered += 1
                    if answered == 60:
                        process.send_signal(signal.SIGKILL)

            await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(100, 400))), 60)
        assert process.wait(10) == -signal.SIGKILL
        assert 60 <= answered < 300
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    asked = len(upstream.requests)
    process, url = await _start(tmp_path, upstream.url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            before = [await client.post(CHAT, json=_ask(n)) for n in range(20)]
            assert [r.headers["x-cache"] for r in before] == ["HIT"] * 20
            assert [r.json()["choices"][0]["message"]["content"] for r in before] == [
                f"echo: question {n}" for n in range(20)
            ]
            assert len(upstream.requests) == asked  # answered from the store alone
            burst = [await client.post(CHAT, json=_ask(n)) for n in range(100, 160)]
            assert all(r.status_code == 200 for r in burst)
            # The store still takes writes after the crash.
            fresh = [(await client.post(CHAT, json=_ask(999))).headers["x-cache"] for _ in "ab"]
            assert fresh == ["MISS", "HIT"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
