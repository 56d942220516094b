"""The chat log writer on real files: rotation, several processes on one file, a full queue."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from openai_forward.chatlog.writer import LogWriter
from openai_forward.convert import log_files


def lines_of(folder: Path) -> list[dict]:
    """Every record of the folder's files, oldest file first."""
    out = []
    for path in log_files(folder):
        out += [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return out


def test_rotation_by_size_keeps_the_newest_whole_lines(tmp_path: Path):
    writer = LogWriter(tmp_path, max_bytes=1000, backups=3)
    writer.start()
    for i in range(200):
        writer.submit("p/chat/chat.log", lambda i=i: {"i": i, "pad": "x" * 40})
    writer.stop()
    folder = tmp_path / "p" / "chat"
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat.log",
        "chat.log.1",
        "chat.log.2",
        "chat.log.3",
    ]
    assert all(p.stat().st_size <= 1000 for p in folder.iterdir())
    numbers = [r["i"] for r in lines_of(folder)]
    assert numbers == list(range(200 - len(numbers), 200))  # the newest, in order, none torn
    assert len(numbers) >= 3 * (1000 // 62)  # three full backups at least


def test_entries_of_several_files_in_one_batch_each_reach_their_file_in_order(tmp_path: Path):
    """A batch larger than the writer's clock-check stride, switching files back and forth."""
    writer = LogWriter(tmp_path, linger=60)  # nothing is written before stop: one batch
    writer.start()
    names = ("a/chat/chat.log", "b/chat/chat.log", "a/embedding/embedding.log")
    for i in range(300):
        path = names[(i // 7) % len(names)]
        writer.submit(path, lambda i=i, path=path: {"i": i, "path": path})
    writer.stop()
    for path in names:
        records = [orjson.loads(line) for line in (tmp_path / path).read_bytes().splitlines()]
        assert {r["path"] for r in records} == {path}
        expected = [i for i in range(300) if names[(i // 7) % len(names)] == path]
        assert [r["i"] for r in records] == expected


def test_folders_and_files_are_private(tmp_path: Path):
    umask = os.umask(0)
    os.umask(umask)
    writer = LogWriter(tmp_path / "Log")
    writer.start()
    writer.submit("openai/chat/chat.log", lambda: {"a": 1})
    writer.stop()
    for folder in ("Log", "Log/openai", "Log/openai/chat"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o750 & ~umask, folder
    assert (tmp_path / "Log/openai/chat/chat.log").stat().st_mode & 0o777 == 0o640 & ~umask


def test_a_line_longer_than_the_limit_gets_a_file_of_its_own(tmp_path: Path):
    writer = LogWriter(tmp_path, max_bytes=100, backups=5)
    writer.start()
    for size in (10, 500, 10):
        writer.submit("a.log", lambda size=size: {"pad": "x" * size})
    writer.stop()
    sizes = [len(r["pad"]) for r in lines_of(tmp_path)]
    assert sizes == [10, 500, 10]
    assert len(list(tmp_path.iterdir())) == 3


WRITER_PROCESS = """
import sys, time
from pathlib import Path
from openai_forward.chatlog.writer import LogWriter

name, count, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
writer = LogWriter(root, max_bytes=20000, backups=500, queue_size=count + 1, linger=0.002)
writer.start()
deadline = time.monotonic() + 20
while not (root / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
for i in range(count):
    writer.submit("w/chat/chat.log", lambda i=i: {"w": name, "i": i, "pad": "y" * (i % 50)})
    if i % 30 == 0:
        time.sleep(0.002)  # spread over a while, so that the processes' writes overlap
writer.stop()
"""


def test_several_processes_append_and_rotate_one_file(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_PROCESS, name, "3000", str(tmp_path)], env=env
        )
        for name in ("a", "b", "c")
    ]
    time.sleep(0.5)  # all three importing, then waiting for the same start
    (tmp_path / "go").write_text("")
    for process in processes:
        assert process.wait(timeout=60) == 0
    folder = tmp_path / "w" / "chat"
    assert len(list(folder.iterdir())) > 5  # it did rotate, several times
    records = lines_of(folder)  # every line parses: none interleaved or torn
    for name in ("a", "b", "c"):
        mine = [r["i"] for r in records if r["w"] == name]
        assert sorted(mine) == list(range(3000)), name  # nothing lost
    # The processes did write at the same time: their lines alternate in the files.
    switches = sum(1 for x, y in itertools.pairwise(records) if x["w"] != y["w"])
    assert switches > 10


def test_full_queue_drops_with_a_counted_warning(tmp_path: Path, caplog):
    writer = LogWriter(tmp_path, queue_size=3)  # not started yet: nothing leaves the queue
    with caplog.at_level(logging.WARNING, logger="openai_forward.chatlog"):
        for i in range(10):
            writer.submit("x.log", lambda i=i: {"i": i})
        assert writer.dropped == 7
        warnings = [r.getMessage() for r in caplog.records]
        assert warnings == ["Chat log queue full (3 entries): dropped 1 record(s), 1 in all"]
        writer.start()
        writer.stop()
        assert caplog.records[-1].getMessage() == (
            "Chat log queue full (3 entries): dropped 6 record(s), 7 in all"
        )
    assert [r["i"] for r in lines_of(tmp_path)] == [0, 1, 2]


def test_a_line_left_cut_is_ended_before_the_next_record(tmp_path: Path):
    """A file that ends inside a line (a process killed mid-write, a rollback that failed): the
    next record starts on a line of its own."""
    (tmp_path / "x.log").write_bytes(b'{"i": 0}\n{"i": 1, "pad": "cu')
    writer = LogWriter(tmp_path)
    writer.start()
    writer.submit("x.log", lambda: {"i": 2})
    writer.stop()
    lines = (tmp_path / "x.log").read_bytes().splitlines()
    assert lines == [b'{"i": 0}', b'{"i": 1, "pad": "cu', b'{"i":2}']


def test_records_of_calls_that_end_after_stop_are_counted(tmp_path: Path, caplog):
    writer = LogWriter(tmp_path)
    writer.start()
    writer.stop()
    with caplog.at_level(logging.WARNING, logger="openai_forward.chatlog"):
        writer.submit("x.log", lambda: {"i": 0})
        writer.submit("x.log", lambda: {"i": 1})
    assert writer.late == writer.lost == 2
    assert [r.getMessage() for r in caplog.records] == [
        "Chat log already closed: 1 record(s) of calls that ended later lost"
    ]


def test_every_loss_is_in_the_last_line(tmp_path: Path, caplog):
    writer = LogWriter(tmp_path, queue_size=2)
    with caplog.at_level(logging.WARNING, logger="openai_forward.chatlog"):
        for i in range(3):  # the third finds the queue full
            writer.submit("x.log", lambda i=i: {"i": i} if i else 1 / 0)  # type: ignore[return-value]
        writer.start()
        writer.stop()
    assert [r["i"] for r in lines_of(tmp_path)] == [1]
    assert writer.dropped == 1 and writer.failed == 1 and writer.lost == 2
    assert caplog.records[-1].getMessage() == (
        "Chat log: 2 record(s) lost in all (1 not rendered, 1 queue full)"
    )


def test_secrets_scrubbed_and_bad_entries_skipped(tmp_path: Path, caplog):
    writer = LogWriter(tmp_path, secrets=["sk-abc", "sk-abcdef", ""])
    writer.start()
    writer.submit("x.log", lambda: {"text": "keys sk-abcdef and sk-abc."})
    writer.submit("x.log", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    writer.submit("x.log", lambda: None)
    writer.submit("x.log", lambda: {"text": "after"})
    with caplog.at_level(logging.WARNING, logger="openai_forward.chatlog"):
        writer.stop()
    assert lines_of(tmp_path) == [{"text": "keys *** and ***."}, {"text": "after"}]
    assert writer.failed == 1
    assert "could not render a record (ZeroDivisionError)" in caplog.text
    writer.submit("x.log", lambda: {"text": "late"})  # after stop: ignored, never raises
