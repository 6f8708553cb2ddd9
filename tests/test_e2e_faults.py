"""Fault survival end to end: the real server when its provider, tools, store, clients or
its own process misbehave (issue 6 items 3 and 4; reference/reliability.md §5 and §6).

The misbehaving pieces are ours: ``faulty_upstream.py`` (an OpenAI-compatible upstream that
hangs or drops the connection; the gateway reaches it as ``openai/<behaviour>``) and
``faulty_tools.py`` (tools that raise, hang or are slow). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import resource
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ServerFactory, ServerProcess, running_server
from faulty_upstream import FaultyUpstream
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TESTS = Path(__file__).resolve().parent
TIMEOUT = 10.0
# The gateway's provider and tool timeouts, in seconds (short, so each fault costs ~1 s).
FAULT_TIMEOUT = 1.0
Frame = dict[str, Any]


def cancelled(model: str) -> str:
    """The transport's debug line when a provider call is cancelled."""
    return rf"provider call \d+ for {model} cancelled"


def tools_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Server environment that can import ``faulty_tools``."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **(extra or {})}


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def run(main: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


# --- module servers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(server_dir: Path, upstream: FaultyUpstream) -> Iterator[ServerProcess]:
    """echo plus the faulty upstream as ``openai``; faulty tools; 1 s fault timeouts."""
    log_path = Path(tempfile.mkdtemp(prefix="faults-", dir=server_dir)) / "server.log"
    args = [
        "--log-level", "debug",
        "--db", ":memory:",
        "--tools", "faulty_tools:TOOLS",
        "--provider-first-item-timeout", str(FAULT_TIMEOUT),
        "--provider-idle-timeout", str(FAULT_TIMEOUT),
        "--tool-timeout", str(FAULT_TIMEOUT),
    ]  # fmt: skip
    env = tools_env({"OPENAI_BASE_URL": upstream.base_url})
    with running_server(args, log_path=log_path, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def relay(server_dir: Path, upstream: FaultyUpstream) -> Iterator[ServerProcess]:
    """The faulty upstream as ``openai``, with a 1 s send timeout and the default provider
    timeouts (a provider idle timeout shorter than the send timeout would end a stream to a
    slow reader first, and blame the model)."""
    log_path = Path(tempfile.mkdtemp(prefix="relay-", dir=server_dir)) / "server.log"
    args = ["--log-level", "debug", "--db", ":memory:", "--send-timeout", str(FAULT_TIMEOUT)]
    env = {"OPENAI_BASE_URL": upstream.base_url}
    with running_server(args, log_path=log_path, env=env) as srv:
        yield srv


# --- HTTP and WebSocket helpers -------------------------------------------------------------


def body(model: str, text: str, *, stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        **extra,
    }


async def sse(client: httpx.AsyncClient, payload: dict[str, Any]) -> tuple[int, list[str]]:
    """POST a streaming completion; the status and every ``data:`` payload, in order."""
    events: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, [response.text]
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    return 200, events


def streamed_text(events: list[str]) -> str:
    text = ""
    for event in events:
        if event == "[DONE]":
            break
        for choice in json.loads(event).get("choices", []):
            text += choice["delta"].get("content") or ""
    return text


def finish_reasons(events: list[str]) -> list[str]:
    reasons = []
    for event in events:
        if event == "[DONE]":
            break
        for choice in json.loads(event).get("choices", []):
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    return reasons


def assert_error_then_done(events: list[str]) -> dict[str, Any]:
    """A stream that failed mid-way: an error event, then ``[DONE]``, never a clean finish."""
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])
    assert set(error) == {"error"}, error
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    assert finish_reasons(events) == [], "a failed stream must not look finished"
    assert events.count("[DONE]") == 1
    return dict(error["error"])


def ws_url(srv: ServerProcess, query: str = "") -> str:
    return f"ws://{srv.host}:{srv.port}/chat{query}"


async def recv(ws: ClientConnection, timeout: float = TIMEOUT) -> Frame:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    frame = json.loads(raw)
    assert isinstance(frame, dict)
    return frame


async def turn(ws: ClientConnection, frame: Frame, timeout: float = TIMEOUT) -> list[Frame]:
    """Send a chat message; the frames up to the final assistant message or an error."""
    await ws.send(json.dumps(frame))
    frames: list[Frame] = []
    while True:
        reply = await recv(ws, timeout)
        frames.append(reply)
        if reply["type"] == "error":
            return frames
        final = reply["type"] == "message" and reply["role"] == "assistant"
        if final and not reply.get("tool_calls"):
            return frames


