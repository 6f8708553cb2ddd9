"""Load and soak test for wirechat: many streaming clients, injected faults, nothing lost.

Not part of the test suite. It starts ``python -m wirechat serve`` on 127.0.0.1 (or drives
``--url``, which must be a loopback address), then for ``--duration`` seconds runs

* ``--http-clients`` streaming HTTP clients (httpx): echo streams, ``/slow 5`` streams,
  non-streamed completions, ``/v1/models``; and faults: ``/error-mid`` and ``/error``
  requests, deliberate disconnects mid-stream, malformed HTTP requests on raw sockets;
* ``--ws-clients`` ``/chat`` clients (websockets): JSON and MessagePack turns, ``/slow``
  turns, ``stop`` mid-turn, pings; and faults: ``/error-mid`` turns, undecodable or invalid
  frames, deliberate disconnects mid-turn, and (on raw sockets) protocol-violating frames.

Every request or turn must end in one of three ways: a complete and correct answer, the
error the fault calls for, or the disconnect we made on purpose. Anything else is counted
as *unexpected*; a request with no end within ``--request-timeout`` is *hanging*. After the
load, the server's RSS must come back to within ``--rss-slack`` MiB of its level before the
load (after ``--settle`` seconds), its open file descriptors to their starting count, and
(when we started it) it must exit with status 0 on SIGTERM.

    python fuzz/soak.py                            # defaults: 50 + 50 clients, 45 s
    python fuzz/soak.py --duration 300 --http-clients 200 --ws-clients 200
    python fuzz/soak.py --url http://127.0.0.1:8000 --pid 12345

Exit status: 0 when every acceptance check passes, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgpack  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"wirechat listening on (http://\S+)")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
WORDS = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi",
    "chi", "psi", "omega", "wire", "chat", "stream", "token", "model", "gateway",
)  # fmt: skip

# Malformed HTTP requests: each must be refused with a 4xx/5xx status line (PROTOCOL.md §6,
# reference/reliability.md §6). ``close`` says whether the server must also close.
MALFORMED: tuple[tuple[str, bytes, bool], ...] = (
    ("garbage_line", b"GARBAGE\r\n\r\n", True),
    ("http2_line", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", True),
    (
        "cl_and_te",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        True,
    ),
    (
        "bad_content_length",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        True,
    ),
    ("no_host", b"GET /health HTTP/1.1\r\n\r\n", True),
    ("huge_header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (b"a" * 20000), True),
    ("bare_lf", b"GET /health HTTP/1.1\nHost: x\n\n", True),
    (
        "bad_json",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 9\r\n\r\n{not json",
        False,
    ),
    (
        "deep_json",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20000\r\n\r\n" + b"[" * 20000,
        False,
    ),
)

# Frames /chat answers with an error frame, leaving the socket open.
BAD_FRAMES: tuple[tuple[str, str | bytes], ...] = (
    ("invalid_json", "{not json"),
    ("array", "[1, 2, 3]"),
    ("unknown_type", '{"type": "nonsense"}'),
    ("no_content", '{"role": "user"}'),
    ("msgpack_garbage", b"\xc1\xff garbage"),
    ("msgpack_array", b"\x93\x01\x02\x03"),
)


# --- bookkeeping ------------------------------------------------------------------------------


@dataclass
class Stats:
    served: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    deliberate: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    hanging: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)

    def fail(self, kind: str, detail: object) -> None:
        self.unexpected[kind] += 1
        self.samples.setdefault(kind, str(detail)[:300])


class Unexpected(Exception):
    """An answer that is neither correct nor the error the fault calls for."""

    def __init__(self, kind: str, detail: object = "") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def check(condition: bool, kind: str, detail: object = "") -> None:
    if not condition:
        raise Unexpected(kind, detail)


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# --- HTTP clients -----------------------------------------------------------------------------


def completion(text: str, *, stream: bool) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}], "stream": stream}


async def read_sse(response: httpx.Response, limit: int | None = None) -> list[str]:
    """The ``data:`` payloads of a stream (the first ``limit`` content events, if given)."""
    events: list[str] = []
    contents = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            check(line == "", "sse_bad_line", line)
            continue
        events.append(line[len("data: ") :])
        if '"content":"' in line and '"content":""' not in line:
            contents += 1
            if limit is not None and contents >= limit:
                break
    return events


def sse_text(events: list[str]) -> tuple[str, list[str], dict[str, Any] | None]:
    """(content, finish reasons, error object) of a stream's events."""
    text, reasons, error = "", [], None
    for event in events:
        if event == "[DONE]":
            break
        chunk = json.loads(event)
        if "error" in chunk:
            error = chunk["error"]
            continue
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content") or ""
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    return text, reasons, error


