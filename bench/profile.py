#!/usr/bin/env python3
"""Profile wirechat under one workload: ``python bench/profile.py W1 [--duration 10]``.

Starts wirechat on core 0, drives it from core 1 with the workload's load generator (the
same as ``run.py``), and samples it with ``py-spy record`` (``pip install py-spy``) for the
whole run. Prints, as markdown, the functions with the most samples of their own (self) and
in their call tree (inclusive), in % of the samples, and keeps the raw collapsed stacks (for
a flame graph: ``flamegraph.pl``, speedscope) next to the printed summary when ``--out`` is
given. Workloads: W1, W2, W3, W4 (JSON), W4-msgpack, W6 (the gateway, streaming).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import completion_body, raise_nofile  # noqa: E402
from run import PY, Settings, make_server, stop_all, wrk  # noqa: E402


def summarize(collapsed: Path, top: int) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples (is py-spy allowed to attach? run as root or with CAP_SYS_PTRACE)\n"
    out = [f"{total} samples.", "", "| self % | function |", "|---:|---|"]
    out += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in own.most_common(top)]
    out += ["", "| inclusive % | function |", "|---:|---|"]
    out += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines split one function apart."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:])})" if path else name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["W1", "W2", "W3", "W4", "W4-msgpack", "W6"])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="write the summary here (and .collapsed)")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, not only the one holding the GIL (py-spy may count an "
        "idle executor thread as busy)",
    )
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        subprocess.run([PY, "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=600)
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="wirechat-profile-"))
    settings = Settings(
        runs=1, duration=args.duration, warmup=1, conns=64, sse_conns=16, sse_duration=2,
        idle_conns=0, pin=True, logdir=work,
    )  # fmt: skip
    collapsed = work / "stacks.collapsed"
    try:
        upstream = ""
        if args.workload == "W6":
            upstream_server = make_server("raw").start(work, True)
            upstream = f"http://127.0.0.1:{upstream_server.port}"
        server = make_server("wirechat-gw" if upstream else "wirechat", upstream)
        server.start(work, True)
        body = work / "body.json"
        body.write_bytes(
            completion_body(
                stream=args.workload in ("W2", "W6"),
                model="openai/echo" if upstream else "echo",
            )
        )
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(server.pid), "--duration", str(args.duration + 1),
             "--rate", str(args.rate), "--format", "raw", "-o", str(collapsed),
             *(["--native"] if args.native else []), *([] if args.all_threads else ["--gil"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.5)
        if args.workload.startswith("W4"):
            encoding = "msgpack" if args.workload == "W4-msgpack" else "json"
            subprocess.run(
                ["taskset", "-c", "1", PY, str(BENCH / "loadgen.py"), "ws-turns", "--port",
                 str(server.port), "--duration", str(args.duration), "--encoding", encoding],
                check=True, timeout=args.duration + 60, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            rate = "(see loadgen)"
        else:
            path = "/v1/models" if args.workload == "W3" else "/v1/chat/completions"
            result = wrk(settings, server.port, path, body=None if args.workload == "W3" else body)
            rate = f"{result['rps']:.0f} req/s"
        _, err = spy.communicate(timeout=args.duration + 60)
        if spy.returncode:
            print(err.decode(errors="replace"), file=sys.stderr)
    finally:
        stop_all()
    summary = f"## wirechat under {args.workload} ({args.duration} s, {rate})\n\n"
    summary += summarize(collapsed, args.top)
    print(summary)
    if args.out is not None:
        args.out.write_text(summary)
        shutil.copy(collapsed, args.out.with_suffix(".collapsed"))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
