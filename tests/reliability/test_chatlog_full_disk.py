"""The chat log on a full disk: a real small tmpfs that fills up, then gets space back. No line
is ever torn, the records after space returns are whole lines of their own, and every record
lost is counted and said exactly."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from openai_forward.chatlog.writer import LogWriter

DISK_SIZE = 256 * 1024
LOST_SO_FAR = re.compile(r"Chat log could not write .* \(no space left on device\); (\d+) record")
LOST_IN_ALL = re.compile(r"Chat log: (\d+) record\(s\) lost in all \((.*)\)")


class Lines(logging.Handler):
    """The messages of a logger and its children, from any thread."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Lines:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        self._logger.removeHandler(self)

    def matching(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        return [m for m in map(pattern.search, self.messages) if m]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, mounted for the test and unmounted after it."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command")
    point = tmp_path / "disk"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if mounted.returncode != 0:  # a container without CAP_SYS_ADMIN, say
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True, timeout=10).returncode:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=10)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of the disk's free space but ``leave`` bytes."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


def records_of(root: Path) -> list[dict]:
    """Every line of every log file under ``root``; each must be one whole JSON object."""
    records = []
    for path in sorted(root.rglob("*.log*")):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path} ends inside a line"
        for number, line in enumerate(data.splitlines(), 1):
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pytest.fail(f"{path}:{number} is torn: {line[:60]!r}...{line[-60:]!r}")
    return records


@pytest.fixture
def rollbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes the writer truncated a file back to (writes the disk took only in part)."""
    sizes: list[int] = []
    truncate = os.ftruncate

    def counting(fd: int, size: int) -> None:
        sizes.append(size)
        truncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", counting)
    return sizes


def test_the_writer_loses_whole_records_counts_them_and_writes_again(
    small_disk: Path, rollbacks: list[int]
):
    filler = fill(small_disk, leave=24 * 1024)
    root = small_disk / "Log"
    writer = LogWriter(root, linger=0.005)
    pad = "x" * 3000
    with Lines("openai_forward.chatlog") as logs:
        writer.start()
        for i in range(30):  # ~90 KiB: far more than the disk has left
            writer.submit("p/chat/chat.log", lambda i=i: {"i": i, "pad": pad})
            time.sleep(0.002)  # batches of a few records, some of which fit in part
        deadline = time.monotonic() + 5
        while writer.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.failed > 0
        time.sleep(0.1)
        before = records_of(root)  # whole lines only, while the disk is still full
        filler.unlink()
        for i in range(30, 40):
            writer.submit("p/chat/chat.log", lambda i=i: {"i": i, "pad": pad})
        writer.stop()
    assert rollbacks, "no write was taken in part: the rollback was not exercised"
    records = records_of(root)
    numbers = [r["i"] for r in records]
    assert numbers[: len(before)] == [r["i"] for r in before]
    assert numbers[-10:] == list(range(30, 40))  # all there, whole, each on a line of its own
    assert numbers == sorted(numbers)
    assert writer.lost == writer.failed == 40 - len(records)
    ((total, causes),) = [m.groups() for m in logs.matching(LOST_IN_ALL)]
    assert int(total) == 40 - len(records)
    assert causes == f"{total} no space left on device"
    (first, *_) = logs.matching(LOST_SO_FAR)
    assert 0 < int(first.group(1)) <= int(total)


async def test_a_full_log_disk_loses_whole_records_and_says_how_many(
    small_disk: Path, proxy_factory, upstream, rollbacks: list[int]
):
    filler = fill(small_disk, leave=64 * 1024)
    root = small_disk / "Log"
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, LOG_CHAT="true", LOG_FOLDER=str(root))
    big = "y" * 7000  # a request record of about 7 KiB; the answer's record is small

    async def call(client: httpx.AsyncClient, text: str) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200  # the log's disk never touches the road

    with Lines("openai_forward") as logs:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            for i in range(16):  # ~112 KiB of records for 64 KiB of room
                await asyncio.wait_for(call(client, f"before-{i} {big}"), 10)
                await asyncio.sleep(0.03)  # a batch or so per call
            deadline = time.monotonic() + 5
            while not logs.matching(LOST_SO_FAR) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert logs.matching(LOST_SO_FAR), logs.messages  # said while it happens
            filler.unlink()  # space is back
            for i in range(5):
                await asyncio.wait_for(call(client, f"after-{i} {big}"), 10)
        await asyncio.wait_for(asyncio.to_thread(proxy.stop), 15)

    assert rollbacks, "no write was taken in part: the rollback was not exercised"
    records = records_of(root)
    requests = {r["uid"]: r for r in records if "messages" in r}
    answers = {r["uid"]: r for r in records if "assistant" in r}
    assert len(requests) + len(answers) == len(records)
    after = sorted(
        (r["messages"][0]["content"].split()[0], uid)
        for uid, r in requests.items()
        if r["messages"][0]["content"].startswith("after-")
    )
    assert [text for text, _ in after] == [f"after-{i}" for i in range(5)]
    for _, uid in after:  # whole records, the request's and the answer's
        assert requests[uid]["messages"][0]["content"].endswith(big)
        assert answers[uid]["status"] == 200 and answers[uid]["complete"] is True
    missing = 2 * 21 - len(records)
    assert missing > 0
    ((total, causes),) = [m.groups() for m in logs.matching(LOST_IN_ALL)]
    assert int(total) == missing, logs.messages
    assert causes == f"{missing} no space left on device"
    assert logs.messages[-1] == LOST_IN_ALL.search(logs.messages[-1]).group(0)  # type: ignore[union-attr]