class HttpClient:
    def __init__(self, base_url: str, rng: random.Random, stats: Stats) -> None:
        self.base_url = base_url
        self.rng = rng
        self.stats = stats
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        self.ops: list[tuple[str, Callable[[], Awaitable[str]], int]] = [
            ("stream", self.stream, 40),
            ("slow_stream", self.slow_stream, 15),
            ("non_stream", self.non_stream, 10),
            ("models", self.models, 4),
            ("error_mid", self.error_mid, 8),
            ("error_before", self.error_before, 5),
            ("disconnect", self.disconnect, 11),
            ("malformed", self.malformed, 7),
        ]

    async def aclose(self) -> None:
        await self.client.aclose()

    def pick(self) -> tuple[str, Callable[[], Awaitable[str]]]:
        name, op, _ = self.rng.choices(self.ops, weights=[w for *_, w in self.ops])[0]
        return name, op

    async def _stream_ok(self, prompt: str, expected: str) -> None:
        async with self.client.stream(
            "POST", "/v1/chat/completions", json=completion(prompt, stream=True)
        ) as response:
            check(response.status_code == 200, "status", response.status_code)
            events = await read_sse(response)
        check(bool(events) and events[-1] == "[DONE]", "stream_not_done", events[-2:])
        text, reasons, error = sse_text(events)
        check(error is None, "stream_error_event", error)
        check(text == expected, "stream_content", (text[:80], expected[:80]))
        check(reasons == ["stop"], "stream_finish", reasons)

    async def stream(self) -> str:
        text = words(self.rng, 3, 40)
        await self._stream_ok(text, text)
        return "served"

    async def slow_stream(self) -> str:
        text = words(self.rng, 3, 20)
        await self._stream_ok(f"/slow 5 {text}", text)
        return "served"

    async def non_stream(self) -> str:
        text = words(self.rng, 1, 30)
        response = await self.client.post(
            "/v1/chat/completions", json=completion(text, stream=False)
        )
        check(response.status_code == 200, "status", response.status_code)
        content = response.json()["choices"][0]["message"]["content"]
        check(content == text, "content", (content[:80], text[:80]))
        return "served"

    async def models(self) -> str:
        response = await self.client.get("/v1/models")
        check(response.status_code == 200, "status", response.status_code)
        check("echo" in {m["id"] for m in response.json()["data"]}, "models", response.text)
        return "served"

    async def error_mid(self) -> str:
        text = words(self.rng, 2, 6)
        async with self.client.stream(
            "POST", "/v1/chat/completions", json=completion(f"/error-mid 500 {text}", stream=True)
        ) as response:
            check(response.status_code == 200, "status", response.status_code)
            events = await read_sse(response)
        check(bool(events) and events[-1] == "[DONE]", "error_mid_not_done", events[-2:])
        content, reasons, error = sse_text(events)
        check(error is not None, "error_mid_no_error_event", events[-3:])
        check(reasons == [], "error_mid_looks_finished", reasons)
        check(content == text.split()[0] + " ", "error_mid_content", content)
        return "expected"

    async def error_before(self) -> str:
        status = self.rng.choice([429, 503])
        response = await self.client.post(
            "/v1/chat/completions", json=completion(f"/error {status}", stream=True)
        )
        check(response.status_code == status, "status", response.status_code)
        check(response.headers.get("retry-after") == "1", "retry_after", response.headers)
        check(bool(response.json()["error"]["message"]), "error_envelope", response.text)
        return "expected"

    async def disconnect(self) -> str:
        text = words(self.rng, 20, 40)
        async with self.client.stream(
            "POST", "/v1/chat/completions", json=completion(f"/slow 20 {text}", stream=True)
        ) as response:
            check(response.status_code == 200, "status", response.status_code)
            await read_sse(response, limit=self.rng.randint(1, 4))
        # Leaving the block closes the half-read response: the connection is dropped.
        return "deliberate"

    async def malformed(self) -> str:
        name, data, must_close = self.rng.choice(MALFORMED)
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            with contextlib.suppress(ConnectionError):
                writer.write(data)
                await writer.drain()
            head = await reader.readuntil(b"\r\n")
            check(re.match(rb"HTTP/1\.1 [45]\d\d ", head) is not None, f"malformed_{name}", head)
            if must_close:
                rest = await reader.read()  # until the server closes
                while rest:
                    rest = await reader.read()
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            raise Unexpected(f"malformed_{name}_no_answer", exc) from None
        finally:
            writer.transport.abort()
        return "expected"


