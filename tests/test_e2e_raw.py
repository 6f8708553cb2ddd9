"""End to end over raw sockets and httpx: malformed input, limits, keep-alive, cancellation.

PROTOCOL.md §2 (errors, disconnects) and §6 (limits); reference/reliability.md §2 and §5.
Every socket has a timeout, so a server that does not answer fails a test instead of
hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import ServerFactory, ServerProcess

TIMEOUT = 5.0
CANCELLED = r"provider call \d+ for echo cancelled"


# --- a small HTTP/1.1 client over a raw socket ------------------------------------------


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def sse_events(self) -> list[str]:
        """The ``data:`` payloads of an SSE body, in order."""
        events = self.body.decode("utf-8").split("\n\n")
        assert events[-1] == "", "an SSE body ends with a blank line"
        out: list[str] = []
        for event in events[:-1]:
            assert event.startswith("data: "), event
            assert "\n" not in event, event
            out.append(event[len("data: ") :])
        return out


class RawConnection:
    """A client socket that reads whole responses, keeping surplus bytes for the next one."""

    def __init__(
        self, srv: ServerProcess, timeout: float = TIMEOUT, *, rcvbuf: int | None = None
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(): the window is negotiated from it.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect((srv.host, srv.port))
        except OSError:
            self.sock.close()
            raise
        self.buf = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before {marker!r}; got {self.buf[:200]!r}")
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed with {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> RawResponse:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        return RawResponse(version, int(status), reason[0] if reason else "", headers, b"")

    def read_chunk(self) -> bytes | None:
        """One chunk of a chunked body (None after the last one)."""
        size_line = self._read_until(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            self._read_until(b"\r\n")  # no trailers from us: just the final CRLF
            return None
        data = self._read_exact(size)
        assert self._read_exact(2) == b"\r\n"
        return data

    def read_response(self, *, head_only_body: bool = False) -> RawResponse:
        response = self.read_head()
        if head_only_body:
            return response
        length = response.header("content-length")
        if response.header("transfer-encoding") == "chunked":
            parts = []
            while (chunk := self.read_chunk()) is not None:
                parts.append(chunk)
            response.body = b"".join(parts)
        elif length is not None:
            response.body = self._read_exact(int(length))
        elif response.status not in (204, 304):
            # Close-delimited (HTTP/1.0).
            while self._fill():
                pass
            response.body, self.buf = self.buf, b""
        return response

    def closed_by_peer(self, timeout: float) -> bool:
        """True when the server closes (EOF or reset) within ``timeout`` with nothing more."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        self.buf += data
        return data == b""


def request(
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}"]
    if version == "HTTP/1.1":
        lines.append("Host: 127.0.0.1")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chat(text: str, *, stream: bool = False, **extra: Any) -> bytes:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}], **extra}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def one_shot(srv: ServerProcess, data: bytes, timeout: float = TIMEOUT) -> RawResponse:
    with RawConnection(srv, timeout) as conn:
        conn.send(data)
        return conn.read_response()


def assert_error_envelope(response: RawResponse, status: int) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body)
    assert (response.header("content-type") or "").startswith("application/json")
    body: dict[str, Any] = response.json()
    error: dict[str, Any] = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert body["detail"] == error["message"]
    return error


def stream_text(events: list[str]) -> str:
    assert events[-1] == "[DONE]"
    text = ""
    for event in events[:-1]:
        chunk = json.loads(event)
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
    return text


# --- request errors (the connection stays usable) --------------------------------------


