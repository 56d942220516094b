"""Instructions per request, per feature, counted by valgrind's callgrind: a cost figure that does
not move with the machine's load (time-based CPU figures on a shared machine drift by 10-30 %,
more than most features cost).

For each configuration of ``run.py``'s ``FEATURES`` table: our proxy runs under
``valgrind --tool=callgrind``; after a warm-up, the counters are zeroed, N requests are sent one
after another over one keep-alive connection, and the counters are dumped. The figure is user-space
instructions of every thread of the proxy, divided by N (system calls and the kernel are not
counted; nor is time, so it says nothing about latency).

Caveat: under valgrind the proxy runs ~50x slower, so work that happens per period rather than per
request (the chat log writer wakes every 20 ms and writes what gathered) is spread over ~50x fewer
requests than in real use; the ``log-chat`` and ``features-on`` rows overstate that part.

    python benchmarks/count_instructions.py                       # bare and every feature
    python benchmarks/count_instructions.py --features bare,cache-miss -n 500
    python benchmarks/count_instructions.py --features bare,features-on --stream  # 20-event streams
    python benchmarks/count_instructions.py --features features-on --keep /tmp/cg   # then:
    callgrind_annotate /tmp/cg/features-on.*   # where the instructions go, by function

Redis keys go under a key prefix of the run's own and are deleted at the end.
"""

from __future__ import annotations

import argparse
import http.client
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run
from run import FEATURES, FEATURES_BY_NAME, HOST, Plan, ours_base_env
from stream_client import chat_body

TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def send_requests(port: int, count: int, body: str, tag: str, stream: bool = False) -> None:
    """``count`` chat completions in a row on one connection, each a 200: JSON answers, or
    streams of ``run.STREAM_EVENTS`` events."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    path = f"{run.CHAT_PATH}?events={run.STREAM_EVENTS}" if stream else run.CHAT_PATH
    try:
        for i in range(count):
            text = f"{tag} {i}" if body == "vary" else tag
            if stream:
                payload = chat_body(text, stream=True, caching=None if body == "fixed" else True)
            else:
                payload = run.nonstream_body(body, text)
            headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
            conn.request("POST", path, body=payload, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200 or (stream and not answer.endswith(b"data: [DONE]\n\n")):
                raise run.PhaseFailed(f"request {i}: status {response.status}: {answer[-200:]!r}")
    finally:
        conn.close()


def count(
    feature: run.Feature,
    upstream: str,
    requests: int,
    redis: tuple[str, str],
    keep: Path | None = None,
    stream: bool = False,
) -> int:
    """Instructions per request of our proxy with ``feature`` switched on; ``redis`` is the
    (URL, key prefix) that fill the table's placeholders."""
    out_dir = Path(tempfile.mkdtemp(prefix="callgrind-"))
    aifd = str(Path(sys.executable).parent / "aifd")
    command = [
        *("valgrind", "--tool=callgrind", "--trace-children=yes"),
        f"--callgrind-out-file={out_dir}/out.%p",
        *(aifd, "run", "--port", "{port}", "--host", "{host}", "--workers", "1"),
    ]
    redis_url, redis_prefix = redis
    env = {
        key: value.replace("{redis_url}", redis_url).replace("{redis_prefix}", redis_prefix)
        for key, value in feature.ours_env.items()
    }
    plan = Plan(1, 1, 1, 0, 1, False, sys.executable)
    server = run.start_server(
        feature.name, command, {**ours_base_env(upstream), **env}, 0, plan, ready_within=180
    )
    try:
        send_requests(server.port, 100, feature.body, "warm-up", stream)
        control = ["callgrind_control"]
        subprocess.run([*control, "-z", str(server.process.pid)], check=True, capture_output=True)
        send_requests(server.port, requests, feature.body, f"counted {time.time()}", stream)
        subprocess.run([*control, "-d", str(server.process.pid)], check=True, capture_output=True)
        dumps = sorted(out_dir.glob("out.*.*"))  # the dump on request; not the one at exit
        totals = [int(m) for path in dumps for m in TOTALS.findall(path.read_bytes())[:1]]
        if not totals:
            raise run.PhaseFailed(f"no callgrind dump in {out_dir}")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for path in dumps:
                shutil.copy(path, keep / f"{feature.name}.{path.name}")
        return sum(totals) // requests
    finally:
        server.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="all", help="comma list of FEATURES names, or all")
    parser.add_argument("-n", "--requests", type=int, default=1000, help="counted requests")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps to this folder")
    parser.add_argument("--stream", action="store_true", help="20-event streams, not JSON answers")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is needed: apt-get install -y valgrind")
    names = [f.name for f in FEATURES] if args.features == "all" else args.features.split(",")
    if "bare" not in names:
        names.insert(0, "bare")
    redis_url = f"redis://{run.REDIS_ADDRESS[0]}:{run.REDIS_ADDRESS[1]}/{args.redis_db}"
    redis_prefix = f"bench-{secrets.token_hex(4)}"
    used_redis = False
    plan = Plan(1, 1, 1, 0, 1, False, sys.executable)
    mock_cmd = [sys.executable, str(run.HERE / "mock_upstream.py"), "--port", "{port}"]
    mock = run.start_server("mock", [*mock_cmd, "--host", HOST], {}, 1, plan)
    rows = [["feature", "instructions/request", "added", "x bare"]]
    base = 0
    try:
        for name in names:
            feature = FEATURES_BY_NAME[name]
            if feature.needs_redis and not run.redis_reachable():
                print(f"-- {name}: no Redis: skipped")
                continue
            upstream = f"http://{HOST}:{mock.port}"
            used_redis = used_redis or feature.needs_redis
            redis = (redis_url, redis_prefix)
            per_request = count(feature, upstream, args.requests, redis, args.keep, args.stream)
            base = base or per_request
            added = f"{per_request - base:+,}" if name != "bare" else "-"
            rows.append([name, f"{per_request:,}", added, f"{per_request / base:.2f}"])
            print(f"   {name:<18} {per_request:>12,} instructions/request", flush=True)
    finally:
        mock.stop()
        if used_redis:
            run.clean_redis(args.redis_db, (f"{redis_prefix}:*",))
    print()
    print(run.markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
