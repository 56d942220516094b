"""Benchmark openai-forward against a local mock upstream, and against the original 0.8.1.

Configurations, run interleaved and repeated (medians reported):

- ``direct``: the load generator talks to the mock upstream itself;
- ``floor``:  the least forwarder on our stack (``floor_forwarder.py``: raw ASGI on uvicorn, one
  pooled aiohttp session);
- ``ours``:   this project's proxy (``aifd run``) in front of the mock;
- ``orig``:   the original openai-forward 0.8.1, from a separate venv, in front of the mock.

After the tables, the performance targets are checked against what was measured.

Each proxy runs alone on core 0; the mock, wrk, the stream client and this script share core 1.
Every load phase is bounded in time and count, and talks to 127.0.0.1 only.

    python benchmarks/run.py                  # full run, about 5 minutes
    python benchmarks/run.py --smoke          # seconds; exits non-zero when a phase fails
    python benchmarks/run.py --features bare,features-on,cache-hit --targets ours,orig
    python benchmarks/run.py --features all   # our proxy (and the original) per feature
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stream_client import chat_body

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
PROXY_CORE = 0
LOAD_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_EVENTS = 20
PACED_DELAY_MS = 10
REDIS_ADDRESS = ("127.0.0.1", 6379)
NOISE_WARN_PCT = 10.0  # foreign CPU on the proxy's core above which results are flagged

# The environment a proxy gets: these variables from ours, plus its configuration. Nothing
# else leaks in (no stray OPENAI_* or *_proxy variables).
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH", "TZ")

# A huge limit: the limiter does its work on every request but never refuses one.
HUGE_LIMIT = "100000000/minute"


# --------------------------------------------------------------------------------------------
# Feature table: one row per named proxy configuration. Add rows here.
#
# ours_env / orig_env are environment variables for our proxy / the original 0.8.1; orig_env
# None means the original is not measured for that feature. "{redis_url}" is replaced by
# redis://127.0.0.1:6379/<--redis-db>, "{redis_prefix}" by the run's own key prefix (its keys are
# deleted at the end). body: "fixed" (one body), "vary" (a different message per request,
# "caching": true: every request is a cache miss), "cached" (one body with "caching": true).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Feature:
    name: str
    ours_env: dict[str, str]
    orig_env: dict[str, str] | None
    body: str = "fixed"
    needs_redis: bool = False
    note: str = ""


# Limits on chat and embeddings plus a global one, in our format and in the original's.
OURS_LIMITS = {
    "REQ_RATE_LIMIT": json.dumps({CHAT_PATH: HUGE_LIMIT, EMBEDDINGS_PATH: HUGE_LIMIT}),
    "GLOBAL_RATE_LIMIT": HUGE_LIMIT,
}
ORIG_LIMITS = {
    "REQ_RATE_LIMIT": json.dumps({CHAT_PATH: [{"level": 0, "limit": HUGE_LIMIT}]}),
    "GLOBAL_RATE_LIMIT": HUGE_LIMIT,
}
# The original has no key prefix: its keys carry the run's bearer token instead (its limiter
# keys on the Authorization header), which is how they are found and deleted.
OURS_REDIS = {"REQ_RATE_LIMIT_BACKEND": "{redis_url}", "REDIS_KEY_PREFIX": "{redis_prefix}"}
ORIG_REDIS = {"REQ_RATE_LIMIT_BACKEND": "{redis_url}"}
CACHE_ON = {"CACHE_CHAT_COMPLETION": "true", "CACHE_BACKEND": "MEMORY"}
# The original only parses (and so caches) chat bodies when it also logs them.
ORIG_CACHE_ON = {"CACHE_OPENAI": "true", "CACHE_BACKEND": "MEMORY", "LOG_OPENAI": "true"}

FEATURES: tuple[Feature, ...] = (
    Feature("bare", {}, {}),
    Feature(
        "ratelimit-memory",
        {**OURS_LIMITS, "REQ_RATE_LIMIT_BACKEND": "memory://"},
        ORIG_LIMITS,
    ),
    Feature(
        "ratelimit-redis",
        {**OURS_LIMITS, **OURS_REDIS},
        {**ORIG_LIMITS, **ORIG_REDIS},
        needs_redis=True,
        note="orig needs the redis package in its venv",
    ),
    Feature(
        "cache-miss",
        CACHE_ON,
        ORIG_CACHE_ON,
        body="vary",
        note="orig caches only with LOG_OPENAI=true",
    ),
    Feature(
        "cache-hit",
        CACHE_ON,
        # The original sleeps 1-2 s, blocking its event loop, on every non-stream hit.
        None,
        body="cached",
        note="orig not measured: it blocks 1-2 s per hit",
    ),
    Feature("log-chat", {"LOG_CHAT": "true"}, {"LOG_OPENAI": "true"}),
    # The features-on pair: chat log, chat cache (every request a miss) and Redis request
    # limits at once, in ours and in the original.
    Feature(
        "features-on",
        {**OURS_LIMITS, **OURS_REDIS, **CACHE_ON, "LOG_CHAT": "true"},
        {**ORIG_LIMITS, **ORIG_REDIS, **ORIG_CACHE_ON},
        body="vary",
        needs_redis=True,
        note="Redis limits + chat cache misses + chat log at once",
    ),
)
FEATURES_BY_NAME = {feature.name: feature for feature in FEATURES}


def orig_base_env(upstream: str) -> dict[str, str]:
    """The original 0.8.1 as a bare forwarder: its whole configuration is environment variables.

    FORWARD_CONFIG is a JSON list of {base_url, route, type}; logging, caching and limits are off
    unless a feature row turns them on.
    """
    return {
        "FORWARD_CONFIG": json.dumps([{"base_url": upstream, "route": "/", "type": "openai"}]),
        "LOG_OPENAI": "false",
        "LOG_GENERAL": "false",
        "PRINT_CHAT": "false",
        "CACHE_OPENAI": "false",
        "CACHE_GENERAL": "false",
        "GLOBAL_RATE_LIMIT": "inf",
        "TZ": "UTC",
    }


def ours_base_env(upstream: str) -> dict[str, str]:
    return {"OPENAI_BASE_URL": upstream, "OPENAI_ROUTE_PREFIX": "/"}


# --------------------------------------------------------------------------------------------
# Settings of a run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    reps: int
    duration: float  # seconds of each wrk phase (whole seconds)
    stream_duration: float  # seconds of each stream phase
    warmup: float
    streams_concurrency: int
    pin: bool
    python: str  # interpreter that runs the mock and the stream client
    bearer: str = "sk-bench"  # the clients' Authorization token; the run's own in run.py


@dataclass(frozen=True)
class Target:
    """One column of the comparison: who is measured, and how it starts."""

    label: str
    kind: str  # direct | floor | ours | orig
    feature: Feature
    command: tuple[str, ...] = ()  # with {port} and {host} placeholders
    env: dict[str, str] = field(default_factory=dict)


class PhaseFailed(Exception):
    pass


# --------------------------------------------------------------------------------------------
# /proc accounting of a process tree
# --------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # fields from "state" on; comm may hold spaces


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus what its reaped children used (cutime+cstime)."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK


def tree_peak_rss_mb(root: int) -> tuple[float, float]:
    """VmHWM summed over the tree, and the largest of one process (one worker), in MiB."""
    peaks_kb = [0]
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks_kb.append(int(line.split()[1]))
    return sum(peaks_kb) / 1024, max(peaks_kb) / 1024


def core_busy_seconds(core: int) -> float:
    """user+nice+system time of one core since boot (interrupt time left out)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            return sum(int(value) for value in line.split()[1:4]) / CLK_TCK
    return 0.0