def test_malformed_json_is_400_and_connection_stays_usable(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(request("POST", "/v1/chat/completions", b'{"model": "echo", "messages": ['))
        response = conn.read_response()
        error = assert_error_envelope(response, 400)
        assert error["type"] == "invalid_request_error"
        assert response.header("x-request-id")
        conn.send(request("POST", "/v1/chat/completions", chat("still here")))
        again = conn.read_response()
        assert again.status == 200
        assert again.json()["choices"][0]["message"]["content"] == "still here"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo", "messages": "hi"}, "messages"),
        ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "echo", "messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"model": "echo", "messages": [{"role": "user"}]}, "messages.[0].content"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
        ({"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": "2"},
            "max_tokens",
        ),
    ],
)
def test_invalid_request_is_400_with_param(
    server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    response = one_shot(server, request("POST", "/v1/chat/completions", json.dumps(body).encode()))
    error = assert_error_envelope(response, 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_non_object_body_is_400(server: ServerProcess) -> None:
    for body in (b"[]", b'"text"', b"", b"\xff\xfe"):
        response = one_shot(server, request("POST", "/v1/chat/completions", body))
        assert_error_envelope(response, 400)


def test_unknown_path_405_and_preflight(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(request("GET", "/v1/nowhere"))
        missing = conn.read_response()
        assert assert_error_envelope(missing, 404)["code"] == "unknown_url"
        conn.send(request("GET", "/v1/chat/completions"))
        wrong = conn.read_response()
        assert_error_envelope(wrong, 405)
        assert "POST" in (wrong.header("allow") or "")
        conn.send(
            request(
                "OPTIONS",
                "/v1/chat/completions",
                headers=(
                    ("Origin", "http://example.test"),
                    ("Access-Control-Request-Method", "POST"),
                ),
            )
        )
        preflight = conn.read_response()
        assert preflight.status in (200, 204)
        assert preflight.header("allow") == "POST, OPTIONS"
        conn.send(request("OPTIONS", "/v1/models"))
        assert conn.read_response().header("allow") == "GET, HEAD, OPTIONS"
        conn.send(request("GET", "/v1/models/echo"))
        assert conn.read_response().json()["id"] == "echo"


def test_model_ids_percent_encoded(server: ServerProcess) -> None:
    response = one_shot(server, request("GET", "/v1/models/%65cho"))
    assert response.status == 200
    assert response.json()["id"] == "echo"


def test_request_id_is_echoed_or_generated(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(request("GET", "/health", headers=(("X-Request-Id", "abc-123"),)))
        assert conn.read_response().header("x-request-id") == "abc-123"
        conn.send(request("GET", "/health"))
        generated = conn.read_response().header("x-request-id")
        assert generated and generated != "abc-123"
        # A value that cannot go into a header is replaced, never reflected.
        conn.send(request("GET", "/health", headers=(("X-Request-Id", "a b\tc"),)))
        replaced = conn.read_response().header("x-request-id")
        assert replaced and replaced != "a b\tc"


# --- protocol errors (answer, then close) ----------------------------------------------


@pytest.fixture
def limited(server_factory: ServerFactory) -> ServerProcess:
    """A server with small limits and short timeouts (and debug logs)."""
    return server_factory(
        "--max-body-bytes",
        "1000",
        "--head-timeout",
        "0.5",
        "--keepalive-timeout",
        "0.5",
        "--body-timeout",
        "0.5",
        "--log-level",
        "debug",
    )


def test_body_over_limit_is_413(limited: ServerProcess) -> None:
    small = chat("x" * 800)
    assert len(small) <= 1000
    ok = one_shot(limited, request("POST", "/v1/chat/completions", small))
    assert ok.status == 200

    big = chat("x" * 2000)
    with RawConnection(limited) as conn:
        conn.send(request("POST", "/v1/chat/completions", big))
        response = conn.read_response()
        assert_error_envelope(response, 413)
        assert conn.closed_by_peer(2.0)


def test_chunked_body_over_limit_is_413(limited: ServerProcess) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 600
    body = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with RawConnection(limited) as conn:
        conn.send(head + body + body)
        response = conn.read_response()
        assert_error_envelope(response, 413)
        assert conn.closed_by_peer(2.0)


def test_chunked_body_within_limit(server: ServerProcess) -> None:
    payload = chat("chunked works")
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:10], payload[10:]))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    response = one_shot(server, head + body + b"0\r\n\r\n")
    assert response.status == 200
    assert response.json()["choices"][0]["message"]["content"] == "chunked works"


def test_header_block_over_16k_in_one_send_is_431(server: ServerProcess) -> None:
    headers = tuple((f"X-Filler-{i}", "v" * 1000) for i in range(20))
    with RawConnection(server) as conn:
        conn.send(request("GET", "/health", headers=headers))
        response = conn.read_response()
        assert response.status == 431
        assert conn.closed_by_peer(2.0)


@pytest.mark.parametrize(
    "data",
    [
        b"HELLO\r\n\r\n",
        b"GET /health\r\n\r\n",
        b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"G\x00T /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\nHost: x\n\n",
    ],
    ids=["word", "no-version", "four-parts", "nul-method", "bare-lf"],
)
def test_garbage_request_line_is_400(server: ServerProcess, data: bytes) -> None:
    with RawConnection(server) as conn:
        conn.send(data)
        response = conn.read_response()
        assert response.status == 400
        assert conn.closed_by_peer(2.0)


def test_http_2_request_line_is_505(server: ServerProcess) -> None:
    response = one_shot(server, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
    assert response.status == 505


def test_content_length_with_transfer_encoding_is_400(server: ServerProcess) -> None:
    body = chat("smuggled")
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), len(body), body)
    )
    with RawConnection(server) as conn:
        conn.send(data + request("GET", "/health"))
        response = conn.read_response()
        assert response.status == 400
        assert response.header("connection") == "close"
        # The pipelined request after the refused one is not answered.
        assert conn.closed_by_peer(2.0)
        assert conn.buf == b""