def chat_text(frames: list[Frame]) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "chunk" and not f["done"])


def final_messages(frames: list[Frame]) -> list[Frame]:
    return [
        f
        for f in frames
        if f["type"] == "message" and f["role"] == "assistant" and not f.get("tool_calls")
    ]


def raw_request(method: str, target: str, payload: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}"
    if payload:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode("latin-1") + b"\r\n" + payload


def read_until(sock: socket.socket, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {data[-500:]!r}"
        data += chunk
    return data


# --- the provider raising -------------------------------------------------------------------


def test_provider_raising_over_http(gateway: ServerProcess) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=TIMEOUT) as client:
            for stream in (False, True):
                before = await client.post(
                    "/v1/chat/completions", json=body("echo", "/error 500", stream=stream)
                )
                assert before.status_code == 502
                assert before.json()["error"]["message"] == "Injected upstream error 500"
            status, events = await sse(client, body("echo", "/error-mid 500 x y", stream=True))
            assert status == 200
            assert streamed_text(events) == "x "
            assert "after the first token" in assert_error_then_done(events)["message"]
            whole = await client.post(
                "/v1/chat/completions", json=body("echo", "/error-mid 500 x y", stream=False)
            )
            assert whole.status_code == 502
            # The same pooled connection goes on serving.
            fine = await client.post("/v1/chat/completions", json=body("echo", "ok", stream=False))
            assert fine.json()["choices"][0]["message"]["content"] == "ok"

    run(main)


def test_provider_raising_on_chat_is_an_error_frame_and_the_socket_stays_usable(
    gateway: ServerProcess,
) -> None:
    async def main() -> None:
        async with connect(ws_url(gateway)) as ws:
            frames = await turn(ws, {"role": "user", "content": "/error 500"})
            assert [f["type"] for f in frames] == ["error"]
            assert frames[0]["message"] == "Injected upstream error 500"
            frames = await turn(ws, {"role": "user", "content": "/error-mid 500 one two"})
            assert [f["type"] for f in frames] == ["chunk", "error"]
            assert chat_text(frames) == "one "
            assert "after the first token" in frames[-1]["message"]
            again = await turn(ws, {"role": "user", "content": "still serving"})
            assert final_messages(again)[0]["content"] == "still serving"

    run(main)


# --- the provider hanging -------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["hang-head", "hang-first"])
def test_first_item_timeout_fires_and_closes_the_upstream(
    gateway: ServerProcess, upstream: FaultyUpstream, behaviour: str
) -> None:
    model = f"openai/{behaviour}"
    closed_before = upstream.closed(behaviour)

    async def over_http(client: httpx.AsyncClient, stream: bool) -> float:
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json=body(model, "hi", stream=stream))
        elapsed = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "timeout"
        return elapsed

    async def over_chat() -> float:
        async with connect(ws_url(gateway)) as ws:
            started = time.monotonic()
            frames = await turn(ws, {"role": "user", "content": "hi", "model": model})
            elapsed = time.monotonic() - started
            assert [f["type"] for f in frames] == ["error"]
            assert frames[0]["error_type"] == "timeout"
            # The socket is still good for the next turn.
            again = await turn(ws, {"role": "user", "content": "after the timeout"})
            assert final_messages(again)[0]["content"] == "after the timeout"
            return elapsed

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=TIMEOUT) as client:
            elapsed = await asyncio.gather(
                over_http(client, False), over_http(client, True), over_chat()
            )
        for seconds in elapsed:
            assert FAULT_TIMEOUT * 0.9 <= seconds < FAULT_TIMEOUT + 2.0, elapsed

    run(main)
    # Each of the three upstream requests is closed, not left hanging.
    closed_at = upstream.wait_closed(behaviour, count=closed_before + 3, timeout=2.0)
    assert closed_at is not None, f"{upstream.closed(behaviour) - closed_before} of 3 closed"
    assert gateway.count(cancelled(model)) >= 3


