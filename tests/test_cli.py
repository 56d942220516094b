"""``aifd`` as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

AIFD = [sys.executable, "-m", "openai_forward"]


def run_aifd(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 20):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))}
    full_env.update(env or {})
    return subprocess.run(
        AIFD + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "dotenv, fragment",
    [
        ("TIMEOUT=abc\n", "TIMEOUT='abc': expected a number of seconds"),
        ('REQ_RATE_LIMIT={"/v1/chat/completions": "lots"}\n', "REQ_RATE_LIMIT='lots'"),
        ("OPENAI_BASE_URL=api.openai.com\n", "OPENAI_BASE_URL='api.openai.com'"),
        ("CACHE_BACKEND=mongo\n", "CACHE_BACKEND='MONGO'"),
    ],
)
def test_bad_dotenv_exits_2_with_one_line(tmp_path: Path, dotenv: str, fragment: str):
    (tmp_path / ".env").write_text(dotenv)
    result = run_aifd(["run", "--port", "1"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_run_help_lists_options(tmp_path: Path):
    result = run_aifd(["run", "--help"], tmp_path, env={"PAGER": "cat"})
    text = result.stdout + result.stderr
    for option in ("--port", "--workers", "--host"):
        assert option in text


def test_two_workers_print_banner_once_and_serve(tmp_path: Path):
    port = free_port()
    (tmp_path / ".env").write_text(
        "OPENAI_BASE_URL=http://127.0.0.1:9\nOPENAI_API_KEY=sk-top-secret\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))}
    env["COLUMNS"] = "200"
    process = subprocess.Popen(
        [*AIFD, "run", "--port", str(port), "--host", "127.0.0.1", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        healthy = False
        while time.monotonic() < deadline and not healthy:
            try:
                healthy = (
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                )
            except httpx.HTTPError:
                time.sleep(0.2)
        assert healthy
        # the dead upstream at :9 answers 502 through either worker
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=10)
        assert r.status_code == 502
        assert "sk-top-secret" not in r.text
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    assert output.count("base url") == 1, output
    assert "open mode" in output
    assert "sk-top-secret" not in output