@pytest.mark.parametrize(
    "data",
    [
        b"HELLO\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"v" * 17000 + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    ],
    ids=["garbage", "cl-te", "431", "413"],
)
def test_protocol_errors_carry_request_id(server: ServerProcess, data: bytes) -> None:
    """PROTOCOL.md §2: "Every response carries x-request-id"."""
    response = one_shot(server, data)
    assert response.status >= 400
    assert_error_envelope(response, response.status)
    assert response.header("x-request-id")


def test_slow_head_gets_408_then_close(limited: ServerProcess) -> None:
    with RawConnection(limited) as conn:
        started = time.monotonic()
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        conn.sock.settimeout(3.0)
        response = conn.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert 0.3 <= elapsed < 2.0
        assert conn.closed_by_peer(2.0)


def test_silent_connection_closed_after_head_timeout(limited: ServerProcess) -> None:
    with RawConnection(limited) as conn:
        started = time.monotonic()
        assert conn.closed_by_peer(3.0)
        assert 0.3 <= time.monotonic() - started < 2.0


def test_idle_keepalive_connection_closed(limited: ServerProcess) -> None:
    with RawConnection(limited) as conn:
        conn.send(request("GET", "/health"))
        assert conn.read_response().status == 200
        started = time.monotonic()
        assert conn.closed_by_peer(3.0)
        assert 0.3 <= time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", 400),
        (
            b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
            b"\r\n\r\n",
            501,
        ),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\n\r\n", 400),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n3\r\nabcXX0\r\n\r\n",
            400,
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
            400,
        ),
    ],
    ids=[
        "duplicate-cl",
        "te-on-http-1.0",
        "te-gzip",
        "obs-fold",
        "space-before-colon",
        "bare-cr",
        "no-host",
        "chunk-footer-cve-2025-43859",
        "cl-plus-sign",
    ],
)
def test_framing_attacks_are_refused(server: ServerProcess, data: bytes, status: int) -> None:
    with RawConnection(server) as conn:
        conn.send(data + request("GET", "/health"))
        response = conn.read_response()
        assert response.status == status
        # Nothing after a refused request is parsed: the connection just closes.
        assert conn.closed_by_peer(2.0)
        assert conn.buf == b""


def test_request_line_over_8k_is_414(server: ServerProcess) -> None:
    response = one_shot(server, request("GET", "/health?q=" + "a" * 9000))
    assert response.status == 414