def wait_idle(root: int, limit: float = 5.0) -> None:
    """Wait (at most ``limit`` s) until the tree has used no CPU tick for 0.2 s."""
    deadline = time.monotonic() + limit
    last = tree_cpu_seconds(root)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = tree_cpu_seconds(root)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 0.2:
            return


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], core: int, plan: Plan) -> list[str]:
    return ["taskset", "-c", str(core), *command] if plan.pin else list(command)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log: Path

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line[:300] for line in text[-lines:])

    def stop(self) -> None:
        tree = process_tree(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in tree[1:]:  # descendants that outlived their parent, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_server(
    name: str,
    command: Sequence[str],
    env: dict[str, str],
    core: int,
    plan: Plan,
    ready_within: float = 30,
) -> Server:
    """Start a server in a fresh temp dir (so no stray .env is read) and wait until it serves."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    log = workdir / "server.log"
    argv = [part.format(port=port, host=HOST) for part in command]
    with log.open("wb") as out:
        process = subprocess.Popen(
            pinned(argv, core, plan),
            cwd=workdir,
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(name, process, port, workdir, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise PhaseFailed(f"{name} exited with {process.returncode} at start:\n{tail}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = http_request(port, "GET", "/healthz", timeout=1)
            if status == 200:
                return server
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise PhaseFailed(f"{name} did not answer GET /healthz within {ready_within:g} s:\n{tail}")


# --------------------------------------------------------------------------------------------
# Requests and load
# --------------------------------------------------------------------------------------------
def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 10,
    bearer: str = "sk-bench",
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def nonstream_body(kind: str, tag: str) -> bytes:
    caching = None if kind == "fixed" else True
    text = f"bench {tag} 0" if kind == "vary" else "Say hello."
    return chat_body(text, stream=False, caching=caching)


def sanity_check(port: int, feature: Feature, tag: str, bearer: str) -> None:
    """One request of each kind, checked for content; and a paced stream must not be buffered."""
    body = nonstream_body(feature.body, tag)
    status, body = http_request(port, "POST", CHAT_PATH, body, bearer=bearer)
    if status != 200 or b'"usage"' not in body:
        raise PhaseFailed(f"chat completion: status {status}, body {body[:200]!r}")
    embed = b'{"input": "hi", "model": "m"}'
    status, body = http_request(port, "POST", EMBEDDINGS_PATH, embed, bearer=bearer)
    if status != 200 or b'"embedding"' not in body:
        raise PhaseFailed(f"embeddings: status {status}, body {body[:200]!r}")
    stream = chat_body("Say hi.", stream=True)
    status, body = http_request(port, "POST", f"{CHAT_PATH}?events=3", stream, bearer=bearer)
    if status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
        raise PhaseFailed(f"stream: status {status}, body ...{body[-200:]!r}")

    # 5 events, 100 ms apart: the first must arrive long before the last.
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        started = time.perf_counter()
        conn.request(
            "POST",
            f"{CHAT_PATH}?events=5&delay_ms=100",
            body=chat_body(f"pacing {tag}", stream=True),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"},
        )
        response = conn.getresponse()
        first = response.read1(65536)
        first_at = time.perf_counter() - started
        rest = response.read()
        total = time.perf_counter() - started
    finally:
        conn.close()
    if not (first + rest).rstrip().endswith(b"data: [DONE]"):
        raise PhaseFailed("paced stream does not end with data: [DONE]")
    if first_at > total - 0.25:
        raise PhaseFailed(
            f"paced stream was buffered: first bytes after {first_at:.3f} s of {total:.3f} s"
        )


WRK_SCRIPT = """
local counter = 0
local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {bearer}"}}
local fixed

