"""The soak run of benchmarks/soak.py, 3,000 requests: mixed calls with every feature on
(LOG_CHAT, the cache, Redis limits), 5 % client hang-ups, 1 % upstream resets and 1 % truncated
streams. No request without an answer, no invented [DONE], a chat-log record pair per call."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
async def test_three_thousand_mixed_requests_with_faults(redis_server, tmp_path: Path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), "--requests", "3000", "--concurrency", "16",
        "--redis", redis_server.url, "--report-every", "10",
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTRA_"))},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 240)
    output = stdout.decode()
    assert process.returncode == 0, output + stderr.decode()[-3000:]
    assert "requests without an answer: 0" in output
    assert "[DONE] the upstream never sent: 0" in output
    assert "chat-log request records: 3000, answer records: 3000, calls: 3000" in output
    assert output.rstrip().endswith("OK")