def test_too_many_header_fields_is_431(server: ServerProcess) -> None:
    headers = tuple((f"X-H{i}", "v") for i in range(150))
    response = one_shot(server, request("GET", "/health", headers=headers))
    assert response.status == 431


def test_deeply_nested_json_is_400(server: ServerProcess) -> None:
    for body in (b"[" * 100_000, b'{"model": "echo", "messages": ' + b"[" * 50_000):
        response = one_shot(server, request("POST", "/v1/chat/completions", body))
        assert_error_envelope(response, 400)


@pytest.mark.parametrize(
    "extra",
    [b'"temperature": NaN', b'"temperature": 1e400', b'"max_tokens": ' + b"9" * 5000],
    ids=["nan", "inf", "huge-int"],
)
def test_non_json_numbers_are_400(server: ServerProcess, extra: bytes) -> None:
    body = b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], ' + extra + b"}"
    response = one_shot(server, request("POST", "/v1/chat/completions", body))
    assert_error_envelope(response, 400)


def test_expect_100_continue(server: ServerProcess) -> None:
    body = chat("after continue")
    with RawConnection(server) as conn:
        conn.send(
            request("POST", "/v1/chat/completions", headers=(("Expect", "100-continue"),))[:-2]
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = conn.read_head()
        assert interim.status == 100
        conn.send(body)
        response = conn.read_response()
        assert response.json()["choices"][0]["message"]["content"] == "after continue"


def test_model_ids_with_slashes(server: ServerProcess) -> None:
    for target in ("/v1/models/org/some-model", "/v1/models/org%2Fsome-model"):
        response = one_shot(server, request("GET", target))
        error = assert_error_envelope(response, 404)
        assert error["code"] == "model_not_found"
        assert "org/some-model" in error["message"]


def test_stalled_body_gets_408_then_close(limited: ServerProcess) -> None:
    with RawConnection(limited) as conn:
        conn.send(request("POST", "/v1/chat/completions", chat("a body that stalls"))[:-10])
        started = time.monotonic()
        conn.sock.settimeout(3.0)
        response = conn.read_response()
        assert response.status == 408
        assert 0.3 <= time.monotonic() - started < 2.0
        assert conn.closed_by_peer(2.0)


def test_trickled_head_gets_408_by_the_absolute_deadline(limited: ServerProcess) -> None:
    """Slowloris: every byte arrives in time, the head as a whole does not."""
    data = request("GET", "/health", headers=(("X-Slow", "a" * 40),))
    with RawConnection(limited) as conn:
        started = time.monotonic()
        for byte in data:
            try:
                conn.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if time.monotonic() - started > 2.5:
                break
            time.sleep(0.1)
        conn.sock.settimeout(3.0)
        response = conn.read_response()
        assert response.status == 408
        assert time.monotonic() - started < 3.0


def test_provider_timeouts(server_factory: ServerFactory) -> None:
    srv = server_factory(
        "--provider-first-item-timeout",
        "0.3",
        "--provider-idle-timeout",
        "0.3",
        "--log-level",
        "debug",
    )
    # No first token in time: a plain 504, stream or not.
    for stream in (False, True):
        before = srv.count(CANCELLED)
        response = one_shot(
            srv, request("POST", "/v1/chat/completions", chat("/slow 1000 late", stream=stream))
        )
        assert_error_envelope(response, 504)
        assert srv.wait_for_log(CANCELLED, count=before + 1, timeout=1.0)


def test_provider_idle_timeout_mid_stream(server_factory: ServerFactory) -> None:
    srv = server_factory(
        "--provider-first-item-timeout",
        "2",
        "--provider-idle-timeout",
        "0.3",
        "--log-level",
        "debug",
    )
    # The first word comes after 0.5 s (in time), the second 0.5 s later (too late).
    response = one_shot(
        srv, request("POST", "/v1/chat/completions", chat("/slow 500 a b c", stream=True))
    )
    assert response.status == 200
    events = response.sse_events
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])
    assert stream_text([*events[:-2], "[DONE]"]) == "a "
    assert srv.wait_for_log(CANCELLED, timeout=1.0)