# --- WebSocket clients ------------------------------------------------------------------------


def ws_url(base_url: str) -> str:
    return "ws" + base_url[len("http") :] + "/chat"


class WsClient:
    def __init__(self, base_url: str, rng: random.Random, stats: Stats, timeout: float) -> None:
        self.url = ws_url(base_url)
        self.rng = rng
        self.stats = stats
        self.timeout = timeout
        self.ws: ClientConnection | None = None
        self.binary = False
        self.thread = ""
        self.turns_on_thread = 0
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.ops: list[tuple[str, Callable[[], Awaitable[str]], int]] = [
            ("turn", self.turn, 45),
            ("slow_turn", self.slow_turn, 10),
            ("ping", self.ping, 7),
            ("stop", self.stop, 5),
            ("error_mid", self.error_mid, 8),
            ("bad_frame", self.bad_frame, 10),
            ("disconnect", self.disconnect, 8),
            ("protocol_violation", self.protocol_violation, 2),
            ("reconnect", self.reconnect, 5),
        ]

    def pick(self) -> tuple[str, Callable[[], Awaitable[str]]]:
        name, op, _ = self.rng.choices(self.ops, weights=[w for *_, w in self.ops])[0]
        return name, op

    async def aclose(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
            self.ws = None

    async def socket(self) -> ClientConnection:
        if self.ws is None:
            # max_queue=None: with websockets' default (16), a client that stops reading
            # mid-turn pauses its socket, so its close() cannot see the server's Close
            # behind the unread chunks and waits out close_timeout (10 s), by no fault of
            # the server.
            self.ws = await connect(self.url, ping_interval=None, max_size=None, max_queue=None)
            self.thread = ""
        return self.ws

    async def send(self, frame: dict[str, Any]) -> None:
        ws = await self.socket()
        await ws.send(msgpack.packb(frame) if self.binary else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        ws = await self.socket()
        raw = await asyncio.wait_for(ws.recv(), self.timeout)
        check(isinstance(raw, bytes) == self.binary, "ws_encoding", type(raw).__name__)
        frame = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
        check(isinstance(frame, dict), "ws_frame_shape", frame)
        return dict(frame)

    def message(self, content: str) -> dict[str, Any]:
        # A client keeps a thread for a while (its history grows), then starts another.
        if not self.thread or self.turns_on_thread >= 20:
            self.thread = f"soak-{self.rng.getrandbits(64):016x}"
            self.turns_on_thread = 0
        self.turns_on_thread += 1
        return {"role": "user", "content": content, "thread_id": self.thread}

    async def _turn(self, prompt: str, expected: str) -> None:
        self.binary = self.rng.random() < 0.2
        await self.send(self.message(prompt))
        text = ""
        while True:
            frame = await self.recv()
            kind = frame.get("type")
            if kind == "chunk":
                if not frame.get("done"):
                    text += frame["content"]
                continue
            check(kind == "message", "ws_turn_frame", frame)
            check(frame.get("role") == "assistant", "ws_turn_role", frame)
            check(frame.get("content") == expected, "ws_final_content", frame.get("content"))
            check(text == expected, "ws_chunk_content", (text[:80], expected[:80]))
            return

    async def turn(self) -> str:
        text = words(self.rng, 1, 30)
        await self._turn(text, text)
        return "served"

    async def slow_turn(self) -> str:
        text = words(self.rng, 2, 15)
        await self._turn(f"/slow 5 {text}", text)
        return "served"

    async def ping(self) -> str:
        self.binary = False
        await self.send({"type": "ping"})
        frame = await self.recv()
        check(frame.get("type") == "pong", "ws_pong", frame)
        return "served"

    async def stop(self) -> str:
        self.binary = False
        await self.send(self.message(f"/slow 50 {words(self.rng, 10, 20)}"))
        first = await self.recv()
        check(first.get("type") == "chunk", "ws_stop_first", first)
        await self.send({"type": "stop"})
        while True:
            frame = await self.recv()
            if frame.get("type") == "generation_stopped":
                break
            check(frame.get("type") == "chunk", "ws_stop_frame", frame)
        # Nothing of the stopped turn may follow: the next frame answers our ping.
        await self.send({"type": "ping"})
        frame = await self.recv()
        check(frame.get("type") == "pong", "ws_after_stop", frame)
        return "served"

    async def error_mid(self) -> str:
        self.binary = False
        text = words(self.rng, 2, 6)
        await self.send(self.message(f"/error-mid 500 {text}"))
        first = await self.recv()
        check(first.get("type") == "chunk", "ws_error_mid_chunk", first)
        check(first.get("content") == text.split()[0] + " ", "ws_error_mid_content", first)
        error = await self.recv()
        check(error.get("type") == "error", "ws_error_mid_error", error)
        return "expected"

    async def bad_frame(self) -> str:
        name, data = self.rng.choice(BAD_FRAMES)
        ws = await self.socket()
        self.binary = isinstance(data, bytes)
        await ws.send(data)
        frame = await self.recv()
        check(frame.get("type") == "error", f"ws_bad_frame_{name}", frame)
        # Still usable.
        self.binary = False
        await self.send({"type": "ping"})
        check((await self.recv()).get("type") == "pong", f"ws_after_bad_frame_{name}")
        return "expected"

    async def disconnect(self) -> str:
        self.binary = False
        await self.send(self.message(f"/slow 20 {words(self.rng, 20, 40)}"))
        for _ in range(self.rng.randint(1, 3)):
            frame = await self.recv()
            check(frame.get("type") == "chunk", "ws_disconnect_chunk", frame)
        ws, self.ws = self.ws, None
        assert ws is not None
        if self.rng.random() < 0.5:
            ws.transport.abort()  # vanish without a Close frame
            return "deliberate"
        began = time.monotonic()
        await asyncio.wait_for(ws.close(), self.timeout)
        waited = time.monotonic() - began
        # websockets gives up after close_timeout (10 s) when our Close is not answered.
        check(ws.protocol.close_rcvd is not None, "ws_close_not_answered", f"{waited:.1f} s")
        check(waited < 5.0, "ws_close_slow", f"{waited:.1f} s")
        return "deliberate"

    async def reconnect(self) -> str:
        await self.aclose()
        await self.socket()
        return "served"

    async def protocol_violation(self) -> str:
        """A raw WebSocket that sends a frame with a reserved bit set: Close 1002, then EOF."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    f"GET /chat HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            check(head.startswith(b"HTTP/1.1 101"), "ws_raw_handshake", head[:60])
            payload = b'{"type":"ping"}'
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            # FIN + RSV1 + text; masked; no extension negotiated, so RSV1 is a violation.
            writer.write(bytes([0x80 | 0x40 | 0x1, 0x80 | len(payload)]) + mask + masked)
            await writer.drain()
            first = await reader.readexactly(2)
            check(first[0] == 0x88, "ws_raw_not_close", first)
            body = await reader.readexactly(first[1] & 0x7F)
            code = struct.unpack("!H", body[:2])[0] if len(body) >= 2 else None
            check(code == 1002, "ws_raw_close_code", code)
            rest = await reader.read()
            while rest:
                rest = await reader.read()
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            raise Unexpected("ws_raw_no_close", exc) from None
        finally:
            writer.transport.abort()
        return "expected"


# --- the run ----------------------------------------------------------------------------------


async def worker(
    prefix: str,
    client: HttpClient | WsClient,
    stats: Stats,
    deadline: float,
    timeout: float,
) -> None:
    while time.monotonic() < deadline:
        name, op = client.pick()
        key = f"{prefix}_{name}"
        began = time.monotonic()
        try:
            outcome = await asyncio.wait_for(op(), timeout)
        except TimeoutError:
            stats.hanging[key] += 1
            if isinstance(client, WsClient):
                await drop(client)
            continue
        except Unexpected as exc:
            stats.fail(f"{key}:{exc.kind}", exc.detail)
        except (ConnectionClosed, InvalidStatus, httpx.HTTPError, OSError) as exc:
            stats.fail(f"{key}:{type(exc).__name__}", exc)
        except Exception as exc:  # a bug in this script or a garbled answer
            stats.fail(f"{key}:{type(exc).__name__}", repr(exc))
        else:
            getattr(stats, outcome)[key] += 1
            stats.latency.setdefault(key, []).append(time.monotonic() - began)
            continue
        if isinstance(client, WsClient):
            await drop(client)  # after anything unexpected, start over on a new socket


async def drop(client: WsClient) -> None:
    ws, client.ws = client.ws, None
    if ws is not None:
        ws.transport.abort()


async def monitor(pid: int | None, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        if pid is not None:
            value = rss_mib(pid)
            if value is not None:
                peak[0] = max(peak[0], value)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def warm_up(base_url: str) -> None:
    """A few requests of every kind, so imports and caches do not count as load."""
    stats = Stats()
    rng = random.Random(0)
    http = HttpClient(base_url, rng, stats)
    ws = WsClient(base_url, rng, stats, 10.0)
    try:
        for op in (http.stream, http.non_stream, http.models, http.error_mid, http.malformed):
            with contextlib.suppress(Exception):
                await op()
        for wop in (ws.turn, ws.ping, ws.error_mid, ws.bad_frame):
            with contextlib.suppress(Exception):
                await wop()
    finally:
        await http.aclose()
        await ws.aclose()


async def soak(
    args: argparse.Namespace, base_url: str, pid: int | None
) -> tuple[Stats, dict[str, Any]]:
    await warm_up(base_url)
    await asyncio.sleep(1.0)
    figures: dict[str, Any] = {"rss_start": rss_mib(pid) if pid else None}
    figures["fds_start"] = open_fds(pid) if pid else None
    stats = Stats()
    master = random.Random(args.seed)
    http_clients = [
        HttpClient(base_url, random.Random(master.getrandbits(64)), stats)
        for _ in range(args.http_clients)
    ]
    ws_clients = [
        WsClient(base_url, random.Random(master.getrandbits(64)), stats, args.request_timeout)
        for _ in range(args.ws_clients)
    ]
    peak = [figures["rss_start"] or 0.0]
    stop = asyncio.Event()
    watcher = asyncio.create_task(monitor(pid, stop, peak))
    server_cpu = cpu_seconds(pid) if pid else None
    client_cpu = time.process_time()
    started = time.monotonic()
    deadline = started + args.duration
    try:
        await asyncio.gather(
            *(worker("http", c, stats, deadline, args.request_timeout) for c in http_clients),
            *(worker("ws", c, stats, deadline, args.request_timeout) for c in ws_clients),
        )
    finally:
        figures["elapsed"] = time.monotonic() - started
        figures["client_cpu"] = time.process_time() - client_cpu
        after = cpu_seconds(pid) if pid else None
        figures["server_cpu"] = after - server_cpu if after and server_cpu is not None else None
        await asyncio.gather(*(c.aclose() for c in http_clients), return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in ws_clients), return_exceptions=True)
    await asyncio.sleep(args.settle)
    stop.set()
    await watcher
    figures["rss_peak"] = peak[0] if pid else None
    figures["rss_end"] = rss_mib(pid) if pid else None
    figures["fds_end"] = open_fds(pid) if pid else None
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        try:
            figures["health"] = (await client.get("/health")).status_code
        except httpx.HTTPError as exc:
            figures["health"] = repr(exc)
    return stats, figures


def start_server(extra: Sequence[str], workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    log = workdir / "server.log"
    argv = [
        sys.executable, "-m", "wirechat", "serve",
        "--host", "127.0.0.1", "--port", "0",
        "--db", str(workdir / "threads.db"),
        "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, cwd=REPO
        )
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    os.set_blocking(process.stdout.fileno(), False)
    buffer = b""
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(BlockingIOError, TypeError):
            buffer += process.stdout.read() or b""
        match = READY.search(buffer.decode("utf-8", "replace"))
        if match:
            return process, match.group(1), log
        time.sleep(0.05)
    process.kill()
    process.wait(5)
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def report(
    args: argparse.Namespace, stats: Stats, figures: dict[str, Any], exit_status: int | None
) -> list[str]:
    """Print the figures; the list of failed acceptance checks."""
    failures: list[str] = []

    def line(label: str, counter: Counter[str]) -> None:
        total = sum(counter.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"
        print(f"  {label:<24}{total:>8}   {detail}")

    print(
        f"wirechat soak: {figures['elapsed']:.1f} s of load, {args.http_clients} HTTP + "
        f"{args.ws_clients} WebSocket clients, seed {args.seed}"
    )
    requests = sum(v for k, v in _all(stats) if k.startswith("http_"))
    turns = sum(v for k, v in _all(stats) if k.startswith("ws_"))
    print(f"  requests (HTTP)         {requests:>8}   turns and frames (/chat) {turns}")
    line("served correctly", stats.served)
    line("expected errors", stats.expected)
    line("deliberate disconnects", stats.deliberate)
    line("unexpected", stats.unexpected)
    line("hanging (lost)", stats.hanging)
    for kind, sample in sorted(stats.samples.items()):
        print(f"    {kind}: {sample}")
    if stats.unexpected:
        failures.append(f"{sum(stats.unexpected.values())} unexpected outcomes")
    if stats.hanging:
        failures.append(f"{sum(stats.hanging.values())} requests hung")
    faults = sum(stats.expected.values()) + sum(stats.deliberate.values())
    print(f"  faults injected         {faults:>8}")
    elapsed = figures["elapsed"]
    server_cpu = figures["server_cpu"]
    print(
        f"  CPU during the load     client {figures['client_cpu'] / elapsed:.0%}"
        + (f", server {server_cpu / elapsed:.0%}" if server_cpu is not None else "")
        + " of one core"
    )
    print("  latency ms (p50/p99/max)")
    for key, values in sorted(stats.latency.items()):
        values.sort()
        p50, p99 = values[len(values) // 2], values[min(len(values) - 1, len(values) * 99 // 100)]
        print(f"    {key:<26}{p50 * 1000:>7.0f}{p99 * 1000:>7.0f}{values[-1] * 1000:>7.0f}")
    start, peak, end = figures["rss_start"], figures["rss_peak"], figures["rss_end"]
    if start is not None and end is not None:
        print(
            f"  server RSS MiB          start {start:.1f}  peak {peak:.1f}  "
            f"end {end:.1f} (after {args.settle:g} s; limit start + {args.rss_slack:g})"
        )
        if end - start > args.rss_slack:
            failures.append(f"RSS {end:.1f} MiB did not return to {start:.1f} + {args.rss_slack}")
    else:
        print("  server RSS              not measured (no --pid)")
    fds_start, fds_end = figures["fds_start"], figures["fds_end"]
    if fds_start is not None and fds_end is not None:
        print(f"  open fds                start {fds_start}  end {fds_end}")
        if fds_end > fds_start + args.fd_slack:
            failures.append(f"open fds {fds_end} > {fds_start} + {args.fd_slack}")
    print(f"  /health after the load  {figures['health']}")
    if figures["health"] != 200:
        failures.append(f"/health answered {figures['health']}")
    if exit_status is not None or args.url is None:
        print(f"  exit status on SIGTERM  {exit_status}")
        if exit_status != 0:
            failures.append(f"exit status {exit_status} after SIGTERM")
    print("ACCEPTED" if not failures else "FAILED: " + "; ".join(failures))
    return failures


def _all(stats: Stats) -> list[tuple[str, int]]:
    return [
        item
        for counter in (stats.served, stats.expected, stats.deliberate, stats.unexpected)
        for item in counter.items()
    ] + list(stats.hanging.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="drive this server (loopback only) instead of starting one")
    parser.add_argument("--pid", type=int, help="the --url server's pid, for RSS and fds")
    parser.add_argument("--http-clients", type=int, default=50)
    parser.add_argument("--ws-clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the end RSS")
    parser.add_argument("--request-timeout", type=float, default=20.0)
    parser.add_argument("--rss-slack", type=float, default=20.0, help="MiB above the start")
    parser.add_argument("--fd-slack", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra argument for the server"
    )
    args = parser.parse_args(argv)
    if args.url is not None:
        host = urlsplit(args.url).hostname or ""
        if host not in LOOPBACK:
            parser.error("--url must be a loopback address (127.0.0.1, localhost or ::1)")
        args.url = args.url.rstrip("/")
    if args.duration <= 0 or args.http_clients < 0 or args.ws_clients < 0:
        parser.error("--duration must be positive and the client counts not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wirechat-soak-") as tmp:
        process: subprocess.Popen[bytes] | None = None
        log: Path | None = None
        if args.url is None:
            process, base_url, log = start_server(args.server_arg, Path(tmp))
            pid: int | None = process.pid
        else:
            base_url, pid = args.url, args.pid
        exit_status: int | None = None
        try:
            stats, figures = asyncio.run(soak(args, base_url, pid))
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                try:
                    exit_status = process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    exit_status = process.wait(5)
        failures = report(args, stats, figures, exit_status)
        if failures and log is not None:
            print("--- server log (tail) ---")
            print(log.read_text(errors="replace")[-3000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
