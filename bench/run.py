#!/usr/bin/env python3
"""wirechat's benchmark suite: ``python bench/run.py [--quick] [--only W1,W4] ...``.

Starts every server on 127.0.0.1 pinned to core 0 and every load generator on core 1
(``taskset``), runs the workloads W1-W6 for wirechat and its peers side by side, round-robin
(run 1 of every server, then run 2, ...), and writes the medians, the ratios and the targets
to ``bench/results.md`` and ``bench/results.json`` (the table is also printed). Progress goes
to stderr. Every server it starts is killed on exit; every run is bounded in time.

See ``bench/README.md`` for what each workload measures and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.client
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
sys.path.insert(0, str(BENCH))

from common import TEXT, WORDS, completion_body, proc_cpu_seconds, raise_nofile  # noqa: E402
from loadgen import check_sse  # noqa: E402

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "SCALE")
PROVIDER_ENV = (
    "OPENAI_BASE_URL", "OPENAI_API_KEY", "OLLAMA_API_URL", "VLLM_BASE_URL", "VLLM_API_KEY",
    "LLAMA_CPP_URL", "LMSTUDIO_BASE_URL", "GROQ_API_KEY", "OPENROUTER_API_KEY",
    "TOGETHER_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "WIRECHAT_CONFIG",
    "WIRECHAT_MODEL_PATH", "WIRECHAT_TOOLS", "CHAT_PROVIDER", "DEFAULT_MODEL", "AUTH_PROVIDER",
    "WORKER_AUTH_TOKEN", "PORT", "LOG_LEVEL",
)  # fmt: skip


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- tools -------------------------------------------------------------------------------


def ensure_tools(install: bool) -> None:
    """Install what the suite needs when it is missing (pip for Python, apt for wrk)."""
    wanted = {
        "fastapi": "fastapi",
        "uvicorn": "uvicorn",
        "httptools": "httptools",
        "websockets": "websockets",
        "msgpack": "msgpack",
        "uvloop": "uvloop",
        "httpx": "httpx",
        "wirechat": str(ROOT),
    }
    missing = [pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None]
    if missing:
        if not install:
            sys.exit(f"missing Python packages: {' '.join(missing)} (run without --no-install)")
        log(f"pip install {' '.join(missing)}")
        subprocess.run([PY, "-m", "pip", "install", "-q", *missing], check=True, timeout=900)
    if shutil.which("wrk") is None:
        if not install:
            sys.exit("wrk is missing: apt-get install -y wrk")
        log("apt-get install -y wrk")
        apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "apt-get"]
        subprocess.run([*apt, "update", "-qq"], check=False, timeout=600)
        subprocess.run([*apt, "install", "-y", "-qq", "wrk"], check=True, timeout=600)
    if shutil.which("taskset") is None:
        sys.exit("taskset (util-linux) is missing")


# --- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    key: str
    label: str
    argv: Callable[[int], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    cpus: str = "0"
    ready_path: str | None = None  # an HTTP GET that must answer 200
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None

    def start(self, logdir: Path, pin: bool) -> Server:
        self.port = free_port()
        self.logfile = logdir / f"{self.key}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
        # Like every peer, wirechat's echo yields to the event loop after every word, as a
        # real token stream arrives (by default it batches 64 words a turn).
        env["WIRECHAT_ECHO_YIELD_EVERY"] = "1"
        env.update(self.env)
        cmd = self.argv(self.port)
        if pin:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
                start_new_session=True,
                preexec_fn=raise_nofile,
            )
        STARTED.append(self)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start: {self.log_tail()}")
            try:
                if self.ready_path is None:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                elif http_get(self.port, self.ready_path)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready after {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        if self.logfile is None or not self.logfile.exists():
            return ""
        return self.logfile.read_text(errors="replace")[-2000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if self in STARTED:
            STARTED.remove(self)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its forks
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Forked workers may outlive the parent for a moment: end the group for good.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


STARTED: list[Server] = []


def stop_all() -> None:
    for server in list(STARTED):
        with contextlib.suppress(Exception):
            server.stop()


def _wirechat(*extra: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            PY, "-m", "wirechat", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--db", ":memory:", "--log-level", "warning", "--shutdown-grace", "1", *extra,
        ]  # fmt: skip

    return argv


def _script(name: str, *extra: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [PY, str(BENCH / "peers" / name), "--port", str(port), *extra]

    return argv


def make_server(key: str, upstream: str = "") -> Server:
    """The servers of the suite, by key."""
    uvloop_http = ("--loop", "uvloop")
    table: dict[str, Server] = {
        "wirechat": Server("wirechat", "wirechat", _wirechat(), ready_path="/health"),
        "wirechat-w2": Server(
            "wirechat-w2",
            "wirechat --workers 2",
            _wirechat("--workers", "2"),
            cpus="0,1",
            ready_path="/health",
        ),
        "fastapi-h11": Server(
            "fastapi-h11",
            "FastAPI+uvicorn h11",
            _script("fastapi_app.py", "--http", "h11", *uvloop_http),
            ready_path="/v1/models",
        ),
        "fastapi-httptools": Server(
            "fastapi-httptools",
            "FastAPI+uvicorn httptools",
            _script("fastapi_app.py", "--http", "httptools", *uvloop_http),
            ready_path="/v1/models",
        ),
        "raw": Server("raw", "raw asyncio floor", _script("raw_http.py"), ready_path="/v1/models"),
        "static": Server(
            "static", "wrk ceiling (static answer)", _script("raw_http.py", "--static")
        ),
        "websockets": Server("websockets", "websockets library", _script("ws_lib.py")),
        "raw-ws": Server("raw-ws", "raw asyncio WS (trivial)", _script("raw_ws.py")),
        "wirechat-gw": Server(
            "wirechat-gw",
            "wirechat gateway",
            _wirechat(),
            env={"OPENAI_BASE_URL": f"{upstream}/v1", "OPENAI_API_KEY": "bench"},
            ready_path="/health",
        ),
        "fastapi-gw": Server(
            "fastapi-gw",
            "FastAPI+httpx gateway",
            _script(
                "fastapi_app.py",
                "--http",
                "httptools",
                *uvloop_http,
                "--upstream",
                f"{upstream}/v1",
            ),
            ready_path="/v1/models",
        ),
    }
    return table[key]


# --- HTTP checks -------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """One request on a fresh socket; everything until the chunked end (or close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = bytearray()
        while not data.endswith(b"\r\n0\r\n\r\n"):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        return bytes(data)


def check_http(server: Server, model: str = "echo", stream_only: bool = False) -> None:
    """The server answers W1, W2 and W3 with the right content, or RuntimeError."""
    port = server.port
    if not stream_only:
        status, body = http_post(port, "/v1/chat/completions", completion_body(stream=False))
        content = json.loads(body)["choices"][0]["message"]["content"] if status == 200 else None
        if content != TEXT:
            raise RuntimeError(f"{server.label}: W1 answered {status} {body[:200]!r}")
        status, body = http_get(port, "/v1/models")
        if status != 200 or "echo" not in [m["id"] for m in json.loads(body)["data"]]:
            raise RuntimeError(f"{server.label}: W3 answered {status} {body[:200]!r}")
    payload = completion_body(stream=True, model=model)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    problem = check_sse(raw_exchange(port, request))
    if problem is not None:
        raise RuntimeError(f"{server.label}: W2 stream: {problem}")


# --- load generators ---------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(server: Server | None, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result plus the CPU use of the server and of the load generator."""
    server_before = server.cpu_seconds() if server is not None else 0.0
    gen_before = _children_cpu()
    started = time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    result["wall_s"] = round(wall, 2)
    result["loadgen_cpu_s"] = round(_children_cpu() - gen_before, 2)
    if server is not None:
        cpu = server.cpu_seconds() - server_before
        result["server_cpu_s"] = round(cpu, 2)
        # Work per CPU-second of the server: what it would do on a core of its own. On a
        # shared machine this is steadier than the rate (other processes take core 0 too).
        if "requests" in result and cpu > 0:
            result["per_cpu"] = result["requests"] / cpu
        window = result.get("server_cpu_window_s")
        if "turns" in result and window:
            result["per_cpu"] = result["turns"] / window
    return result


@dataclass
class Settings:
    runs: int
    duration: float
    warmup: float
    conns: int
    sse_conns: int
    sse_duration: float
    idle_conns: int
    pin: bool
    logdir: Path
    wrk_threads: int = 1


def _pinned(cmd: list[str], cpus: str, settings: Settings) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if settings.pin else cmd


def wrk(
    settings: Settings,
    port: int,
    path: str,
    *,
    body: Path | None = None,
    conns: int | None = None,
    duration: float | None = None,
    threads: int = 1,
    cpus: str = "1",
) -> dict[str, Any]:
    duration = duration if duration is not None else settings.duration
    seconds = max(1, round(duration))  # wrk takes whole seconds
    cmd = [
        "wrk", f"-t{threads}", f"-c{conns or settings.conns}", f"-d{seconds}s", "--timeout",
        "10s", "-s", str(BENCH / "lua" / "request.lua"), f"http://127.0.0.1:{port}{path}", "--",
        "POST" if body else "GET",
    ]  # fmt: skip
    if body is not None:
        cmd.append(str(body))
    out = subprocess.run(
        _pinned(cmd, cpus, settings), capture_output=True, text=True, timeout=seconds + 30
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    elapsed = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": raw["requests"] / elapsed,
        "requests": raw["requests"],
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
        "non_2xx": raw["status"],
        "conns": conns or settings.conns,
    }


def loadgen(settings: Settings, mode: str, port: int, *args: str, budget: float) -> dict[str, Any]:
    cmd = [PY, str(BENCH / "loadgen.py"), mode, "--port", str(port), *args]
    out = subprocess.run(
        _pinned(cmd, "1", settings), capture_output=True, text=True, timeout=budget + 60
    )
    try:
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise RuntimeError(
            f"loadgen {mode} failed: {out.stdout[-500:]} {out.stderr[-800:]}"
        ) from exc
    return result


# --- the suite ---------------------------------------------------------------------------


@dataclass
class Suite:
    settings: Settings
    only: set[str]
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loadavg: list[tuple[str, str]] = field(default_factory=list)
    floors: dict[str, float] = field(default_factory=dict)

    def record(self, workload: str, server: str, result: dict[str, Any]) -> None:
        self.results.setdefault(workload, {}).setdefault(server, []).append(result)

    def mark(self, phase: str) -> None:
        load = Path("/proc/loadavg").read_text().split()[:3]
        self.loadavg.append((phase, " ".join(load)))

    def wanted(self, *workloads: str) -> bool:
        return any(w in self.only for w in workloads)

    # W1-W3 and W6 share the HTTP servers; W4 reuses wirechat and FastAPI httptools.
    def run(self) -> None:
        s = self.settings
        bodies = Path(tempfile.mkdtemp(prefix="wirechat-bench-"))
        w1 = bodies / "w1.json"
        w1.write_bytes(completion_body(stream=False))
        w2 = bodies / "w2.json"
        w2.write_bytes(completion_body(stream=True))
        w6 = bodies / "w6.json"
        w6.write_bytes(completion_body(stream=True, model="openai/echo"))
        servers: dict[str, Server] = {}

        def start(key: str, upstream: str = "") -> Server:
            server = make_server(key, upstream)
            log(f"start {server.label}")
            servers[key] = server.start(s.logdir, s.pin)
            self.labels[key] = server.label
            return server

        def stop(key: str) -> None:
            server = servers.pop(key, None)
            if server is not None:
                server.stop()

        http_keys = ["wirechat", "fastapi-httptools", "fastapi-h11", "raw"]
        if self.wanted("W1", "W2", "W3", "W6", "SCALE"):
            for key in http_keys:
                start(key)
                if key != "raw" or self.wanted("W1", "W2", "W3"):
                    check_http(servers[key])
        if self.wanted("W3"):
            start("static")

        def rounds(workload: str, keys: Sequence[str], one: Callable[[Server], dict[str, Any]],
                   warm: Callable[[Server], object] | None = None) -> None:  # fmt: skip
            self.mark(workload)
            if warm is not None and s.warmup > 0:
                for key in keys:
                    warm(servers[key])
            for run in range(s.runs):
                for key in keys:
                    server = servers[key]
                    result = measured(server, functools.partial(one, server))
                    log(f"{workload} run {run + 1}/{s.runs} {server.label}: {_brief(result)}")
                    self.record(workload, key, result)

        if self.wanted("W1"):
            rounds(
                "W1",
                http_keys,
                lambda sv: wrk(s, sv.port, "/v1/chat/completions", body=w1),
                lambda sv: wrk(s, sv.port, "/v1/chat/completions", body=w1, duration=s.warmup),
            )
        if self.wanted("W2"):
            rounds(
                "W2",
                http_keys,
                lambda sv: wrk(s, sv.port, "/v1/chat/completions", body=w2),
                lambda sv: wrk(s, sv.port, "/v1/chat/completions", body=w2, duration=s.warmup),
            )
            rounds(
                "W2-client",
                http_keys,
                lambda sv: loadgen(
                    s, "sse", sv.port, "--pid", str(sv.pid), "--conns", str(s.sse_conns),
                    "--duration", str(s.sse_duration), "--warmup", "0.3", budget=s.sse_duration,
                ),
            )  # fmt: skip
        if self.wanted("W3"):
            rounds(
                "W3",
                [*http_keys, "static"],
                lambda sv: wrk(s, sv.port, "/v1/models"),
                lambda sv: wrk(s, sv.port, "/v1/models", duration=s.warmup),
            )
            stop("static")
        if self.wanted("W6"):
            upstream = f"http://127.0.0.1:{servers['raw'].port}"
            for key in ("wirechat-gw", "fastapi-gw"):
                start(key, upstream)
                check_http(servers[key], model="openai/echo", stream_only=True)
            servers["direct"] = servers["raw"]
            self.labels["direct"] = "upstream called directly"
            keys = ["direct", "wirechat-gw", "fastapi-gw"]

            def body_for(sv: Server) -> Path:
                return w2 if sv is servers["raw"] else w6

            rounds(
                "W6-latency",
                keys,
                lambda sv: wrk(s, sv.port, "/v1/chat/completions", body=body_for(sv), conns=1),
                lambda sv: wrk(
                    s, sv.port, "/v1/chat/completions", body=body_for(sv), conns=1,
                    duration=s.warmup,
                ),
            )  # fmt: skip
            rounds(
                "W6-throughput",
                keys,
                lambda sv: wrk(s, sv.port, "/v1/chat/completions", body=body_for(sv)),
            )
            servers.pop("direct")
            stop("wirechat-gw")
            stop("fastapi-gw")
        for key in ("fastapi-h11", "raw"):
            stop(key)
        if self.wanted("SCALE"):
            start("wirechat-w2")
            check_http(servers["wirechat-w2"])
            threads = 2
            rounds(
                "SCALE",
                ["wirechat-w2"],
                lambda sv: wrk(
                    s, sv.port, "/v1/chat/completions", body=w1, threads=threads, cpus="0,1"
                ),
                lambda sv: wrk(
                    s, sv.port, "/v1/chat/completions", body=w1, threads=threads, cpus="0,1",
                    duration=s.warmup,
                ),
            )  # fmt: skip
            stop("wirechat-w2")
        if self.wanted("W4"):
            for key in ("wirechat", "fastapi-httptools", "websockets", "raw-ws"):
                if key not in servers:
                    start(key)
            keys = ["wirechat", "fastapi-httptools", "websockets", "raw-ws"]
            for encoding in ("json", "msgpack"):

                def turns(sv: Server, encoding: str = encoding) -> dict[str, Any]:
                    return loadgen(
                        s, "ws-turns", sv.port, "--pid", str(sv.pid), "--conns", str(s.conns),
                        "--duration", str(s.duration), "--warmup", str(max(s.warmup, 0.5)),
                        "--encoding", encoding, budget=s.duration + s.warmup,
                    )  # fmt: skip

                rounds(f"W4-{encoding}", keys, turns)
        for key in list(servers):
            stop(key)
        if self.wanted("W5"):
            self.mark("W5")
            for run in range(s.runs):
                for key in ("wirechat", "fastapi-httptools", "websockets", "raw-ws"):
                    server = start(key)
                    try:
                        result = loadgen(
                            s, "ws-idle", server.port, "--conns", str(s.idle_conns), "--pid",
                            str(server.pid), budget=60,
                        )  # fmt: skip
                    finally:
                        stop(key)
                    log(f"W5 run {run + 1}/{s.runs} {server.label}: {_brief(result)}")
                    self.record("W5", key, result)
        self.mark("end")
        shutil.rmtree(bodies, ignore_errors=True)
        log("floors: in-process costs per request (bench/floors.py), on the server core")
        done = subprocess.run(
            _pinned([PY, str(BENCH / "floors.py"), "--json"], "0", s),
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        self.floors = json.loads(done.stdout)


def _brief(result: dict[str, Any]) -> str:
    keys = ("rps", "p50_ms", "p99_ms", "turns_per_s", "ttfb_p50_ms", "bytes_per_conn",
            "answered", "errors", "server_cpu_s", "loadgen_cpu_s")  # fmt: skip
    parts = []
    for key in keys:
        if key in result:
            value = result[key]
            parts.append(f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


# --- the report --------------------------------------------------------------------------


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def cpu_pct(runs: list[dict[str, Any]], key: str) -> str:
    values = [r[key] / r["wall_s"] * 100 for r in runs if r.get(key) is not None and r["wall_s"]]
    return f"{statistics.median(values):.0f}%" if values else "-"


def per_gen_cpu(runs: list[dict[str, Any]], key: str) -> float | None:
    """Work per CPU-second of the load generator (its ceiling on a core of its own)."""
    values = [float(r[key] / r["loadgen_cpu_s"]) for r in runs if r.get("loadgen_cpu_s")]
    return statistics.median(values) if values else None


def report(suite: Suite, conditions: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    res = suite.results
    label = suite.labels
    s = suite.settings
    lines: list[str] = []
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    targets: list[dict[str, Any]] = []
    add = lines.append

    def med(workload: str, key: str, metric: str) -> float | None:
        value = median(res.get(workload, {}).get(key, []), metric)
        medians.setdefault(workload, {}).setdefault(key, {})[metric] = value
        return value

    Pair = tuple[float | None, float | None]

    def target(name: str, rate: Pair, goal: float, efficiency: Pair, detail: str = "") -> None:
        a, b = rate
        ok = None if a is None or not b else a / b >= goal
        targets.append(
            {
                "target": name,
                "ratio": None if a is None or not b else a / b,
                "ratio_per_cpu": None
                if efficiency[0] is None or not efficiency[1]
                else efficiency[0] / efficiency[1],
                "met": ok,
                "measured": f"{ratio(a, b)} (per CPU-s: {ratio(*efficiency)})",
                "detail": detail,
            }
        )

    def throughput(workload: str, metric: str, unit: str, scale: float = 1.0,
                   extra: Callable[[str], list[str]] | None = None,
                   extra_heads: Sequence[str] = ()) -> None:  # fmt: skip
        """One row per server: rate, latency, rate per server CPU-second, ratios, CPU use."""
        heads = [
            "server", unit, "p50 ms", "p99 ms", *extra_heads, f"{unit} per server CPU-s",
            "wirechat / this", "same, per CPU-s", "server CPU", "load gen CPU",
        ]  # fmt: skip
        add("| " + " | ".join(heads) + " |")
        add("|---|" + "---:|" * (len(heads) - 1))
        wc = med(workload, "wirechat", metric)
        wc_cpu = med(workload, "wirechat", "per_cpu")
        for key, runs in res[workload].items():
            rate = med(workload, key, metric)
            per_cpu = med(workload, key, "per_cpu")
            p50 = med(workload, key, "p50_ms" if "p50_ms" in runs[0] else "turn_p50_ms")
            p99 = med(workload, key, "p99_ms" if "p99_ms" in runs[0] else "turn_p99_ms")
            cells = [
                label[key], fmt(rate * scale if rate else None), fmt(p50, 2), fmt(p99, 2),
                *(extra(key) if extra else []), fmt(per_cpu * scale if per_cpu else None),
                ratio(wc, rate), ratio(wc_cpu, per_cpu), cpu_pct(runs, "server_cpu_s"),
                cpu_pct(runs, "loadgen_cpu_s"),
            ]  # fmt: skip
            add("| " + " | ".join(cells) + " |")
        add("")

    add("# wirechat benchmark results")
    add("")
    add(f"Generated by `python bench/run.py {conditions['argv']}` on {conditions['date']}.")
    add("")
    add(
        f"Conditions: {conditions['cpus']} cores ({conditions['cpu_model']}), "
        f"Python {conditions['python']}, {conditions['pinning']}; "
        f"{s.runs} run(s) of {s.duration:g} s per workload and server, round-robin, medians "
        f"shown; {s.conns} connections. Load average (1/5/15 min) at each phase: "
        + ", ".join(f"{phase} {load}" for phase, load in suite.loadavg)
        + "."
    )
    add("")
    add("Versions: " + ", ".join(f"{k} {v}" for k, v in conditions["versions"].items()) + ".")
    add("")
    add(
        "*server CPU* is the share of one core the server got during the run and *load gen "
        "CPU* that of the load generator: a server well under 100% while its load generator is "
        "not saturated was starved by other processes on its core. *per server CPU-s* divides "
        "the work done by the server's CPU time: what it would do with a core of its own, "
        "steadier than the rate on a shared machine."
    )
    add("")
    if conditions.get("note"):
        add(conditions["note"])
        add("")
    summary_at = len(lines)

    if "W1" in res:
        add("## W1 non-streaming chat completion (50-word echo reply, wrk)")
        add("")
        throughput("W1", "rps", "req/s")
        target(
            "W1 >= 3x FastAPI+uvicorn (httptools, uvloop)",
            (med("W1", "wirechat", "rps"), med("W1", "fastapi-httptools", "rps")),
            3,
            (med("W1", "wirechat", "per_cpu"), med("W1", "fastapi-httptools", "per_cpu")),
            "ratio to the raw floor: "
            f"{ratio(med('W1', 'wirechat', 'rps'), med('W1', 'raw', 'rps'))} "
            f"(per CPU-s {ratio(med('W1', 'wirechat', 'per_cpu'), med('W1', 'raw', 'per_cpu'))})",
        )
    if "SCALE" in res:
        add("## W1 scaling: `--workers 1` vs `--workers 2`")
        add("")
        add(
            "`--workers 2` runs on both cores (`taskset -c 0,1`) and **wrk shares them** "
            "(`taskset -c 0,1`, 2 threads); `--workers 1` is W1's figure (server on core 0, "
            "wrk on core 1)."
        )
        add("")
        add("| wirechat | req/s | p50 ms | p99 ms | scaling | server CPU (of 1 core) |")
        add("|---|---:|---:|---:|---:|---:|")
        one = med("W1", "wirechat", "rps")
        two = med("SCALE", "wirechat-w2", "rps")
        add(
            f"| `--workers 1` | {fmt(one)} | {fmt(med('W1', 'wirechat', 'p50_ms'), 2)} | "
            f"{fmt(med('W1', 'wirechat', 'p99_ms'), 2)} | 1.00x | "
            f"{cpu_pct(res.get('W1', {}).get('wirechat', []), 'server_cpu_s')} |"
        )
        add(
            f"| `--workers 2` | {fmt(two)} | {fmt(med('SCALE', 'wirechat-w2', 'p50_ms'), 2)} | "
            f"{fmt(med('SCALE', 'wirechat-w2', 'p99_ms'), 2)} | {ratio(two, one)} | "
            f"{cpu_pct(res['SCALE']['wirechat-w2'], 'server_cpu_s')} |"
        )
        add("")
    if "W2" in res:
        add("## W2 streaming chat completion (50 SSE content chunks)")
        add("")
        add(
            f"chunks/s = wrk's whole responses/s ({s.conns} connections) x {WORDS}. TTFB (time "
            f"to the first response byte) from the asyncio client ({s.sse_conns} connections, "
            "closed loop, every connection's first stream checked in full), with the rate that "
            "client reached."
        )
        add("")

        def client_cols(key: str) -> list[str]:
            return [
                fmt(med("W2-client", key, "ttfb_p50_ms"), 2),
                fmt(med("W2-client", key, "ttfb_p99_ms"), 2),
                fmt(med("W2-client", key, "rps")),
            ]

        throughput(
            "W2", "rps", "chunks/s", WORDS, client_cols,
            ("TTFB p50 ms", "TTFB p99 ms", "client req/s"),
        )  # fmt: skip
        add("(p50/p99 here are wrk's whole-response latencies.)")
        add("")
        wc, wc_cpu = med("W2", "wirechat", "rps"), med("W2", "wirechat", "per_cpu")
        target(
            "W2 chunks/s >= 3x FastAPI+uvicorn (httptools)",
            (wc, med("W2", "fastapi-httptools", "rps")),
            3,
            (wc_cpu, med("W2", "fastapi-httptools", "per_cpu")),
        )
        target(
            "W2 chunks/s >= 1/2 raw floor (yielding between chunks)",
            (wc, med("W2", "raw", "rps")),
            0.5,
            (wc_cpu, med("W2", "raw", "per_cpu")),
        )
    if "W3" in res:
        add("## W3 `GET /v1/models` (wrk)")
        add("")
        throughput("W3", "rps", "req/s")
        add(
            "The last row is wrk's ceiling here: a server answering every request with one "
            "precomputed response."
        )
        add("")
    w4 = [w for w in ("W4-json", "W4-msgpack") if w in res]
    for workload in w4:
        encoding = workload.split("-")[1]
        add(f"## W4 `/chat` WebSocket turns, {encoding} ({s.conns} connections)")
        add("")
        add(
            f"A turn: one user message, {WORDS} `chunk` frames, the done chunk, the final "
            "`message` (52 frames); the asyncio client decodes every frame and checks every "
            "turn. The raw asyncio WS server writes a precomputed turn: its row is the "
            "client's ceiling. p50/p99: turn latency."
        )
        add("")
        throughput(workload, "turns_per_s", "turns/s")
        wc, wc_cpu = med(workload, "wirechat", "turns_per_s"), med(workload, "wirechat", "per_cpu")
        peers = ("fastapi-httptools", "websockets")
        best = max(peers, key=lambda k: med(workload, k, "turns_per_s") or 0.0)
        target(
            f"W4 ({encoding}) >= 3x the fastest peer WS server",
            (wc, med(workload, best, "turns_per_s")),
            3,
            (wc_cpu, max(med(workload, k, "per_cpu") or 0.0 for k in peers)),
            f"fastest peer: {label.get(best, best)}; client ceiling "
            f"{fmt(med(workload, 'raw-ws', 'turns_per_s'))} turns/s",
        )
    if "W5" in res:
        add(f"## W5 memory per idle WebSocket connection ({s.idle_conns:,} connections)")
        add("")
        add(
            "Server RSS (`/proc/PID/status` VmRSS) with every connection open and idle, minus "
            "the RSS before (after 20 warm-up connections), divided by the connections; then "
            'each connection sends `{"type": "ping"}` and must get a `pong`.'
        )
        add("")
        add("| server | bytes/conn (idle) | KiB/conn | KiB/conn after the pings | answered | "
            "wirechat / this |")  # fmt: skip
        add("|---|---:|---:|---:|---:|---:|")
        wc = med("W5", "wirechat", "bytes_per_conn")
        for key in res["W5"]:
            per = med("W5", key, "bytes_per_conn")
            after = med("W5", key, "bytes_per_conn_after_ping")
            answered = med("W5", key, "answered")
            add(
                f"| {label[key]} | {fmt(per)} | {fmt(per / 1024 if per else None, 1)} | "
                f"{fmt(after / 1024 if after else None, 1)} | "
                f"{fmt(answered)}/{s.idle_conns:,} | {ratio(wc, per)} |"
            )
        add("")
        answered = med("W5", "wirechat", "answered")
        targets.append(
            {
                "target": "W5 < 8 KiB per idle WS, every connection answering",
                "measured": f"{fmt(wc / 1024 if wc else None, 1)} KiB, "
                f"{fmt(answered)}/{s.idle_conns:,} answered",
                "met": None if wc is None else wc < 8192 and answered == s.idle_conns,
                "detail": "",
            }
        )
    if "W6-latency" in res:
        add("## W6 gateway overhead (streaming, 50 chunks, upstream = the raw floor)")
        add("")
        add(
            "The gateway and the upstream share core 0, wrk is on core 1. Latency: 1 "
            f"connection, whole streamed response; throughput: {s.conns} connections. The "
            "gateways get model `openai/echo`, the upstream `echo`."
        )
        add("")
        add("| path | p50 ms (1 conn) | added p50 ms | p99 ms (1 conn) | "
            f"req/s ({s.conns} conns) | wirechat / this |")  # fmt: skip
        add("|---|---:|---:|---:|---:|---:|")
        direct = med("W6-latency", "direct", "p50_ms")
        wc_t = med("W6-throughput", "wirechat-gw", "rps")
        for key in res["W6-latency"]:
            p50 = med("W6-latency", key, "p50_ms")
            added = None if p50 is None or direct is None or key == "direct" else p50 - direct
            rps = med("W6-throughput", key, "rps")
            add(
                f"| {label[key]} | {fmt(p50, 3)} | {fmt(added, 3)} | "
                f"{fmt(med('W6-latency', key, 'p99_ms'), 3)} | {fmt(rps)} | {ratio(wc_t, rps)} |"
            )
        add("")
        wc_p50 = med("W6-latency", "wirechat-gw", "p50_ms")
        fa_p50 = med("W6-latency", "fastapi-gw", "p50_ms")
        added = None if wc_p50 is None or direct is None else wc_p50 - direct
        fa_added = None if fa_p50 is None or direct is None else fa_p50 - direct
        targets.append(
            {
                "target": "W6 < 1 ms added p50 latency",
                "measured": f"{fmt(added, 3)} ms",
                "met": None if added is None else added < 1.0,
                "detail": f"FastAPI+httpx adds {fmt(fa_added, 3)} ms",
            }
        )

    ceiling: list[str] = ["## Load generator ceilings", ""]
    static = med("W3", "static", "rps") if "W3" in res else None
    if static is not None:
        runs = res["W3"]["static"]
        ceiling.append(
            f"* wrk (1 thread, core 1) against a static answer: {fmt(static)} req/s with "
            f"{cpu_pct(runs, 'loadgen_cpu_s')} of a core, about "
            f"{fmt(per_gen_cpu(runs, 'requests'))} requests per wrk CPU-second."
        )
    for workload in w4:
        runs = res[workload].get("raw-ws", [])
        ceiling.append(
            f"* WebSocket client ({workload.split('-')[1]}, core 1) against the trivial raw "
            f"asyncio WS server: {fmt(med(workload, 'raw-ws', 'turns_per_s'))} turns/s with "
            f"{cpu_pct(runs, 'loadgen_cpu_s')} of a core, about "
            f"{fmt(per_gen_cpu(runs, 'turns'))} turns per client CPU-second (its CPU time "
            "includes start-up, connecting and the warm-up)."
        )
    if len(ceiling) > 2:
        lines.extend([*ceiling, ""])

    summary = [
        "## Targets (issue 7)",
        "",
        "Met or not on the measured rates; the CPU-normalized ratio is shown beside.",
        "",
        "| target | measured | met | |",
        "|---|---|---|---|",
    ]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        summary.append(f"| {t['target']} | {t['measured']} | {met} | {t['detail']} |")
    summary.append("")
    errors = [
        f"{workload} {label.get(key, key)}: {sum(r.get('errors', 0) for r in runs)}"
        for workload, by_server in res.items()
        for key, runs in by_server.items()
        if sum(r.get("errors", 0) for r in runs)
    ]
    if errors:
        summary += ["Errors (failed or wrong responses) during the runs: " + "; ".join(errors), ""]
    lines[summary_at:summary_at] = summary
    if suite.floors:
        lines += [
            "## Floors: CPU per request inside one process (`bench/floors.py`)",
            "",
            "No sockets, no event loop: the engine (or h11 alone) driven in a loop on the server",
            "core, best of 5 rounds. A server that did only this could not exceed the last column.",
            "",
            "| what | CPU us | at most per CPU-s |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {micros:.1f} | {1e6 / micros:,.0f} |"
            for name, micros in suite.floors.items()
        ]
        lines.append("")
    data = {
        "conditions": conditions,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
        "labels": label,
        "medians": medians,
        "targets": targets,
        "runs": res,
        "loadavg": suite.loadavg,
        "floors": suite.floors,
    }
    return "\n".join(lines) + "\n", data


def conditions(argv: Sequence[str], pin: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("wirechat", "h11", "wsproto", "uvloop", "fastapi", "uvicorn", "httptools",
                 "websockets", "httpx"):  # fmt: skip
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "?"
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    versions["wrk"] = (wrk_version.split() or ["?"])[1] if wrk_version else "?"
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "argv": " ".join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "git": git,
        "versions": {"wirechat": f"{versions.pop('wirechat')} ({git})", **versions},
        "pinning": (
            "servers on core 0, load generators on core 1 (taskset)"
            if pin
            else "NOT pinned (fewer than 2 cores or --no-pin)"
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run of 2 s per workload")
    parser.add_argument("--runs", type=int, help="runs per workload (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up (default 1; quick 0.5)")
    parser.add_argument("--conns", type=int, default=64, help="connections (W1-W4, W6)")
    parser.add_argument("--idle-conns", type=int, default=5000, help="W5 connections")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help=f"workloads, of {','.join(WORKLOADS)}"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results.md", help="markdown file")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json", help="JSON file")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--no-install", action="store_true", help="do not pip/apt install")
    parser.add_argument("--note", default="", help="a sentence added to the conditions")
    args = parser.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    ensure_tools(not args.no_install)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    logdir = Path(tempfile.mkdtemp(prefix="wirechat-bench-logs-"))
    settings = Settings(
        runs=args.runs or (1 if args.quick else 3),
        duration=args.duration or (2.0 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0),
        conns=args.conns,
        sse_conns=16,
        sse_duration=1.0 if args.quick else 2.0,
        idle_conns=args.idle_conns,
        pin=pin,
        logdir=logdir,
    )
    raise_nofile()
    suite = Suite(settings, only)
    shown = list(sys.argv[1:] if argv is None else argv)
    for index, word in enumerate(shown):  # the note is printed on its own below
        if word == "--note" and index + 1 < len(shown):
            shown[index + 1] = "..."
        elif word.startswith("--note="):
            shown[index] = "--note=..."
    info = conditions(shown, pin)
    if args.note:
        info["note"] = args.note

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        suite.run()
    except KeyboardInterrupt:
        log("interrupted: stopping the servers")
        return 130
    except Exception:
        log(f"failed; server logs in {logdir}")
        raise
    finally:
        stop_all()
    info["suite_seconds"] = round(time.monotonic() - started)
    markdown, data = report(suite, info)
    markdown += f"\nThe suite took {info['suite_seconds']} s.\n"
    args.out.write_text(markdown)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown)
    log(f"written {args.out} and {args.json}")
    shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
