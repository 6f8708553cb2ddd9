"""End to end: starting, stopping and the command surfaces of the real server process.

PROTOCOL.md §0 (commands, ready line, SIGTERM/SIGINT), §2 (/health, /ping), §3 (worker
auth) and §6 (shutdown grace); reference/reliability.md §1.3 and §5.3.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from conftest import CliRunner, ServerFactory, ServerProcess

TIMEOUT = 10.0
READY = re.compile(r"wirechat listening on http://127\.0\.0\.1:([0-9]+)")


def chat_body(text: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}], "stream": stream}


class StreamReader:
    """Reads an SSE completion in a thread, recording each ``data:`` payload as it arrives."""

    def __init__(self, srv: ServerProcess, text: str) -> None:
        self.events: list[str] = []
        self.arrivals: list[float] = []
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.status: int | None = None
        self._thread = threading.Thread(target=self._run, args=(srv, text), daemon=True)
        self._thread.start()

    def _run(self, srv: ServerProcess, text: str) -> None:
        try:
            with (
                httpx.Client(base_url=srv.base_url, timeout=TIMEOUT) as client,
                client.stream(
                    "POST", "/v1/chat/completions", json=chat_body(text, stream=True)
                ) as response,
            ):
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        self.arrivals.append(time.monotonic())
                        if '"content":"' in line and '"content":""' not in line:
                            self.first.set()
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.first.set()

    def wait_first_content(self, timeout: float = 5.0) -> None:
        assert self.first.wait(timeout), "no content event arrived"
        assert self.error is None, self.error

    def join(self, timeout: float = 10.0) -> list[str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        if self.error is not None:
            raise self.error
        return self.events

    def text(self) -> str:
        out = ""
        for event in self.events:
            if event == "[DONE]":
                break
            chunk = json.loads(event)
            for choice in chunk.get("choices", []):
                out += choice["delta"].get("content") or ""
        return out


def get(srv: ServerProcess, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{srv.base_url}{path}", timeout=TIMEOUT, **kwargs)


def post_chat(srv: ServerProcess, text: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(
        f"{srv.base_url}/v1/chat/completions", json=chat_body(text), timeout=TIMEOUT, **kwargs
    )


@contextlib.contextmanager
def keepalive_socket(srv: ServerProcess) -> Iterator[socket.socket]:
    """A connection that has completed one request and now sits idle, kept alive."""
    sock = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"healthy" not in data:
            chunk = sock.recv(4096)
            assert chunk, "closed before the response"
            data += chunk
        yield sock
    finally:
        sock.close()


def closed_within(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def new_connection_refused_or_503(srv: ServerProcess) -> str:
    """What a new client sees: "refused", "503", or else a description of what happened."""
    try:
        sock = socket.create_connection((srv.host, srv.port), timeout=1.0)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        sock.settimeout(1.0)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return "accepted, then reset"
        except TimeoutError:
            return "no answer within 1 s"
    if data == b"":
        return "accepted, then closed without an answer"
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    return "503" if status_line.startswith("HTTP/1.1 503") else status_line


# --- starting ----------------------------------------------------------------------------


def test_ready_line_has_the_real_port(server_factory: ServerFactory) -> None:
    srv = server_factory()
    match = READY.fullmatch(srv.ready_line)
    assert match is not None
    assert int(match.group(1)) == srv.port
    assert srv.host == "127.0.0.1"
    assert 0 < srv.port < 65536
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT):
        pass
    health = get(srv, "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    assert get(srv, "/ping").status_code == 200


def test_sigterm_idle_server_exits_zero_promptly(server_factory: ServerFactory) -> None:
    srv = server_factory()
    assert post_chat(srv, "hello").status_code == 200
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 2.0


def test_sigint_exits_zero(server_factory: ServerFactory) -> None:
    srv = server_factory()
    srv.signal(signal.SIGINT)
    assert srv.wait(5.0) == 0


# --- graceful shutdown -----------------------------------------------------------------


def test_sigterm_lets_inflight_stream_finish(server_factory: ServerFactory) -> None:
    srv = server_factory("--log-level", "debug")
    reader = StreamReader(srv, "/slow 100 a b c d")
    reader.wait_first_content()
    srv.signal(signal.SIGTERM)
    events = reader.join()
    assert reader.status == 200
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    assert reader.text() == "a b c d"
    finished = time.monotonic()
    assert srv.wait(5.0) == 0
    assert time.monotonic() - finished < 2.0


def test_new_connections_after_sigterm_are_refused_or_503(server_factory: ServerFactory) -> None:
    srv = server_factory()
    with keepalive_socket(srv) as idle:
        reader = StreamReader(srv, "/slow 200 a b c d e f")
        reader.wait_first_content()
        srv.signal(signal.SIGTERM)
        # The idle keep-alive connection is closed at once.
        assert closed_within(idle, 1.0)
        time.sleep(0.2)
        assert srv.process.poll() is None, "the in-flight stream should keep the server up"
        assert new_connection_refused_or_503(srv) in ("refused", "503")
    assert reader.join()[-1] == "[DONE]"
    assert reader.text() == "a b c d e f"
    assert srv.wait(5.0) == 0


def test_sigterm_lets_inflight_non_stream_finish(server_factory: ServerFactory) -> None:
    srv = server_factory("--log-level", "debug")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post_chat, srv, "/slow 150 p q r s")
        assert srv.wait_for_log("provider call 1 for echo started", timeout=5.0)
        srv.signal(signal.SIGTERM)
        response = future.result(timeout=5.0)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "p q r s"
    assert response.headers.get("connection") == "close"
    assert srv.wait(5.0) == 0


def test_shutdown_grace_ends_long_stream_with_error_event(server_factory: ServerFactory) -> None:
    srv = server_factory("--shutdown-grace", "0.3", "--log-level", "debug")
    reader = StreamReader(srv, "/slow 500 a b c d e f g h")
    reader.wait_first_content()
    signalled = time.monotonic()
    srv.signal(signal.SIGTERM)
    events = reader.join()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert "error" in error
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    assert reader.arrivals[-1] - signalled < 1.5
    assert reader.text() != "a b c d e f g h"
    # The provider call is cancelled, not left to run to its end.
    assert srv.wait_for_log(r"provider call \d+ for echo cancelled", timeout=1.0), srv.log()
    assert srv.wait(3.0) == 0
    assert time.monotonic() - signalled < 3.0


def test_shutdown_grace_answers_waiting_non_stream_with_503(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory("--shutdown-grace", "0.3", "--log-level", "debug")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post_chat, srv, "/slow 500 a b c d e f g h")
        # Signal only once the request is in flight (a loaded machine may be slow to send it).
        assert srv.wait_for_log("provider call 1 for echo started", timeout=5.0)
        signalled = time.monotonic()
        srv.signal(signal.SIGTERM)
        response = future.result(timeout=5.0)
    assert response.status_code == 503
    assert response.json()["error"]["message"]
    assert response.headers.get("retry-after")
    assert srv.wait(3.0) == 0
    assert time.monotonic() - signalled < 3.0


# --- command surfaces ----------------------------------------------------------------


def test_flags_win_over_environment(server_factory: ServerFactory) -> None:
    # PORT=1 would fail to bind; --port 0 wins. AUTH_PROVIDER=static is overridden by the flag.
    srv = server_factory(
        "--auth-provider",
        "local",
        env={"PORT": "1", "AUTH_PROVIDER": "static", "WORKER_AUTH_TOKEN": "env-token"},
    )
    assert srv.port != 1
    assert post_chat(srv, "no token needed").status_code == 200


def test_auth_from_environment(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"AUTH_PROVIDER": "static", "WORKER_AUTH_TOKEN": "env-token"})
    assert post_chat(srv, "hi").status_code == 401
    ok = post_chat(srv, "env auth", headers={"Authorization": "Bearer env-token"})
    assert ok.json()["choices"][0]["message"]["content"] == "env auth"


def test_worker_without_auth_refuses_to_start(run_wirechat: CliRunner) -> None:
    status, stderr = run_wirechat("worker", "--host", "127.0.0.1", "--port", "0")
    assert status != 0
    assert "auth" in stderr.lower()
    assert "Traceback" not in stderr


def test_worker_static_without_token_refuses_to_start(run_wirechat: CliRunner) -> None:
    status, stderr = run_wirechat(
        "worker", "--host", "127.0.0.1", "--port", "0", "--auth-provider", "static"
    )
    assert status != 0
    assert "WORKER_AUTH_TOKEN" in stderr
    assert "Traceback" not in stderr


def test_worker_with_static_auth_serves(server_factory: ServerFactory) -> None:
    srv = server_factory(
        "--auth-provider", "static", command="worker", env={"WORKER_AUTH_TOKEN": "w-token"}
    )
    assert get(srv, "/ping").json()["status"] == "healthy"
    assert get(srv, "/health").status_code == 200
    refused = post_chat(srv, "hi")
    assert refused.status_code == 401
    assert refused.headers.get("www-authenticate", "").startswith("Bearer")
    ok = post_chat(srv, "hi worker", headers={"Authorization": "Bearer w-token"})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == "hi worker"


def test_worker_with_explicit_no_auth_starts(server_factory: ServerFactory) -> None:
    srv = server_factory("--auth-provider", "none", command="worker")
    assert post_chat(srv, "open worker").json()["choices"][0]["message"]["content"] == (
        "open worker"
    )


def test_chat_server_surface(server_factory: ServerFactory) -> None:
    srv = server_factory(command="chat-server")
    assert get(srv, "/health").status_code == 200
    ping = get(srv, "/ping")
    assert ping.status_code == 404
    assert ping.json()["error"]["code"] == "unknown_url"
    assert [m["id"] for m in get(srv, "/v1/models").json()["data"]] == ["echo"]
    assert post_chat(srv, "chat server").json()["choices"][0]["message"]["content"] == (
        "chat server"
    )


def test_two_workers_serve_and_exit_zero(server_factory: ServerFactory) -> None:
    srv = server_factory("--workers", "2")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: post_chat(srv, f"worker reply {i}"), range(24)))
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == [
        f"worker reply {i}" for i in range(24)
    ]
    reader = StreamReader(srv, "/slow 100 x y z")
    reader.wait_first_content()
    srv.signal(signal.SIGTERM)
    assert reader.join()[-1] == "[DONE]"
    assert reader.text() == "x y z"
    assert srv.wait(5.0) == 0
    # No worker outlives the parent: the process group is empty.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.killpg(srv.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a worker process is still alive"
        time.sleep(0.05)


def test_two_workers_stop_accepting_after_sigterm(server_factory: ServerFactory) -> None:
    srv = server_factory("--workers", "2")
    reader = StreamReader(srv, "/slow 200 a b c d e f g h")
    reader.wait_first_content()
    srv.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert new_connection_refused_or_503(srv) in ("refused", "503")
    assert reader.join()[-1] == "[DONE]"
    assert srv.wait(5.0) == 0