def test_idle_timeout_mid_stream_ends_with_error_event_and_done(
    gateway: ServerProcess, upstream: FaultyUpstream
) -> None:
    model = "openai/hang-mid"
    closed_before = upstream.closed("hang-mid")

    async def over_http() -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=TIMEOUT) as client:
            status, events = await sse(client, body(model, "hi", stream=True))
        assert status == 200
        assert streamed_text(events) == "a "
        assert assert_error_then_done(events)["code"] == "timeout"

    async def over_chat() -> None:
        async with connect(ws_url(gateway)) as ws:
            frames = await turn(ws, {"role": "user", "content": "hi", "model": model})
            assert [f["type"] for f in frames] == ["chunk", "error"]
            assert frames[-1]["error_type"] == "timeout"
            assert final_messages(frames) == []

    async def main() -> None:
        await asyncio.gather(over_http(), over_chat())

    run(main)
    assert upstream.wait_closed("hang-mid", count=closed_before + 2, timeout=2.0) is not None


# --- the upstream dropping the connection mid-stream ----------------------------------------


@pytest.mark.parametrize("behaviour", ["drop-mid", "reset-mid"])
def test_upstream_disconnect_mid_stream_is_an_error_never_a_clean_end(
    gateway: ServerProcess, behaviour: str
) -> None:
    model = f"openai/{behaviour}"

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=TIMEOUT) as client:
            status, events = await sse(client, body(model, "hi", stream=True))
            assert status == 200
            assert streamed_text(events) == "a "
            assert assert_error_then_done(events)["code"] == "upstream_disconnected"
            whole = await client.post("/v1/chat/completions", json=body(model, "hi", stream=False))
            assert whole.status_code == 502
        async with connect(ws_url(gateway)) as ws:
            frames = await turn(ws, {"role": "user", "content": "hi", "model": model})
            assert [f["type"] for f in frames] == ["chunk", "error"]
            assert frames[-1]["error_type"] == "upstream_disconnected"

    run(main)
    # The official client raises instead of returning a truncated answer as complete.
    api = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass


# --- the client going away ------------------------------------------------------------------


def test_http_client_disconnect_closes_the_upstream_at_once(
    gateway: ServerProcess, upstream: FaultyUpstream
) -> None:
    model = "openai/hang-mid"
    closed_before = upstream.closed("hang-mid")
    cancels_before = gateway.count(cancelled(model))
    payload = json.dumps(body(model, "hi", stream=True)).encode()
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", payload))
        read_until(sock, b'"content":"a "')
    left_at = time.monotonic()
    closed_at = upstream.wait_closed("hang-mid", count=closed_before + 1, timeout=2.0)
    assert closed_at is not None
    # Well before the 1 s idle timeout: the disconnect itself closed the upstream request.
    assert closed_at - left_at < FAULT_TIMEOUT / 2
    assert gateway.wait_for_log(cancelled(model), count=cancels_before + 1, timeout=1.0)
    assert httpx.get(f"{gateway.base_url}/health", timeout=TIMEOUT).status_code == 200


def test_chat_client_disconnect_mid_turn_cancels_the_provider(gateway: ServerProcess) -> None:
    before = gateway.count(cancelled("echo"))

    async def main() -> None:
        async with connect(ws_url(gateway)) as ws:
            await ws.send(json.dumps({"role": "user", "content": "/slow 200 a b c d e f g h"}))
            first = await recv(ws)
            assert first["type"] == "chunk" and first["content"] == "a "
        left_at = time.monotonic()
        assert gateway.wait_for_log(cancelled("echo"), count=before + 1, timeout=1.0)
        assert time.monotonic() - left_at < 1.0
        async with connect(ws_url(gateway)) as ws:
            frames = await turn(ws, {"role": "user", "content": "next client"})
            assert final_messages(frames)[0]["content"] == "next client"

    run(main)


# --- tools raising, hanging, slow -----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "ok", "expected"),
    [
        ('explode {"reason": "on purpose"}', False, "ToolExploded: tool exploded: on purpose"),
        ("hang {}", False, f"Tool hang timed out after {FAULT_TIMEOUT:g} seconds"),
        ('slow {"seconds": 0.2}', True, "slept 0.2"),
    ],
)
def test_tool_failure_is_a_tool_result_and_the_turn_completes(
    gateway: ServerProcess, call: str, ok: bool, expected: str
) -> None:
    name = call.split()[0]

    async def main() -> None:
        async with connect(ws_url(gateway)) as ws:
            started = time.monotonic()
            frames = await turn(ws, {"role": "user", "content": f"/tool {call}", "tools": [name]})
            elapsed = time.monotonic() - started
            result = next(f for f in frames if f["type"] == "tool_result")
            assert result["name"] == name and result["ok"] is ok
            if ok:
                assert result["result"] == expected
            else:
                assert result["error"] == expected
            assert not any(f["type"] == "error" for f in frames)
            final = final_messages(frames)
            assert len(final) == 1 and final[0]["content"].startswith(f"tool {name} returned: ")
            assert elapsed < FAULT_TIMEOUT + 2.0
            # The connection serves the next turn.
            again = await turn(ws, {"role": "user", "content": "after the tool"})
            assert final_messages(again)[0]["content"] == "after the tool"

    run(main)


