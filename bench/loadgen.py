"""Asyncio load generators (uvloop, raw ``asyncio.Protocol`` sockets, no client library):

* ``sse``: W2's streaming completions, closed loop over N keep-alive connections; measures
  time to first byte and whole-response latency, counts SSE events, and checks the first
  response of every connection in full (status, events, the text they join to).
* ``ws-turns``: W4's ``/chat`` turns, closed loop over N connections, JSON (text frames) or
  MessagePack (binary frames); every frame is decoded and every turn checked (50 chunks, one
  done chunk, then the final assistant message).
* ``ws-idle``: W5: opens N WebSocket connections, reads the server's RSS before and after
  (``/proc/PID/status``), then sends ``{"type": "ping"}`` on each and counts the pongs.

Each prints one JSON object on stdout. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import msgpack  # type: ignore[import-untyped, unused-ignore]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PING_JSON,
    TEXT,
    WORDS,
    chat_message,
    client_frame,
    completion_body,
    install_uvloop,
    parse_frames,
    proc_cpu_seconds,
    raise_nofile,
    ws_handshake,
)

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

_unpack: Callable[[bytes], Any] = msgpack.unpackb


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


class Clock:
    """The measuring window: [start + warmup, start + warmup + duration).

    With a server ``pid``, the server's CPU time over the window is sampled too (the loop
    runs the samples at the window's edges).
    """

    def __init__(self, warmup: float, duration: float, pid: int = 0) -> None:
        now = time.perf_counter()
        self.begin = now + warmup
        self.end = self.begin + duration
        self.cpu: list[float] = []
        if pid:
            loop = asyncio.get_running_loop()
            offset = loop.time() - now
            for at in (self.begin, self.end):
                loop.call_at(at + offset, lambda: self.cpu.append(proc_cpu_seconds(pid)))

    def server_cpu(self) -> float | None:
        return round(self.cpu[1] - self.cpu[0], 3) if len(self.cpu) == 2 else None

    def counting(self, t: float) -> bool:
        return self.begin <= t < self.end


# --- SSE ---------------------------------------------------------------------------------


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def check_sse(response: bytes) -> str | None:
    """None when ``response`` is a correct W2 stream, else what is wrong."""
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return f"status line {head[:40]!r}"
    if b"chunked" not in head.lower():
        return "not chunked"
    events = [e for e in _dechunk(body).split(b"\n\n") if e.strip()]
    if events[-1] != b"data: [DONE]":
        return "no [DONE]"
    parts: list[str] = []
    for event in events[:-1]:
        chunk = json.loads(event.removeprefix(b"data: "))
        for choice in chunk.get("choices", []):
            content = choice.get("delta", {}).get("content")
            if content:
                parts.append(content)
    if len(parts) != WORDS or "".join(parts) != TEXT:
        return f"{len(parts)} content chunks"
    return None


class SSEClient(asyncio.Protocol):
    def __init__(self, request: bytes, clock: Clock, stats: dict[str, Any]) -> None:
        self.request = request
        self.clock = clock
        self.stats = stats
        self.buf = bytearray()
        self.sent = 0.0
        self.first = 0.0
        self.checked = False
        self.transport: asyncio.Transport | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.buf.clear()
        self.first = 0.0
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        self.buf += data
        if not self.buf.endswith(b"\r\n0\r\n\r\n"):
            return
        now = time.perf_counter()
        response = bytes(self.buf)
        if not self.checked:
            self.checked = True
            problem = check_sse(response)
            if problem is not None:
                self.stats["errors"] += 1
                self.stats.setdefault("problems", []).append(problem)
        if self.clock.counting(now):
            self.stats["responses"] += 1
            self.stats["events"] += response.count(b"data: ")
            self.stats["ttfb"].append(self.first - self.sent)
            self.stats["latency"].append(now - self.sent)
        if now < self.clock.end:
            self._send()
        else:
            self._done()

    def _done(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.stats["errors"] += 1
            self.finished.set_result(None)


async def run_sse(args: argparse.Namespace) -> dict[str, Any]:
    body = completion_body(stream=True, model=args.model)
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    stats: dict[str, Any] = {"responses": 0, "events": 0, "errors": 0, "ttfb": [], "latency": []}
    clock = Clock(args.warmup, args.duration, args.pid)
    loop = asyncio.get_running_loop()
    clients: list[SSEClient] = []
    for _ in range(args.conns):
        _, proto = await loop.create_connection(
            lambda: SSEClient(request, clock, stats), args.host, args.port
        )
        clients.append(proto)
    await asyncio.wait(
        [c.finished for c in clients], timeout=args.warmup + args.duration + args.grace
    )
    for client in clients:
        client._done()
    ttfb, latency = stats.pop("ttfb"), stats.pop("latency")
    seconds = args.duration
    return {
        **stats,
        "conns": args.conns,
        "seconds": seconds,
        "rps": stats["responses"] / seconds,
        "content_chunks_per_s": stats["responses"] * WORDS / seconds,
        "events_per_response": stats["events"] / stats["responses"] if stats["responses"] else 0,
        "server_cpu_window_s": clock.server_cpu(),
        "ttfb_p50_ms": _ms(percentile(ttfb, 50)),
        "ttfb_p99_ms": _ms(percentile(ttfb, 99)),
        "latency_p50_ms": _ms(percentile(latency, 50)),
        "latency_p99_ms": _ms(percentile(latency, 99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# --- WebSocket ---------------------------------------------------------------------------


class WSClient(asyncio.Protocol):
    """One WebSocket connection: handshake, then whatever the workload does with frames."""

    def __init__(self, handshake: tuple[bytes, bytes]) -> None:
        self.handshake_request, self.accept = handshake
        self.buf = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[bool] = loop.create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self.handshake_request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            ok = head.startswith(b"HTTP/1.1 101") and self.accept in head
            self.open = ok
            if not self.opened.done():
                self.opened.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
            self.on_open()
        for opcode, payload in parse_frames(self.buf):
            if opcode == OP_PING:
                assert self.transport is not None
                self.transport.write(client_frame(OP_PONG, payload))
            elif opcode in (OP_TEXT, OP_BINARY):
                self.on_message(_loads(payload) if opcode == OP_TEXT else _unpack(payload))
            elif opcode == OP_CLOSE:
                self.closed = True
                assert self.transport is not None
                self.transport.close()
            elif opcode != OP_PONG:
                self.on_error(f"unexpected opcode {opcode:#x}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(False)
        self.on_lost()

    def send(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.open:
                self.transport.write(client_frame(OP_CLOSE, b"\x03\xe8"))
            self.transport.close()

    def on_open(self) -> None:
        pass

    def on_message(self, message: Any) -> None:
        pass

    def on_error(self, problem: str) -> None:
        pass

    def on_lost(self) -> None:
        pass


class TurnClient(WSClient):
    def __init__(
        self,
        handshake: tuple[bytes, bytes],
        frame: bytes,
        clock: Clock,
        stats: dict[str, Any],
    ) -> None:
        super().__init__(handshake)
        self.frame = frame
        self.clock = clock
        self.stats = stats
        self.chunks = 0
        self.done_chunks = 0
        self.sent = 0.0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_open(self) -> None:
        self._turn()

    def _turn(self) -> None:
        self.chunks = 0
        self.done_chunks = 0
        self.sent = time.perf_counter()
        self.send(self.frame)

    def on_message(self, message: Any) -> None:
        kind = message.get("type")
        if kind == "chunk":
            if message.get("done"):
                self.done_chunks += 1
            else:
                self.chunks += 1
            return
        if kind != "message" or message.get("role") != "assistant":
            self.on_error(f"unexpected frame {str(message)[:80]}")
            return
        now = time.perf_counter()
        if self.chunks != WORDS or self.done_chunks != 1 or message.get("content") != TEXT:
            self.on_error(f"turn with {self.chunks} chunks, {self.done_chunks} done")
        if self.clock.counting(now):
            self.stats["turns"] += 1
            self.stats["frames"] += self.chunks + self.done_chunks + 1
            self.stats["latency"].append(now - self.sent)
        if now < self.clock.end:
            self._turn()
        elif not self.finished.done():
            self.finished.set_result(None)

    def on_error(self, problem: str) -> None:
        self.stats["errors"] += 1
        problems = self.stats.setdefault("problems", [])
        if len(problems) < 5:
            problems.append(problem)

    def on_lost(self) -> None:
        if not self.finished.done():
            self.on_error("connection lost")
            self.finished.set_result(None)


async def _open_all(
    factory: Callable[[], WSClient], host: str, port: int, count: int, parallel: int
) -> tuple[list[WSClient], int]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(parallel)
    failures = 0

    async def one() -> WSClient | None:
        nonlocal failures
        async with gate:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(factory, host, port), timeout=10
                )
                assert isinstance(proto, WSClient)
                if await asyncio.wait_for(proto.opened, timeout=10):
                    return proto
                proto.close()
            except (TimeoutError, OSError):
                pass
            failures += 1
            return None

    results = await asyncio.gather(*(one() for _ in range(count)))
    return [c for c in results if c is not None], failures


async def run_ws_turns(args: argparse.Namespace) -> dict[str, Any]:
    opcode = OP_TEXT if args.encoding == "json" else OP_BINARY
    frame = client_frame(opcode, chat_message(args.encoding))
    stats: dict[str, Any] = {"turns": 0, "frames": 0, "errors": 0, "latency": []}
    clock = Clock(args.warmup, args.duration, args.pid)

    def factory() -> WSClient:
        return TurnClient(ws_handshake(args.host, args.port, args.path), frame, clock, stats)

    started = time.perf_counter()
    clients, failures = await _open_all(factory, args.host, args.port, args.conns, args.conns)
    if time.perf_counter() > clock.begin:
        stats["note"] = "connections took longer than the warm-up"
    turn_clients = [c for c in clients if isinstance(c, TurnClient)]
    remaining = clock.end - time.perf_counter() + args.grace
    if turn_clients:
        await asyncio.wait([c.finished for c in turn_clients], timeout=max(remaining, 0.1))
    for client in clients:
        client.close()
    latency = stats.pop("latency")
    return {
        **stats,
        "conns": len(clients),
        "connect_failures": failures,
        "encoding": args.encoding,
        "seconds": args.duration,
        "turns_per_s": stats["turns"] / args.duration,
        "frames_per_s": stats["frames"] / args.duration,
        "server_cpu_window_s": clock.server_cpu(),
        "turn_p50_ms": _ms(percentile(latency, 50)),
        "turn_p99_ms": _ms(percentile(latency, 99)),
        "wall_s": round(time.perf_counter() - started, 2),
    }


class IdleClient(WSClient):
    def __init__(self, handshake: tuple[bytes, bytes], stats: dict[str, Any]) -> None:
        super().__init__(handshake)
        self.stats = stats
        self.ponged: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, message: Any) -> None:
        if message.get("type") == "pong" and not self.ponged.done():
            self.stats["pongs"] += 1
            self.ponged.set_result(None)

    def on_lost(self) -> None:
        self.stats["lost"] += 1
        if not self.ponged.done():
            self.ponged.set_result(None)


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and of its child processes (wirechat --workers forks)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


async def run_ws_idle(args: argparse.Namespace) -> dict[str, Any]:
    stats: dict[str, Any] = {"pongs": 0, "lost": 0}
    ping = client_frame(OP_TEXT, PING_JSON)

    def factory() -> WSClient:
        return IdleClient(ws_handshake(args.host, args.port, args.path), stats)

    # Warm up: let the server import and allocate whatever a first connection needs.
    warm, _ = await _open_all(factory, args.host, args.port, 20, 20)
    for client in warm:
        client.send(ping)
    await asyncio.wait([c.ponged for c in warm if isinstance(c, IdleClient)], timeout=5)
    for client in warm:
        client.close()
    await asyncio.sleep(1.0)
    stats.update(pongs=0, lost=0)
    before = rss_kib(args.pid)
    started = time.perf_counter()
    clients, failures = await _open_all(factory, args.host, args.port, args.conns, args.parallel)
    connect_s = time.perf_counter() - started
    await asyncio.sleep(args.settle)
    after = rss_kib(args.pid)
    opened = len(clients)
    started = time.perf_counter()
    for client in clients:
        client.send(ping)
    idle = [c.ponged for c in clients if isinstance(c, IdleClient)]
    if idle:
        await asyncio.wait(idle, timeout=args.grace + 10)
    ping_s = time.perf_counter() - started
    after_ping = rss_kib(args.pid)
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)
    return {
        "conns": args.conns,
        "opened": opened,
        "connect_failures": failures,
        "connect_s": round(connect_s, 2),
        "rss_before_kib": before,
        "rss_idle_kib": after,
        "rss_after_ping_kib": after_ping,
        "bytes_per_conn": round((after - before) * 1024 / max(opened, 1)),
        "bytes_per_conn_after_ping": round((after_ping - before) * 1024 / max(opened, 1)),
        "answered": stats["pongs"],
        "lost": stats["lost"],
        "ping_all_s": round(ping_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["sse", "ws-turns", "ws-idle"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default=None)
    parser.add_argument("--model", default="echo")
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--grace", type=float, default=5.0, help="wait for in-flight work")
    parser.add_argument("--encoding", choices=["json", "msgpack"], default="json")
    parser.add_argument("--pid", type=int, default=0, help="the server's pid (CPU, RSS)")
    parser.add_argument("--parallel", type=int, default=200, help="ws-idle: handshakes at once")
    parser.add_argument("--settle", type=float, default=1.0, help="ws-idle: before reading RSS")
    args = parser.parse_args()
    if args.path is None:
        args.path = "/v1/chat/completions" if args.mode == "sse" else "/chat"
    raise_nofile()
    install_uvloop()
    runner = {"sse": run_sse, "ws-turns": run_ws_turns, "ws-idle": run_ws_idle}[args.mode]
    result = asyncio.run(asyncio.wait_for(runner(args), timeout=args.duration + 120))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