def test_client_not_reading_is_dropped_after_send_timeout(server_factory: ServerFactory) -> None:
    srv = server_factory("--send-timeout", "0.5")
    big = " ".join(f"w{i}" for i in range(100_000))
    with RawConnection(srv, rcvbuf=4096) as hog:
        hog.send(request("POST", "/v1/chat/completions", chat(big, stream=True)))
        assert srv.wait_for_log("stopped reading", timeout=3.0), srv.log()[-2000:]
        # Dropped: reading what the kernels still buffer ends in EOF or a reset, not in the
        # rest of the stream.
        deadline = time.monotonic() + 5.0
        ended = False
        with contextlib.suppress(ConnectionResetError):
            while time.monotonic() < deadline:
                if not hog.sock.recv(1 << 20):
                    ended = True
                    break
        assert ended or time.monotonic() < deadline, "the stream went on after the drop"
        assert not hog.buf.endswith(b"data: [DONE]\r\n\r\n")
    assert one_shot(srv, request("GET", "/health")).status == 200


def test_static_auth_cors_and_odd_tokens(server_factory: ServerFactory) -> None:
    srv = server_factory(
        "--auth-provider",
        "static",
        "--cors-origins",
        "http://app.test",
        env={"WORKER_AUTH_TOKEN": "tok1"},
    )
    with RawConnection(srv) as conn:
        conn.send(
            request(
                "OPTIONS",
                "/v1/chat/completions",
                headers=(
                    ("Origin", "http://app.test"),
                    ("Access-Control-Request-Method", "POST"),
                    ("Access-Control-Request-Headers", "authorization, content-type"),
                ),
            )
        )
        preflight = conn.read_response()
        assert preflight.status in (200, 204)
        assert preflight.header("access-control-allow-origin") == "http://app.test"
        assert "POST" in (preflight.header("access-control-allow-methods") or "")
        assert "authorization" in (preflight.header("access-control-allow-headers") or "")

        for value in ("Bearer t\xf6k", "Bearer ", "Basic dG9rMQ==", "tok1", "Bearer tok1 x"):
            conn.send(
                request(
                    "POST", "/v1/chat/completions", chat("hi"), headers=(("Authorization", value),)
                )
            )
            refused = conn.read_response()
            error = assert_error_envelope(refused, 401)
            assert error["code"] == "invalid_api_key"
            assert (refused.header("www-authenticate") or "").startswith("Bearer")

        conn.send(
            request(
                "POST",
                "/v1/chat/completions",
                chat("cors ok"),
                headers=(("Authorization", "Bearer tok1"), ("Origin", "http://app.test")),
            )
        )
        ok = conn.read_response()
        assert ok.status == 200
        assert ok.header("access-control-allow-origin") == "http://app.test"
        assert "x-request-id" in (ok.header("access-control-expose-headers") or "")

        conn.send(request("GET", "/v1/models", headers=(("Origin", "http://evil.test"),)))
        foreign = conn.read_response()
        assert foreign.status == 401
        assert foreign.header("access-control-allow-origin") is None


# --- connection reuse ------------------------------------------------------------------