def test_a_hung_sync_tool_does_not_keep_the_server_from_exiting(
    server_factory: ServerFactory,
) -> None:
    # A sync tool runs in a worker thread, which no timeout can stop. Its turn is answered
    # at the tool timeout; SIGTERM must still end the process within the grace period.
    srv = server_factory(
        "--db", ":memory:",
        "--tools", "faulty_tools:SYNC_HANG_TOOLS",
        "--tool-timeout", "0.5",
        "--shutdown-grace", "1",
        env=tools_env(),
    )  # fmt: skip

    async def main() -> None:
        async with connect(ws_url(srv)) as ws:
            frames = await turn(
                ws, {"role": "user", "content": "/tool hang_sync {}", "tools": ["hang_sync"]}
            )
        result = next(f for f in frames if f["type"] == "tool_result")
        assert result["ok"] is False and "timed out" in result["error"]
        assert len(final_messages(frames)) == 1

    try:
        run(main)
        srv.signal(signal.SIGTERM)
        assert srv.wait(4.0) == 0, "still running 4 s after SIGTERM (grace 1 s)"
    finally:
        srv.kill()  # when it hangs: do not wait for the fixture's 10 s stop timeout


# --- the thread store failing a write -------------------------------------------------------


def _limit_file_size(pid: int, size: int) -> None:
    """Writes by ``pid`` that would grow a file beyond ``size`` bytes fail with EFBIG.

    Works as root too (unlike chmod): RLIMIT_FSIZE binds every process, and CPython ignores
    SIGXFSZ, so SQLite sees the failed write() and reports an I/O error. Only the soft
    limit is changed, so it can be raised again without privileges.
    """
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, hard))