init = function(args)
  -- wrk.format adds no Host header before init: HTTP/1.1 servers such as h11 require one.
  headers["Host"] = wrk.host .. ":" .. wrk.port
  fixed = wrk.format("POST", "{path}", headers, '{body}')
end

request = function()
  if not {vary} then return fixed end
  counter = counter + 1
  return wrk.format("POST", "{path}", headers, '{prefix}' .. counter .. '{suffix}')
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_script(kind: str, tag: str, directory: Path, bearer: str) -> Path:
    """A wrk Lua script that POSTs chat bodies; with kind "vary" each body is different."""
    marker = "@@N@@"
    template = chat_body(f"bench {tag} {marker}", stream=False, caching=True).decode()
    prefix, suffix = template.split(marker)
    script = WRK_SCRIPT.format(
        path=CHAT_PATH,
        body=nonstream_body(kind, tag).decode(),
        vary="true" if kind == "vary" else "false",
        prefix=prefix,
        suffix=suffix,
        bearer=bearer,
    )
    path = directory / f"wrk-{kind}-{tag}.lua"
    path.write_text(script)
    return path


def run_wrk(
    port: int, connections: int, seconds: float, script: Path, plan: Plan
) -> dict[str, float]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds only
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{HOST}:{port}{CHAT_PATH}",
    ]
    done = subprocess.run(
        pinned(argv, LOAD_CORE, plan),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise PhaseFailed(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    result: dict[str, float] = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(int(result[key]) for key in ("connect", "read", "write", "status", "timeout"))
    if errors or not result["requests"]:
        raise PhaseFailed(f"wrk -c{connections}: {result['requests']} requests, errors {result}")
    return result


def run_streams(
    port: int, *, seconds: float, delay_ms: int, kind: str, tag: str, plan: Plan
) -> dict[str, float]:
    argv = [
        plan.python,
        str(HERE / "stream_client.py"),
        "--url",
        f"http://{HOST}:{port}{CHAT_PATH}?events={STREAM_EVENTS}&delay_ms={delay_ms}",
        "--concurrency",
        str(plan.streams_concurrency),
        "--duration",
        str(seconds),
        "--max-streams",
        "200000",
        "--events",
        str(STREAM_EVENTS),
        "--body",
        kind,
        "--tag",
        tag,
        "--bearer",
        plan.bearer,
    ]
    if kind == "cached":  # a hit may be re-chunked by the cache: only [DONE] is checked
        argv.append("--any-event-count")
    done = subprocess.run(
        pinned(argv, LOAD_CORE, plan),
        capture_output=True,
        text=True,
        timeout=seconds + 90,
        check=False,
    )
    try:
        result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise PhaseFailed(f"stream client failed: {done.stdout}{done.stderr}") from exc
    if done.returncode != 0 or result["errors"]:
        raise PhaseFailed(f"streams (delay {delay_ms} ms): {result}")
    return result


# --------------------------------------------------------------------------------------------
# One measurement of one target
# --------------------------------------------------------------------------------------------
@dataclass
class Usage:
    """CPU used during one load phase."""

    proxy_s: float | None = None  # by the proxy's process tree (None: no proxy)
    other_pct: float = 0.0  # by anything else on the proxy's core, in % of the phase


@contextlib.contextmanager
def cpu_meter(root: int | None) -> Iterator[Usage]:
    """Measure the proxy tree's CPU inside the block, starting and ending with it idle.

    Also measures what other processes ran on the proxy's core meanwhile: a machine that is
    busy with something else shows up there, and its throughput figures are not to be trusted.
    """
    usage = Usage()
    if root is not None:
        wait_idle(root)
    tree_before = tree_cpu_seconds(root) if root is not None else 0.0
    core_before, wall_before = core_busy_seconds(PROXY_CORE), time.monotonic()
    yield usage
    if root is not None:
        wait_idle(root)
    tree_used = tree_cpu_seconds(root) - tree_before if root is not None else 0.0
    core_used = core_busy_seconds(PROXY_CORE) - core_before
    usage.other_pct = max(0.0, core_used - tree_used) * 100 / (time.monotonic() - wall_before)
    if root is not None:
        usage.proxy_s = tree_used


def measure(target: Target, mock_port: int, plan: Plan, scratch: Path) -> dict[str, float]:
    """All phases against one freshly started target; returns its metrics."""
    run_tag = secrets.token_hex(4)
    server: Server | None = None
    if target.kind == "direct":
        port, root = mock_port, None
    else:
        server = start_server(target.label, target.command, target.env, PROXY_CORE, plan)
        port, root = server.port, server.process.pid
    kind = target.feature.body

    # Every phase gets its own tag, so that "vary" bodies never repeat within a run.
    def wrk_phase(phase: str, connections: int, seconds: float) -> dict[str, float]:
        script = wrk_script(kind, f"{run_tag}-{phase}", scratch, plan.bearer)
        return run_wrk(port, connections, seconds, script, plan)

    def stream_phase(phase: str, delay_ms: int, seconds: float) -> dict[str, float]:
        tag = f"{run_tag}-{phase}"
        return run_streams(port, seconds=seconds, delay_ms=delay_ms, kind=kind, tag=tag, plan=plan)

    try:
        sanity_check(port, target.feature, run_tag, plan.bearer)
        if plan.warmup > 0:
            wrk_phase("warm", 16, plan.warmup)
            stream_phase("warm", 0, plan.warmup)
        metrics: dict[str, float] = {}
        other: list[float] = []  # foreign CPU on the proxy's core, per phase
        for connections in (1, 64):
            with cpu_meter(root) as usage:
                wrk = wrk_phase(f"c{connections}", connections, plan.duration)
            other.append(usage.other_pct)
            seconds = wrk["duration_us"] / 1e6
            metrics[f"c{connections}_rps"] = wrk["requests"] / seconds
            metrics[f"c{connections}_p50_ms"] = wrk["p50_us"] / 1000
            metrics[f"c{connections}_p99_ms"] = wrk["p99_us"] / 1000
            if usage.proxy_s is not None:
                metrics[f"cpu_us_req_c{connections}"] = usage.proxy_s * 1e6 / wrk["requests"]
        with cpu_meter(root) as usage:
            streams = stream_phase("streams", 0, plan.stream_duration)
        other.append(usage.other_pct)
        metrics["streams_per_s"] = streams["streams_per_s"]
        if usage.proxy_s is not None:
            metrics["cpu_us_stream"] = usage.proxy_s * 1e6 / streams["streams"]
        with cpu_meter(root) as usage:
            paced = stream_phase("paced", PACED_DELAY_MS, plan.stream_duration)
        other.append(usage.other_pct)
        metrics["paced_p50_ms"] = paced["duration_p50_ms"]
        if usage.proxy_s is not None:
            metrics["cpu_us_event"] = usage.proxy_s * 1e6 / paced["events"]
        metrics["core0_other_pct"] = max(other)
        if root is not None:
            metrics["rss_mb"], metrics["worker_rss_mb"] = tree_peak_rss_mb(root)
        if server is not None and server.process.poll() is not None:
            raise PhaseFailed(f"{target.label} exited during the run")
        return metrics
    except PhaseFailed as exc:
        if server is not None:
            raise PhaseFailed(
                f"{exc}\n--- {target.label} log tail ---\n{server.log_tail()}"
            ) from exc
        raise
    finally:
        if server is not None:
            server.stop()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (metric, header, format)
    ("c1_rps", "c1 req/s", "{:.0f}"),
    ("c1_p50_ms", "c1 p50 ms", "{:.3f}"),
    ("c1_p99_ms", "c1 p99 ms", "{:.3f}"),
    ("c64_rps", "c64 req/s", "{:.0f}"),
    ("c64_p50_ms", "c64 p50 ms", "{:.2f}"),
    ("c64_p99_ms", "c64 p99 ms", "{:.2f}"),
    ("streams_per_s", "streams/s", "{:.0f}"),
    ("cpu_us_req_c1", "CPU µs/req c1", "{:.0f}"),
    ("cpu_us_req_c64", "CPU µs/req c64", "{:.0f}"),
    ("cpu_us_stream", "CPU µs/stream", "{:.0f}"),
    ("cpu_us_event", "CPU µs/event", "{:.1f}"),
    ("paced_p50_ms", "paced p50 ms", "{:.1f}"),
    ("added_p50_us", "+p50 c1 µs", "{:.0f}"),
    ("rss_mb", "peak RSS MiB", "{:.1f}"),
    ("core0_other_pct", "core0 other %", "{:.0f}"),
)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = {key for run in runs for key in run}
    return {key: statistics.median(run[key] for run in runs if key in run) for key in keys}


def add_added_latency(results: dict[str, list[dict[str, float]]]) -> None:
    """Per repetition: proxy c1 p50 minus direct c1 p50 of the same repetition."""
    direct = results.get("direct", [])
    for label, runs in results.items():
        if label == "direct":
            continue
        for rep, run in enumerate(runs):
            if rep < len(direct) and "c1_p50_ms" in run and "c1_p50_ms" in direct[rep]:
                run["added_p50_us"] = (run["c1_p50_ms"] - direct[rep]["c1_p50_ms"]) * 1000


def markdown_table(rows: list[list[str]]) -> str:
    """Rows of cells (the first is the header) as a Markdown table, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        padded = [
            cell.ljust(width) if col == 0 else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(padded) + " |")
        if index == 0:
            rule = [("-" * w) if c == 0 else ("-" * (w - 1) + ":") for c, w in enumerate(widths)]
            lines.append("| " + " | ".join(rule) + " |")
    return "\n".join(lines)


SPREAD_METRICS = ("cpu_us_req_c64", "cpu_us_stream")


def spread_pct(runs: list[dict[str, float]], metric: str) -> str:
    """(max - min) / median over the repetitions, in %: how far apart the repetitions were."""
    values = [run[metric] for run in runs if metric in run]
    if len(values) < 2 or statistics.median(values) <= 0:
        return "-"
    return f"{(max(values) - min(values)) * 100 / statistics.median(values):.0f}"


def render_table(results: dict[str, list[dict[str, float]]], failed: set[str]) -> str:
    rows = [["config", *(title for _, title, _ in COLUMNS), "CPU spread % c64/stream"]]
    for label, runs in results.items():
        values = medians(runs) if runs else {}
        cells = [label + (" (FAILED)" if label in failed else "")]
        for metric, _, fmt in COLUMNS:
            cells.append(fmt.format(values[metric]) if metric in values else "-")
        cells.append("/".join(spread_pct(runs, metric) for metric in SPREAD_METRICS))
        rows.append(cells)
    return markdown_table(rows)


def paired(
    runs: list[dict[str, float]], base: list[dict[str, float]], metric: str
) -> list[tuple[float, float]]:
    """(run, base) values of ``metric`` from the same repetitions (a failed target stops being
    measured, so its list is a prefix of the repetitions)."""
    return [
        (run[metric], other[metric])
        for run, other in zip(runs, base, strict=False)
        if metric in run and metric in other and other[metric] > 0
    ]


DELTA_METRICS = (("cpu_us_req_c64", "µs/req c64"), ("cpu_us_stream", "µs/stream"))


def render_feature_costs(results: dict[str, list[dict[str, float]]]) -> str | None:
    """Each feature's added CPU against the bare proxy of the same repetition (the phases are
    interleaved, so pairing within a repetition cancels part of the machine's drift)."""
    rows = [["feature"]]
    for _, title in DELTA_METRICS:
        rows[0] += [f"added {title}", "x bare (min-max)"]
    for label, runs in results.items():
        kind, _, feature = label.partition(":")
        bare = results.get(f"{kind}:bare", [])
        if not feature or feature == "bare" or not bare:
            continue
        cells = [label]
        for metric, _ in DELTA_METRICS:
            pairs = paired(runs, bare, metric)
            if not pairs:
                cells += ["-", "-"]
                continue
            ratios = [a / b for a, b in pairs]
            cells.append(f"{statistics.median(a - b for a, b in pairs):+.0f}")
            # with the spread over repetitions: on a shared machine it is often wider than the
            # cost of a feature
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            cells.append(f"{statistics.median(ratios):.2f}{spread}")
        rows.append(cells)
    return markdown_table(rows) if len(rows) > 1 else None


@dataclass(frozen=True)
class Check:
    """One performance target: ``numerator / denominator`` of ``metric`` against ``limit``.

    The ratio is the median over repetitions of the ratio within each repetition (the targets
    are interleaved, so pairing cancels part of the machine's drift)."""

    target: str
    numerator: str  # a config label; "ours" also finds "ours:bare"
    denominator: str
    metric: str
    unit: str
    limit: float
    at_least: bool  # met when ratio >= limit (else: ratio <= limit, or < when strict)
    strict: bool = False


CHECKS: tuple[Check, ...] = (
    Check("orig / ours bare, CPU per request c64", "orig", "ours", "cpu_us_req_c64", "µs", 5, True),
    Check("orig / ours bare, CPU per stream", "orig", "ours", "cpu_us_stream", "µs", 5, True),
    Check(
        "orig / ours features-on, CPU per request c64",
        "orig:features-on",
        "ours:features-on",
        "cpu_us_req_c64",
        "µs",
        5,
        True,
    ),
    Check(
        "orig / ours features-on, CPU per stream",
        "orig:features-on",
        "ours:features-on",
        "cpu_us_stream",
        "µs",
        5,
        True,
    ),
    Check(
        "ours bare / floor, CPU per request c64",
        "ours",
        "floor",
        "cpu_us_req_c64",
        "µs",
        1.3,
        False,
    ),
    Check("ours bare / floor, CPU per stream", "ours", "floor", "cpu_us_stream", "µs", 1.3, False),
    Check(
        "ours / orig bare, peak RSS of one worker",
        "ours",
        "orig",
        "worker_rss_mb",
        "MiB",
        0.8,
        False,
    ),
    Check(
        "ours cache-hit / bare, CPU per request c64",
        "ours:cache-hit",
        "ours",
        "cpu_us_req_c64",
        "µs",
        1,
        False,
        strict=True,
    ),
    Check(
        "ours cache-hit / bare, CPU per stream",
        "ours:cache-hit",
        "ours",
        "cpu_us_stream",
        "µs",
        1,
        False,
        strict=True,
    ),
)


def render_checks(results: dict[str, list[dict[str, float]]]) -> str:
    """The performance targets as a table: target, what was measured, met or not."""

    def runs_of(label: str) -> list[dict[str, float]]:
        return results.get(label) or results.get(f"{label}:bare") or []

    rows = [["target", "needed", "measured (median)", "min-max over reps", "met"]]
    for check in CHECKS:
        sign = ">=" if check.at_least else ("<" if check.strict else "<=")
        cells = [check.target, f"{sign} {check.limit:g}x"]
        pairs = paired(runs_of(check.numerator), runs_of(check.denominator), check.metric)
        if not pairs:
            rows.append(
                [*cells, f"not measured: needs {check.numerator} and {check.denominator}", "-", "-"]
            )
            continue
        ratios = [a / b for a, b in pairs]
        ratio = statistics.median(ratios)
        top = statistics.median(a for a, _ in pairs)
        bottom = statistics.median(b for _, b in pairs)
        digits = 1 if check.unit == "MiB" else 0
        cells.append(f"{top:.{digits}f} / {bottom:.{digits}f} {check.unit} = {ratio:.2f}x")
        cells.append(f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-")
        if check.at_least:
            met = ratio >= check.limit
        else:
            met = ratio < check.limit if check.strict else ratio <= check.limit
        cells.append("met" if met else "NOT met")
        rows.append(cells)
    return markdown_table(rows)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def redis_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(REDIS_ADDRESS, timeout=1):
        return True
    return False


def clean_redis(db: int, patterns: Sequence[str]) -> None:
    """Delete the keys this run left in Redis (those matching ``patterns``)."""
    try:
        import redis  # in our venv with the test extra
    except ImportError:
        print(f"-- redis-py missing: delete the keys {', '.join(patterns)} of db {db} by hand")
        return
    host, port = REDIS_ADDRESS
    client = redis.Redis(host=host, port=port, db=db, socket_timeout=5)
    try:
        deleted = 0
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), 500):
                deleted += int(client.delete(*keys[start : start + 500]))
        print(f"-- Redis db {db}: deleted the run's {deleted} key(s) ({', '.join(patterns)})")
    except redis.RedisError as exc:
        print(f"-- Redis db {db}: could not delete the run's keys {', '.join(patterns)}: {exc}")
    finally:
        client.close()


