"""``aifd convert``: logs written by the real server, logs of the original openai-forward."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from rich.console import Console

from openai_forward.convert import convert, log_files, parse_line
from tests import fake_openai
from tests.test_chatlog import truncating

AIFD = [sys.executable, "-m", "openai_forward"]


def run_convert(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LOG_"))}
    return subprocess.run(
        [*AIFD, "convert", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


async def test_convert_logs_of_the_real_server(proxy_factory, upstream, tmp_path):
    fake_openai.install(upstream)
    upstream.route("/broken/v1/chat/completions", truncating([b'data: {"choices": []}\n\n']))
    log_root = tmp_path / "Log"
    proxy = proxy_factory(
        OPENAI_BASE_URL=f"{upstream.url},{upstream.url}/broken",
        OPENAI_ROUTE_PREFIX="/,/b",
        LOG_CHAT="true",
        LOG_FOLDER=str(log_root),
        TZ="Asia/Shanghai",
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    system = {"role": "system", "content": "be brief"}
    bodies = [
        {"model": "m1", "messages": [system, {"role": "user", "content": "one"}]},
        {"model": "m2", "messages": [{"role": "user", "content": "two"}], "stream": True},
        {"model": "m3", "messages": [{"role": "user", "content": "3"}], "tools": tools},
        {"model": "m4", "messages": [{"role": "user", "content": "4"}], "n": 2, "stream": True},
        {"model": "m5", "messages": [{"role": "user", "content": "5"}], "temperature": 0.2},
    ]
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for body in bodies:
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/b/v1/chat/completions", json={**bodies[0], "stream": True})
        await client.post("/v1/embeddings", json={"model": "e", "input": "x"})
    proxy.stop()

    result = run_convert(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Log/chat_openai.json: 5 conversation(s)" in result.stderr
    assert "Log/chat_b.json: 0 conversation(s) (1 without a complete answer left out)" in (
        result.stderr
    )
    assert orjson.loads((log_root / "chat_b.json").read_bytes()) == []
    entries = orjson.loads((log_root / "chat_openai.json").read_bytes())
    assert [e["model"] for e in entries] == ["m1", "m2", "m3", "m4", "m5"]
    first = entries[0]
    assert list(first) == [
        "datetime",
        "ip",
        "model",
        "temperature",
        "messages",
        "tools",
        "is_tool_calls",
        "assistant",
    ]
    assert first["messages"] == [{"system": "be brief"}, {"user": "one"}]
    assert first["ip"] == "127.0.0.1" and first["temperature"] is None
    assert first["assistant"] == "echo: one" and first["is_tool_calls"] is False
    assert entries[1]["assistant"] == "echo: two"
    assert entries[2]["is_tool_calls"] is True and entries[2]["tools"] == tools
    assert entries[2]["assistant"] == [fake_openai.TOOL_CALL]
    assert entries[3]["choices"] == ["echo: 4", "echo: 4"]
    assert entries[4]["temperature"] == 0.2
    assert not (log_root / "chat_embedding.json").exists()


def original_lines(uid: str, question: str, answer, tool: bool = False) -> list[str]:
    """Lines as the original openai-forward wrote them: ``str(dict)``."""
    request = {
        "messages": [{"role": "user", "content": question}],
        "model": "gpt-3.5-turbo",
        "stream": True,
        "max_tokens": None,
        "n": 1,
        "temperature": 1,
        "top_p": 1,
        "tools": None,
        "ip": "10.0.0.7",
        "uid": uid,
        "caching": False,
        "datetime": "2024-01-01 12:00:00",
    }
    return [str(request), str({"assistant": answer, "is_tool_calls": tool, "uid": uid})]


def test_convert_original_format_and_rotated_files(tmp_path: Path):
    chat = tmp_path / "Log" / "openai" / "chat"
    chat.mkdir(parents=True)
    call = [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    # The original's rotated file (loguru names it by time), then ours, oldest first.
    (chat / "chat.2024-01-01_00-00-00_000000.log").write_text(
        "\n".join(original_lines("a", "first 'quoted' \"q\"", "Hello!")) + "\n"
    )
    old = original_lines("b", "second", call, tool=True)
    (chat / "chat.log.2").write_text(old[0] + "\n" + "not a record\n")
    (chat / "chat.log.1").write_text(old[1] + "\n" + original_lines("c", "third", "x")[0] + "\n")
    ours_request = {
        "messages": [{"role": "user", "content": "fourth"}],
        "model": "m",
        "stream": False,
        "tools": None,
        "ip": "127.0.0.1",
        "uid": "d",
        "datetime": "2024-02-02 02:02:02",
    }
    ours_response = {
        "assistant": "4!",
        "is_tool_calls": False,
        "finish_reason": "stop",
        "uid": "d",
        "status": 200,
        "cached": False,
        "complete": True,
    }
    (chat / "chat.log").write_bytes(
        orjson.dumps(ours_request) + b"\n" + orjson.dumps(ours_response) + b"\n"
    )
    assert [p.name for p in log_files(chat)] == [
        "chat.2024-01-01_00-00-00_000000.log",
        "chat.log.2",
        "chat.log.1",
        "chat.log",
    ]
    out = io.StringIO()
    [result] = convert(str(tmp_path / "Log" / "openai"), console=Console(file=out, width=200))
    assert result.written == 3 and result.unanswered == 1 and result.unreadable == 1
    assert "1 without a complete answer left out; 1 unreadable line(s) skipped" in out.getvalue()
    entries = orjson.loads((tmp_path / "Log" / "chat_openai.json").read_bytes())
    assert entries == [
        {
            "datetime": "2024-01-01 12:00:00",
            "ip": "10.0.0.7",
            "model": "gpt-3.5-turbo",
            "temperature": 1,
            "messages": [{"user": "first 'quoted' \"q\""}],
            "tools": None,
            "is_tool_calls": False,
            "assistant": "Hello!",
        },
        {
            "datetime": "2024-01-01 12:00:00",
            "ip": "10.0.0.7",
            "model": "gpt-3.5-turbo",
            "temperature": 1,
            "messages": [{"user": "second"}],
            "tools": None,
            "is_tool_calls": True,
            "assistant": call,
        },
        {
            "datetime": "2024-02-02 02:02:02",
            "ip": "127.0.0.1",
            "model": "m",
            "temperature": None,
            "messages": [{"user": "fourth"}],
            "tools": None,
            "is_tool_calls": False,
            "assistant": "4!",
        },
    ]


@pytest.mark.parametrize(
    "line, record",
    [
        (b'{"a": 1}\n', {"a": 1}),
        (b"{'a': True, 'b': None}\n", {"a": True, "b": None}),
        (b"2024-01-01 | DEBUG | {'a': 1}\n", {"a": 1}),
        (b"{'a': __import__('os').getcwd()}\n", None),  # never evaluated
        (b"[1, 2]\n", None),
        (b"plain text\n", None),
        (b"{'a': 1\n", None),
    ],
)
def test_parse_line(line: bytes, record):
    assert parse_line(line) == record


def test_progress_bar_on_a_large_folder(tmp_path: Path):
    chat = tmp_path / "p" / "chat"
    chat.mkdir(parents=True)
    lines = []
    for i in range(3000):
        lines += original_lines(str(i), "q" * 300, "a" * 300)
    (chat / "chat.log").write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    [result] = convert(str(chat), str(tmp_path / "out.json"), console=console, progress_min_bytes=1)
    assert result.written == 3000
    assert "converting chat logs" in out.getvalue()
    assert len(orjson.loads((tmp_path / "out.json").read_bytes())) == 3000


def test_convert_errors_are_one_line(tmp_path: Path):
    result = run_convert(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no log folder 'Log'" in result.stderr
    result = run_convert(tmp_path, "--log_folder", "missing")
    assert result.returncode == 2 and "no such folder" in result.stderr
    (tmp_path / "file").write_text("x")
    result = run_convert(tmp_path, "--log_folder", "file")
    assert result.returncode == 2 and "not a folder" in result.stderr
    for name in ("a", "b"):
        (tmp_path / "Log" / name / "chat").mkdir(parents=True)
        (tmp_path / "Log" / name / "chat" / "chat.log").write_text("")
    result = run_convert(tmp_path, "--target_path", "x.json")
    assert result.returncode == 2 and "2 prefixes (a, b)" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_convert(tmp_path, "--log_folder", "Log/a", "--target_path", "x.json")
    assert result.returncode == 0 and orjson.loads((tmp_path / "x.json").read_bytes()) == []
    result = run_convert(tmp_path, "--log_folder", "Log")  # a log root: every prefix
    assert result.returncode == 0
    assert (tmp_path / "Log" / "chat_a.json").exists() and (
        tmp_path / "Log" / "chat_b.json"
    ).exists()
    (tmp_path / "empty").mkdir()
    result = run_convert(tmp_path, "--log_folder", "empty")
    assert result.returncode == 2 and "no chat log files in 'empty'" in result.stderr


def test_odd_literals_of_old_lines_still_convert(tmp_path: Path):
    chat = tmp_path / "chat"
    chat.mkdir()
    lines = [
        "{'messages': [{'role': 'user', 'content': b'raw'}], 'uid': 'a', 'tools': {1, 2},"
        " 'forwarded-for': '10.1.1.1', 'temperature': 1j}",
        "{'assistant': ('t', 'u'), 'is_tool_calls': False, 'uid': 'a'}",
        "{'messages': [], 'uid': ['unhashable']}",
        "{'assistant': 'x', 'uid': {'no': 1}}",
    ]
    (chat / "chat.log").write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    [result] = convert(str(chat), str(tmp_path / "o.json"), console=Console(file=out))
    assert result.written == 1 and result.unanswered == 1
    [item] = orjson.loads((tmp_path / "o.json").read_bytes())
    assert item["messages"] == [{"user": "raw"}] and item["tools"] == [1, 2]
    assert item["ip"] == "10.1.1.1" and item["temperature"] == "1j"
    assert item["assistant"] == ["t", "u"]


def write_log(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{folder.name}.log").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))


def responses_records(uid: str, text: str, complete: bool = True) -> list[dict]:
    request = {
        "input": [{"role": "user", "content": text}],
        "instructions": "be brief",
        "model": "m",
        "stream": False,
        "tools": None,
        "ip": "127.0.0.1",
        "uid": uid,
        "datetime": "2026-01-01 00:00:00",
    }
    response = {
        "assistant": f"echo: {text}",
        "is_tool_calls": False,
        "response_id": f"resp_{uid}",
        "response_status": "completed" if complete else "incomplete",
        "uid": uid,
        "status": 200,
        "cached": False,
        "complete": complete,
    }
    return [request, response]


def test_convert_responses_logs_beside_chat_logs(tmp_path: Path):
    root = tmp_path / "Log"
    write_log(root / "openai" / "responses", responses_records("r1", "one"))
    write_log(root / "openai" / "chat", original_lines_as_json("c1", "two"))
    write_log(root / "team" / "responses", responses_records("r2", "three", complete=False))
    out = io.StringIO()
    results = convert(str(root), console=Console(file=out, width=40))
    assert [(r.target.name, r.written, r.unanswered) for r in results] == [
        ("chat_openai.json", 1, 0),
        ("responses_openai.json", 1, 0),
        ("responses_team.json", 0, 1),
    ]
    # a summary line is never wrapped, however narrow the console
    assert (
        "Log/responses_team.json: 0 conversation(s) (1 without a complete answer left out)\n"
        in (out.getvalue().replace(str(tmp_path) + "/", ""))
    )
    [entry] = orjson.loads((root / "responses_openai.json").read_bytes())
    assert entry == {
        "datetime": "2026-01-01 00:00:00",
        "ip": "127.0.0.1",
        "model": "m",
        "temperature": None,
        "messages": [{"system": "be brief"}, {"user": "one"}],
        "tools": None,
        "is_tool_calls": False,
        "assistant": "echo: one",
    }
    [chat] = orjson.loads((root / "chat_openai.json").read_bytes())
    assert chat["messages"] == [{"user": "two"}]

    # One kind's folder, or one prefix: that kind, or each kind of the prefix.
    [only] = convert(str(root / "openai" / "responses"), console=Console(file=io.StringIO()))
    assert only.target == root / "responses_openai.json" and only.written == 1
    both = convert(str(root / "openai"), console=Console(file=io.StringIO()))
    assert [r.target.name for r in both] == ["chat_openai.json", "responses_openai.json"]
    [one] = convert(
        str(root / "team"), str(tmp_path / "x.json"), console=Console(file=io.StringIO())
    )
    assert one.target == tmp_path / "x.json"
    with pytest.raises(ValueError, match="holds chat and responses logs: choose one with"):
        convert(str(root / "openai"), str(tmp_path / "y.json"), console=Console(file=io.StringIO()))


def original_lines_as_json(uid: str, question: str) -> list[dict]:
    request = {"messages": [{"role": "user", "content": question}], "uid": uid, "ip": "10.0.0.7"}
    return [request, {"assistant": "a", "is_tool_calls": False, "uid": uid}]