def test_store_write_failure_reaches_the_client(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs resource.prlimit (Linux)")
    db = tmp_path / "threads.db"
    # warning: the access log stays small, since the file size limit binds the log file too.
    srv = server_factory("--db", str(db), "--log-level", "warning")
    thread = {"thread_id": "t-store"}

    async def main() -> None:
        async with connect(ws_url(srv)) as ws:
            first = await turn(ws, {"role": "user", "content": "stored", **thread})
            assert final_messages(first)[0]["content"] == "stored"
            wal = Path(f"{db}-wal")
            assert wal.exists(), "expected SQLite's WAL journal"

            # Saving the answer fails: the client hears an error instead of the final message.
            await ws.send(json.dumps({"role": "user", "content": "/slow 300 a b c", **thread}))
            frames = [await recv(ws)]
            assert frames[0]["type"] == "chunk"
            _limit_file_size(srv.pid, wal.stat().st_size)
            try:
                while frames[-1]["type"] not in ("error", "message"):
                    frames.append(await recv(ws))
                assert frames[-1] == {
                    "type": "error",
                    "message": "Could not save the conversation",
                    "thread_id": "t-store",
                }
                assert chat_text(frames) == "a b c"
                assert final_messages(frames) == []

                # Opening the thread (a write too) fails the same way, before any generation.
                refused = await turn(ws, {"role": "user", "content": "lost?", **thread})
                assert [f["type"] for f in refused] == ["error"]
                assert refused[0]["message"] == "Could not open the thread"
            finally:
                _limit_file_size(srv.pid, resource.RLIM_INFINITY)

            # The store recovers, and holds exactly what it told the client it holds: the
            # first exchange and the user message of the failed turn (stored when the turn
            # opened), neither the unsaved answer nor the refused message.
            history = await turn(ws, {"role": "user", "content": "/history", **thread})
            assert final_messages(history)[0]["content"] == "history: 3 messages"

    run(main)
    assert srv.wait_for_log("saving to thread t-store failed")
    assert srv.wait_for_log("opening thread t-store failed")


# --- SIGTERM with a /chat turn in flight ----------------------------------------------------


def test_sigterm_lets_a_chat_turn_finish_then_closes_1001(server_factory: ServerFactory) -> None:
    srv = server_factory("--db", ":memory:", "--shutdown-grace", "5")

    async def main() -> None:
        async with connect(ws_url(srv)) as busy, connect(ws_url(srv)) as idle:
            await busy.send(json.dumps({"role": "user", "content": "/slow 150 a b c d e"}))
            frames = [await recv(busy)]
            srv.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            # New connections are refused while the turn goes on.
            with pytest.raises(OSError):
                socket.create_connection((srv.host, srv.port), timeout=1.0).close()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(await recv(busy))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert chat_text(frames) == "a b c d e"
            assert [f["content"] for f in final_messages(frames)] == ["a b c d e"]
            assert not any(f["type"] == "error" for f in frames)
            with pytest.raises(ConnectionClosed) as idle_closed:
                await recv(idle)
            assert idle_closed.value.rcvd is not None and idle_closed.value.rcvd.code == 1001

    run(main)
    assert srv.wait(3.0) == 0


def test_sigterm_grace_expiry_ends_a_chat_turn_with_1001(server_factory: ServerFactory) -> None:
    srv = server_factory("--db", ":memory:", "--shutdown-grace", "0.5", "--log-level", "debug")

    async def main() -> None:
        async with connect(ws_url(srv)) as ws:
            await ws.send(json.dumps({"role": "user", "content": "/slow 400 a b c d e f g h"}))
            frames = [await recv(ws)]
            signalled = time.monotonic()
            srv.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(await recv(ws))
            assert time.monotonic() - signalled < 2.0
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            assert final_messages(frames) == []  # cut short: never presented as complete

    run(main)
    assert srv.wait_for_log(cancelled("echo"), timeout=1.0)
    assert srv.wait(3.0) == 0


# --- memory under slow readers and big requests ---------------------------------------------


def test_slow_readers_are_dropped_memory_stays_bounded_upstreams_closed(
    relay: ServerProcess, upstream: FaultyUpstream
) -> None:
    """Clients that never read an endless upstream stream: the gateway relays only as fast
    as each client reads, drops each after --send-timeout, and closes its upstream request."""
    readers = 4
    payload = json.dumps(body("openai/flood", "go", stream=True)).encode()
    request = raw_request("POST", "/v1/chat/completions", payload)
    drops_before = relay.count("stopped reading")
    closed_before = upstream.closed("flood")
    start = peak = rss_mb(relay.pid)
    socks = []
    try:
        for _ in range(readers):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((relay.host, relay.port))
            sock.sendall(request)
            socks.append(sock)
        # Each socket first fills the kernel's buffers (autotuned up to tcp_wmem's 4 MiB).
        deadline = time.monotonic() + 15.0
        while relay.count("stopped reading") < drops_before + readers:
            peak = max(peak, rss_mb(relay.pid))
            assert time.monotonic() < deadline, "slow readers were not dropped"
            time.sleep(0.05)
        dropped_at = time.monotonic()
    finally:
        for sock in socks:
            sock.close()
    assert peak - start < 50, f"RSS grew from {start:.0f} to {peak:.0f} MiB"
    closed_at = upstream.wait_closed("flood", count=closed_before + readers, timeout=2.0)
    assert closed_at is not None, (
        f"{upstream.closed('flood') - closed_before} of {readers} upstream requests closed "
        "after their clients were dropped"
    )
    assert closed_at - dropped_at < 2.0
    assert httpx.get(f"{relay.base_url}/health", timeout=TIMEOUT).status_code == 200


def test_a_long_stream_through_the_gateway_keeps_memory_flat(
    relay: ServerProcess, upstream: FaultyUpstream
) -> None:
    """A client that reads 32 MiB of an endless upstream stream: the gateway's memory does not
    grow with the length of the stream (nothing of a streamed answer is kept)."""
    assert httpx.post(  # warm-up: the upstream client and its pool exist from now on
        f"{relay.base_url}/v1/chat/completions",
        json=body("openai/ok", "hi", stream=True),
        timeout=TIMEOUT,
    ).is_success
    payload = json.dumps(body("openai/flood", "go", stream=True)).encode()
    closed_before = upstream.closed("flood")
    start = peak = rss_mb(relay.pid)
    relayed = 0
    with socket.create_connection((relay.host, relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", payload))
        checked = 0
        while relayed < 32 << 20:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended"
            relayed += len(chunk)
            if relayed - checked > 1 << 20:
                checked = relayed
                peak = max(peak, rss_mb(relay.pid))
    assert upstream.wait_closed("flood", count=closed_before + 1, timeout=2.0) is not None
    assert peak - start < 16, f"RSS grew from {start:.0f} to {peak:.0f} MiB relaying 32 MiB"


def test_one_large_request_neither_balloons_memory_nor_stalls_the_loop(
    server_factory: ServerFactory,
) -> None:
    """A large request (5 MB, the limit is 8 MiB) costs memory of the order of its size, and
    other connections are answered meanwhile (echo splits 2.5 M words)."""
    srv = server_factory("--db", ":memory:", "--log-level", "warning")
    text = "a " * 2_500_000
    payload = json.dumps(body("echo", text, stream=True, max_tokens=1)).encode()
    start = rss_mb(srv.pid)
    peak = start
    worst = 0.0
    stop = threading.Event()

    def probe() -> None:
        nonlocal worst
        with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as health:
            while not stop.is_set():
                began = time.monotonic()
                health.sendall(raw_request("GET", "/health"))
                read_until(health, b"healthy")
                worst = max(worst, time.monotonic() - began)
                time.sleep(0.01)

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mb(srv.pid))
            time.sleep(0.01)

    threads = [threading.Thread(target=f, daemon=True) for f in (probe, sample)]
    for thread in threads:
        thread.start()
    try:
        with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
            sock.sendall(raw_request("POST", "/v1/chat/completions", payload))
            read_until(sock, b"data: [DONE]")
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    figures = f"/health waited {worst:.2f} s; RSS grew from {start:.0f} to {peak:.0f} MiB"
    assert worst < 0.5, figures
    assert peak - start < 60, figures


# --- tokens: timing and logs ----------------------------------------------------------------

SECRET = "s3cr3t-token-0123456789abcdefghijklmnop"
UPSTREAM_KEY = "sk-upstream-key-should-never-be-logged-42"


@pytest.fixture(scope="module")
def static_server(server_dir: Path, upstream: FaultyUpstream) -> Iterator[ServerProcess]:
    log_path = Path(tempfile.mkdtemp(prefix="static-", dir=server_dir)) / "server.log"
    env = {
        "WORKER_AUTH_TOKEN": f"other-key-1,{SECRET},other-key-2",
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": UPSTREAM_KEY,
    }
    args = ["--auth-provider", "static", "--log-level", "debug", "--db", ":memory:"]
    with running_server(args, log_path=log_path, env=env) as srv:
        yield srv


def test_static_token_check_compares_digests_of_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Structurally constant time: whatever the token (right, wrong in its first or last
    character, shorter, longer, non-ASCII), ``authenticate`` hashes it and runs
    ``hmac.compare_digest`` on two 32-byte SHA-256 digests once per configured key."""
    from wirechat.engine import auth
    from wirechat.engine.config import AuthMode, EngineConfig, StaticKey

    keys = ("other-key-1", SECRET, "other-key-2")
    config = EngineConfig(
        auth_mode=AuthMode.STATIC, static_keys=tuple(StaticKey.from_token(k) for k in keys)
    )
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        assert isinstance(a, bytes) and isinstance(b, bytes)
        calls.append((len(a), len(b)))
        return bool(real(a, b))

    # auth calls hmac.compare_digest through the module: the spy sees every comparison.
    monkeypatch.setattr(hmac, "compare_digest", spy)
    tokens = {
        SECRET: True,
        "X" + SECRET[1:]: False,
        SECRET[:-1] + "X": False,
        SECRET[:-1]: False,
        SECRET + "X": False,
        "t\xf6k\u20ac\udcff": False,
        "x" * 10_000: False,
    }
    for token, accepted in tokens.items():
        calls.clear()
        result = auth.authenticate(token, config)
        assert (result.user_id is not None) is accepted, token
        assert calls == [(32, 32)] * len(keys), (token, calls)


def test_static_token_timing_does_not_depend_on_the_token(static_server: ServerProcess) -> None:
    """Median 401 latencies for wrong tokens sharing no prefix, all but the last character,
    or of another length, do not differ measurably (interleaved, many samples)."""
    classes = {
        "first-char": "X" + SECRET[1:],
        "last-char": SECRET[:-1] + "X",
        "shorter": SECRET[:-1],
        "longer": SECRET + "X",
    }
    samples: dict[str, list[float]] = {name: [] for name in classes}
    order = list(classes)
    rounds = 200
    with socket.create_connection(
        (static_server.host, static_server.port), timeout=TIMEOUT
    ) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(rounds + 20):
            random.shuffle(order)
            for name in order:
                request = raw_request(
                    "GET", "/v1/models", headers=f"Authorization: Bearer {classes[name]}\r\n"
                )
                began = time.perf_counter()
                sock.sendall(request)
                reply = read_until(sock, b'"code":"invalid_api_key"')
                elapsed = time.perf_counter() - began
                assert reply.startswith(b"HTTP/1.1 401"), reply[:100]
                if index >= 20:  # warm-up rounds are not counted
                    samples[name].append(elapsed)
                # Each response ends in "}}" on this connection; nothing is left unread.
                while not reply.endswith(b"}"):
                    reply += sock.recv(65536)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    spread = max(medians.values()) - min(medians.values())
    bound = max(0.0003, 0.25 * min(medians.values()))
    assert spread < bound, {name: f"{m * 1e6:.0f} us" for name, m in medians.items()}


def test_tokens_in_query_strings_never_reach_the_logs(
    static_server: ServerProcess, upstream: FaultyUpstream
) -> None:
    wrong = "wrong-" + SECRET

    async def websocket_cases() -> None:
        for query in (f"?api_key={SECRET}", f"?token={SECRET}", f"?x=1&api_key={SECRET}"):
            async with connect(ws_url(static_server, query)) as ws:
                frames = await turn(ws, {"role": "user", "content": "authorised"})
                assert final_messages(frames)[0]["content"] == "authorised"
                # The gateway's own upstream key must not show up either.
                frames = await turn(ws, {"role": "user", "content": "up", "model": "openai/ok"})
                assert final_messages(frames)[0]["content"] == "a b c"
        async with connect(ws_url(static_server, f"?api_key={wrong}")) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    run(websocket_cases)
    base = static_server.base_url
    for target in (f"/v1/models?api_key={SECRET}", f"/v1/models?token={wrong}", "/health"):
        assert httpx.get(f"{base}{target}", timeout=TIMEOUT).status_code in (200, 401)
    completion = httpx.post(
        f"{base}/v1/chat/completions?api_key={SECRET}",
        json=body("echo", "hi", stream=False),
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=TIMEOUT,
    )
    assert completion.status_code == 200
    # Requests the server refuses early, with the token in the query.
    broken = [
        raw_request("GET", f"/v1/models?api_key={SECRET}", headers="Bad Header\r\n"),
        raw_request("GET", f"/v1/models?api_key={SECRET}&pad={'p' * 9000}"),
        raw_request(
            "GET",
            f"/chat?api_key={SECRET}",
            headers="Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: not-a-key\r\n",
        ),
        raw_request("GET", f"/chat?api_key={SECRET}"),
        f"GET /v1/models?api_key={SECRET} HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".encode(),
        f"GET /v1/models?api_key={SECRET} HTTP/2.0\r\nHost: x\r\n\r\n".encode(),
    ]
    for data in broken:
        with socket.create_connection((static_server.host, static_server.port), timeout=5) as s:
            s.sendall(data)
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 4") or reply.startswith(b"HTTP/1.1 5"), reply
    assert static_server.wait_for_log(r"GET /v1/models 401", timeout=2.0)
    time.sleep(0.2)  # the last log lines of the refused requests
    log = static_server.log()
    assert "GET /chat" in log or "/chat" in log
    for secret in (SECRET, wrong, UPSTREAM_KEY, SECRET[:16]):
        assert secret not in log, f"{secret[:8]}... appears in the server log"


# --- keep the helpers honest ----------------------------------------------------------------


def test_faulty_upstream_ok_behaves_like_an_openai_upstream(gateway: ServerProcess) -> None:
    """Guards the fault tests above: through the gateway, ``ok`` streams cleanly."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=TIMEOUT) as client:
            status, events = await sse(client, body("openai/ok", "hi", stream=True))
        assert status == 200
        assert streamed_text(events) == "a b c"
        assert finish_reasons(events) == ["stop"]
        assert events[-1] == "[DONE]"

    run(main)