def build_targets(
    args: argparse.Namespace, upstream: str, redis_prefix: str
) -> tuple[list[Target], bool]:
    """Targets to measure, and whether something required is missing."""
    wanted = set(args.targets.split(","))
    missing_required = False
    if args.features:
        names = [f.name for f in FEATURES] if args.features == "all" else args.features.split(",")
        unknown = [name for name in names if name not in FEATURES_BY_NAME]
        if unknown:
            sys.exit(
                f"unknown feature(s): {', '.join(unknown)}; known: {', '.join(FEATURES_BY_NAME)}"
            )
        features = [FEATURES_BY_NAME[name] for name in names]
    else:
        features = [FEATURES_BY_NAME["bare"]]
    suffix = bool(args.features)
    redis_url = f"redis://{REDIS_ADDRESS[0]}:{REDIS_ADDRESS[1]}/{args.redis_db}"

    ours_cmd = (
        shlex.split(args.our_cmd)
        if args.our_cmd
        else [
            str(Path(sys.executable).parent / "aifd"),
            *("run", "--port", "{port}", "--host", "{host}", "--workers", "1"),
        ]
    )
    orig_python = Path(args.orig_venv) / "bin" / "python"
    # `aifd run` of 0.8.1 is uvicorn.run("openai_forward.app:app", host="0.0.0.0", ...): the same
    # server, started here directly so that it listens on 127.0.0.1 only.
    orig_cmd = (
        shlex.split(args.orig_cmd)
        if args.orig_cmd
        else [
            str(orig_python),
            *("-m", "uvicorn", "openai_forward.app:app", "--host", "{host}", "--port", "{port}"),
            *("--workers", "1"),
        ]
    )

    targets: list[Target] = []
    if "direct" in wanted:
        targets.append(Target("direct", "direct", FEATURES_BY_NAME["bare"]))
    have_ours = shutil.which(ours_cmd[0]) is not None
    if "ours" in wanted and not have_ours:
        print(f"!! our proxy command not found: {ours_cmd[0]} (pip install -e . ?)")
        missing_required = True
    have_orig = bool(args.orig_cmd) or orig_python.exists()
    if "orig" in wanted and not have_orig:
        print(
            f"-- original openai-forward 0.8.1 not found in {args.orig_venv}: skipped. Install: "
            f"python -m venv {args.orig_venv} && "
            f"{args.orig_venv}/bin/pip install openai-forward==0.8.1 pyyaml redis"
        )
    # floor: the least forwarder on this stack (raw ASGI on uvicorn, one aiohttp session).
    if "floor" in wanted:
        script = str(HERE / "floor_forwarder.py")
        command = (sys.executable, script, "--port", "{port}", "--host", "{host}")
        bare = FEATURES_BY_NAME["bare"]
        targets.append(Target("floor", "floor", bare, command, ours_base_env(upstream)))
    for feature in features:
        if feature.needs_redis and not redis_reachable():
            print(f"-- feature {feature.name}: no Redis on {REDIS_ADDRESS}: skipped")
            continue

        def fill(env: dict[str, str]) -> dict[str, str]:
            return {
                key: value.replace("{redis_url}", redis_url).replace("{redis_prefix}", redis_prefix)
                for key, value in env.items()
            }

        name = f":{feature.name}" if suffix else ""
        if "ours" in wanted and have_ours:
            env = ours_base_env(upstream) | fill(feature.ours_env)
            targets.append(Target(f"ours{name}", "ours", feature, tuple(ours_cmd), env))
        if "orig" in wanted and have_orig:
            if feature.orig_env is None:
                print(f"-- feature {feature.name}: {feature.note}")
            else:
                env = orig_base_env(upstream) | fill(feature.orig_env)
                targets.append(Target(f"orig{name}", "orig", feature, tuple(orig_cmd), env))
    return targets, missing_required


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, smoke 1)")
    parser.add_argument(
        "--duration", type=float, help="seconds per load phase, whole for wrk (default 5)"
    )
    parser.add_argument("--warmup", type=float, help="seconds of warm-up load (default 1)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (default 64)")
    parser.add_argument(
        "--targets",
        default="direct,floor,ours,orig",
        help="comma list of direct, floor (the least forwarder on our stack: raw ASGI on uvicorn "
        "with one aiohttp session), ours, orig",
    )
    parser.add_argument(
        "--features",
        help=f"comma list of feature configurations, or 'all': {', '.join(FEATURES_BY_NAME)}",
    )
    parser.add_argument(
        "--our-cmd", help="command that starts our proxy; {port} and {host} are filled in"
    )
    parser.add_argument("--orig-venv", default="/work/venv-orig", help="venv of the original")
    parser.add_argument("--orig-cmd", help="command that starts the original ({port}, {host})")
    parser.add_argument(
        "--redis-db", type=int, default=12, help="Redis db of the features with Redis (12)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--json", type=Path, help="write every repetition's metrics here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The run's own identity: our Redis keys go under its prefix, and the original's limiter
    # keys carry its bearer token; both are deleted at the end.
    run_id = secrets.token_hex(4)
    redis_prefix = f"bench-{run_id}"
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get update && apt-get install -y wrk")
        return 2
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not args.no_pin and not pin:
        print("-- fewer than 2 cores or no taskset: processes are not pinned")
    plan = Plan(
        reps=args.reps or (1 if args.smoke else 3),
        duration=args.duration or (1.0 if args.smoke else 5.0),
        stream_duration=args.duration or (0.5 if args.smoke else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.0 if args.smoke else 1.0),
        streams_concurrency=min(args.streams, 16) if args.smoke else args.streams,
        pin=pin,
        python=sys.executable,
        bearer=f"sk-bench-{run_id}",
    )
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})

    failures: list[str] = []
    results: dict[str, list[dict[str, float]]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    mock_cmd = [plan.python, str(HERE / "mock_upstream.py"), "--port", "{port}", "--host", HOST]
    try:
        mock = start_server("mock", mock_cmd, {}, LOAD_CORE, plan)
    except PhaseFailed as exc:
        print(f"!! mock upstream: {exc}")
        return 1
    targets: list[Target] = []
    try:
        targets, missing = build_targets(args, f"http://{HOST}:{mock.port}", redis_prefix)
        if missing:
            failures.append("our proxy is missing")
        estimate = len(targets) * plan.reps * (4 * plan.duration + plan.warmup * 2 + 6)
        print(
            f"== {len(targets)} configurations x {plan.reps} repetitions, "
            f"{plan.duration:g} s phases: about {estimate / 60:.1f} min"
        )
        failed: set[str] = set()
        results.update((target.label, []) for target in targets)  # table rows in target order
        for rep in range(plan.reps):
            # Interleave, rotating the order each repetition so no target always goes first.
            shift = rep % max(len(targets), 1)
            for target in targets[shift:] + targets[:shift]:
                if target.label in failed:
                    continue
                started = time.monotonic()
                try:
                    metrics = measure(target, mock.port, plan, scratch)
                except (PhaseFailed, subprocess.TimeoutExpired) as exc:
                    failed.add(target.label)
                    failures.append(f"{target.label}: {exc}")
                    print(f"!! rep {rep + 1} {target.label}: FAILED\n{exc}")
                    continue
                results[target.label].append(metrics)
                print(
                    f"   rep {rep + 1} {target.label:<24} {time.monotonic() - started:5.1f} s  "
                    f"c64 {metrics['c64_rps']:.0f} req/s, {metrics['streams_per_s']:.0f} streams/s"
                )
    finally:
        mock.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if any(target.feature.needs_redis for target in targets):
            clean_redis(args.redis_db, (f"{redis_prefix}:*", f"*{plan.bearer}*"))

    add_added_latency(results)
    print()
    print(render_table(results, failed))
    costs = render_feature_costs(results)
    if costs:
        print("\nadded CPU per feature (median over repetitions of feature minus bare):")
        print(costs)
    print("\ntargets (ratios: median over repetitions of the ratio within each repetition):")
    print(render_checks(results))
    print(
        f"\nmedians of {plan.reps} repetition(s); proxy on core {PROXY_CORE}, mock + load on "
        f"core {LOAD_CORE}" + ("" if pin else " (NOT pinned)")
    )
    busy = {
        label: max(run.get("core0_other_pct", 0.0) for run in runs)
        for label, runs in results.items()
        if runs
    }
    if busy and max(busy.values()) > NOISE_WARN_PCT:
        worst = max(busy, key=lambda label: busy[label])
        print(
            f"!! other processes used up to {busy[worst]:.0f}% of core {PROXY_CORE} during a "
            f"phase ({worst}): req/s and latency are unreliable, CPU µs less so. "
            "Run on an otherwise idle machine."
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failures:
        print(f"\n{len(failures)} failure(s):")
        for failure in failures:
            print(f"  - {failure.splitlines()[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