def test_keepalive_reuses_one_connection(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(request("GET", "/health"))
        health = conn.read_response()
        assert health.status == 200
        assert health.json()["status"] == "healthy"
        assert isinstance(health.json()["timestamp"], str)

        conn.send(request("POST", "/v1/chat/completions", chat("second request")))
        second = conn.read_response()
        assert second.json()["choices"][0]["message"]["content"] == "second request"

        conn.send(request("POST", "/v1/chat/completions", chat("third one", stream=True)))
        third = conn.read_response()
        assert third.status == 200
        assert (third.header("content-type") or "").startswith("text/event-stream")
        assert third.header("transfer-encoding") == "chunked"
        assert stream_text(third.sse_events) == "third one"
        assert conn.buf == b""
        assert not conn.closed_by_peer(0.2)


def test_connection_close_request_header(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(request("GET", "/health", headers=(("Connection", "close"),)))
        assert conn.read_response().status == 200
        assert conn.closed_by_peer(2.0)


def test_chunked_body_with_trailers(server: ServerProcess) -> None:
    payload = chat("with trailers")
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x;ext=1\r\n%s\r\n0\r\nX-Trailer: yes\r\n\r\n" % (len(payload), payload)
    )
    with RawConnection(server) as conn:
        conn.send(data + request("GET", "/health"))
        first = conn.read_response()
        assert first.json()["choices"][0]["message"]["content"] == "with trailers"
        assert conn.read_response().status == 200


def test_pipelined_requests_answered_in_order(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(
            request("POST", "/v1/chat/completions", chat("/slow 100 first slow"))
            + request("POST", "/v1/chat/completions", chat("second fast"))
            + request("POST", "/v1/chat/completions", chat("third streamed", stream=True))
            + request("GET", "/health")
        )
        first = conn.read_response()
        second = conn.read_response()
        third = conn.read_response()
        fourth = conn.read_response()
        assert first.json()["choices"][0]["message"]["content"] == "first slow"
        assert second.json()["choices"][0]["message"]["content"] == "second fast"
        assert stream_text(third.sse_events) == "third streamed"
        assert fourth.json()["status"] == "healthy"
        ids = {r.header("x-request-id") for r in (first, second, third, fourth)}
        assert len(ids) == 4


def test_http_10_requests(server: ServerProcess) -> None:
    with RawConnection(server) as conn:
        conn.send(request("GET", "/health", version="HTTP/1.0"))
        response = conn.read_response()
        assert response.status == 200
        assert response.json()["status"] == "healthy"
        assert conn.closed_by_peer(2.0)

    response = one_shot(
        server, request("POST", "/v1/chat/completions", chat("old client"), version="HTTP/1.0")
    )
    assert response.json()["choices"][0]["message"]["content"] == "old client"

    # A stream to an HTTP/1.0 client has no chunked framing: the close ends it.
    response = one_shot(
        server,
        request(
            "POST", "/v1/chat/completions", chat("old stream", stream=True), version="HTTP/1.0"
        ),
    )
    assert response.status == 200
    assert response.header("transfer-encoding") is None
    assert stream_text(response.sse_events) == "old stream"


def test_sse_event_sequence_on_the_wire(server: ServerProcess) -> None:
    response = one_shot(
        server,
        request(
            "POST",
            "/v1/chat/completions",
            chat("two words", stream=True, stream_options={"include_usage": True}),
        ),
    )
    assert response.header("cache-control") == "no-cache"
    assert b"event:" not in response.body and b"\nid:" not in response.body
    events = response.sse_events
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["two ", "words"]
    assert chunks[3]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1


def test_stream_chosen_by_body_not_accept(server: ServerProcess) -> None:
    response = one_shot(
        server,
        request(
            "POST",
            "/v1/chat/completions",
            chat("json please"),
            headers=(("Accept", "text/event-stream"),),
        ),
    )
    assert (response.header("content-type") or "").startswith("application/json")
    assert response.json()["choices"][0]["message"]["content"] == "json please"


# --- disconnects and cancellation -------------------------------------------------------


def test_disconnect_mid_stream_cancels_provider(server: ServerProcess) -> None:
    before = server.count(CANCELLED)
    with RawConnection(server) as conn:
        conn.send(
            request("POST", "/v1/chat/completions", chat("/slow 200 a b c d e f g h", stream=True))
        )
        head = conn.read_response(head_only_body=True)
        assert head.status == 200
        first = conn.read_chunk()
        assert first is not None and first.startswith(b"data: ")
    closed = time.monotonic()
    assert server.wait_for_log(CANCELLED, count=before + 1, timeout=1.0), server.log()[-2000:]
    assert time.monotonic() - closed < 1.0
    health = one_shot(server, request("GET", "/health"))
    assert health.status == 200


def test_reset_mid_stream_cancels_provider(server: ServerProcess) -> None:
    before = server.count(CANCELLED)
    with RawConnection(server) as conn:
        conn.send(
            request("POST", "/v1/chat/completions", chat("/slow 200 a b c d e f g h", stream=True))
        )
        conn.read_response(head_only_body=True)
        assert conn.read_chunk() is not None
        # SO_LINGER 0: the close sends a RST instead of a FIN.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert server.wait_for_log(CANCELLED, count=before + 1, timeout=1.0), server.log()[-2000:]
    assert one_shot(server, request("GET", "/health")).status == 200


def test_disconnect_while_waiting_non_stream_cancels_provider(server: ServerProcess) -> None:
    before = server.count(CANCELLED)
    with RawConnection(server) as conn:
        conn.send(request("POST", "/v1/chat/completions", chat("/slow 200 a b c d e f g h")))
        time.sleep(0.3)
    assert server.wait_for_log(CANCELLED, count=before + 1, timeout=1.0), server.log()[-2000:]
    assert one_shot(server, request("GET", "/health")).status == 200


def test_half_close_while_waiting_non_stream_cancels_provider(server: ServerProcess) -> None:
    before = server.count(CANCELLED)
    with RawConnection(server) as conn:
        conn.send(request("POST", "/v1/chat/completions", chat("/slow 200 a b c d e f g h")))
        time.sleep(0.2)
        conn.sock.shutdown(socket.SHUT_WR)
        assert server.wait_for_log(CANCELLED, count=before + 1, timeout=1.0), server.log()[-2000:]
        assert conn.closed_by_peer(2.0)


def test_client_not_reading_does_not_block_others(server: ServerProcess) -> None:
    before = server.count(CANCELLED)
    # ~100k words: megabytes of SSE, far beyond the socket buffers.
    big = " ".join(f"w{i}" for i in range(100_000))
    with RawConnection(server, rcvbuf=4096) as hog:
        hog.send(request("POST", "/v1/chat/completions", chat(big, stream=True)))
        time.sleep(0.3)
        started = time.monotonic()
        for i in range(5):
            reply = one_shot(server, request("POST", "/v1/chat/completions", chat(f"other {i}")))
            assert reply.json()["choices"][0]["message"]["content"] == f"other {i}"
        assert one_shot(server, request("GET", "/health")).status == 200
        assert time.monotonic() - started < 3.0
    # The hog went away mid-stream: its provider call is cancelled.
    assert server.wait_for_log(CANCELLED, count=before + 1, timeout=2.0), server.log()[-2000:]


def test_fifty_concurrent_streams(server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str, list[str]]:
        text = f"client {i} says hello to the server"
        body = {
            "model": "echo",
            "messages": [{"role": "user", "content": f"/slow 20 {text}"}],
            "stream": True,
        }
        events: list[str] = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
        return i, text, events

    async def run() -> list[tuple[int, str, list[str]]]:
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(
            base_url=server.base_url, limits=limits, timeout=15.0
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(asyncio.wait_for(run(), 30))
    assert len(results) == 50
    ids = set()
    for _, text, events in results:
        assert stream_text(events) == text
        chunks = [json.loads(e) for e in events[:-1]]
        assert sum(1 for c in chunks if c["choices"][0]["delta"].get("role")) == 1
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        ids.add(chunks[0]["id"])
    assert len(ids) == 50


def test_access_log_has_no_query_string(server: ServerProcess) -> None:
    response = one_shot(server, request("GET", "/health?api_key=sekrit-value"))
    assert response.status == 200
    assert server.wait_for_log(r"GET /health 200", timeout=2.0)
    assert "sekrit-value" not in server.log()


def test_log_lines_mention_cancellation_pattern_only_for_cancels(server: ServerProcess) -> None:
    # A normal request does not log a cancellation (guards the counting in the tests above).
    before = server.count(CANCELLED)
    assert one_shot(server, request("POST", "/v1/chat/completions", chat("fine"))).status == 200
    time.sleep(0.1)
    assert server.count(CANCELLED) == before
    assert re.search(r"POST /v1/chat/completions 200", server.log())
