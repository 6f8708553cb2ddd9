"""The access log end to end: one line per request and per WebSocket session, plain or
JSON, and never a token (reliability.md §2.8): neither a bearer token nor ``?api_key=``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
from conftest import ServerFactory, ServerProcess
from openai import OpenAI
from websockets.asyncio.client import connect

TIMEOUT = 5.0
TOKEN = "access-log-secret-token-5678"
AUTH = {"WORKER_AUTH_TOKEN": TOKEN}


def json_lines(srv: ServerProcess) -> list[dict[str, Any]]:
    """The JSON access lines of the server's log (other loggers keep their own format)."""
    return [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]


def wait_for_lines(srv: ServerProcess, count: int) -> list[dict[str, Any]]:
    assert srv.wait_for_log(r"(?m)^\{", count=count, timeout=TIMEOUT), srv.log()
    return json_lines(srv)


def chat_turn(url: str, text: str) -> None:
    async def talk() -> None:
        async with connect(url, open_timeout=TIMEOUT) as ws:
            await ws.send(json.dumps({"role": "user", "content": text, "model": "echo"}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                assert frame["type"] != "error", frame
                if frame["type"] == "message" and frame["role"] == "assistant":
                    return

    asyncio.run(asyncio.wait_for(talk(), 30))


def test_json_lines_carry_the_request_id_and_never_the_token(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(
        "--auth-provider", "static", "--access-log-format", "json", "--log-level", "debug", env=AUTH
    )
    with OpenAI(base_url=srv.base_url + "/v1", api_key=TOKEN, max_retries=0) as api:
        raw = api.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": "hi there"}]
        )
        streamed = api.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": "a b"}], stream=True
        )
        for _ in streamed.parse():
            pass
    plain_rid = raw.headers["x-request-id"]
    stream_rid = streamed.headers["x-request-id"]
    refused = httpx.get(srv.base_url + "/v1/models?api_key=" + TOKEN, timeout=TIMEOUT)
    assert refused.status_code == 401  # the query is no credential on HTTP

    lines = wait_for_lines(srv, 3)
    by_id = {line["request_id"]: line for line in lines}
    line = by_id[plain_rid]
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["route"] == "chat_completions" and line["status"] == 200
    assert line["streamed"] is False and line["duration_ms"] >= 0
    assert line["user"].startswith("key-")  # a digest of the token, never the token
    assert {"ts", "method", "path", "status", "duration_ms", "request_id", "user"} <= set(line)
    assert by_id[stream_rid]["streamed"] is True
    models = by_id[refused.headers["x-request-id"]]
    assert models["path"] == "/v1/models" and models["status"] == 401 and models["user"] is None
    log = srv.log()
    assert TOKEN not in log and "api_key" not in log
    assert "Bearer" not in log and "authorization" not in log.lower()


def test_websocket_sessions_log_their_end_and_never_the_query_token(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory("--auth-provider", "static", env={**AUTH, "ACCESS_LOG_FORMAT": "json"})
    chat_turn(f"ws://{srv.host}:{srv.port}/chat?api_key={TOKEN}", "hello socket")
    lines = wait_for_lines(srv, 2)
    upgrade = next(line for line in lines if line.get("status") == 101)
    assert upgrade["path"] == "/chat" and upgrade["route"] == "chat_ws"
    closed = next(line for line in lines if line.get("event") == "websocket_closed")
    assert closed["path"] == "/chat" and closed["close_code"] == 1000
    assert closed["turns"] == 1 and closed["duration_ms"] > 0
    assert closed["request_id"] == upgrade["request_id"]
    assert closed["user"] == upgrade["user"] and closed["user"].startswith("key-")
    log = srv.log()
    assert TOKEN not in log and "api_key" not in log


def test_plain_lines_and_the_websocket_end(server_factory: ServerFactory) -> None:
    srv = server_factory("--log-level", "info")
    reply = httpx.get(srv.base_url + "/health?token=" + TOKEN, timeout=TIMEOUT)
    rid = reply.headers["x-request-id"]
    assert srv.wait_for_log(rf"GET /health 200 [0-9.]+ms rid={rid}\n")
    chat_turn(f"ws://{srv.host}:{srv.port}/chat?token={TOKEN}", "x")
    assert srv.wait_for_log(r"WS /chat closed 1000 [0-9.]+s turns=1 rid=req_")
    # A socket that just goes away: its session still gets its line (1006: no close frame).
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"GET /predict HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Request-Id: gone-away-1\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    assert srv.wait_for_log(r"WS /predict closed 1006 [0-9.]+s turns=0 rid=gone-away-1")
    assert TOKEN not in srv.log()


def test_no_access_log(server_factory: ServerFactory) -> None:
    srv = server_factory("--no-access-log", "--log-level", "debug")
    rid = httpx.get(srv.base_url + "/health", timeout=TIMEOUT).headers["x-request-id"]
    chat_turn(f"ws://{srv.host}:{srv.port}/chat", "quiet")
    # The metrics still count what the log leaves out.
    assert "wirechat_requests_total" in httpx.get(srv.base_url + "/metrics", timeout=TIMEOUT).text
    assert srv.wait_for_log("provider call", timeout=TIMEOUT)  # debug logging still works
    log = srv.log()
    assert rid not in log and "GET /health" not in log and "WS /chat" not in log


def test_a_bad_access_log_format_refuses_to_start(run_wirechat: Any) -> None:
    status, err = run_wirechat("serve", "--port", "0", env={"ACCESS_LOG_FORMAT": "xml"})
    assert status == 2 and "ACCESS_LOG_FORMAT" in err


def test_a_client_that_hangs_up_mid_answer_is_logged_and_counted_as_499(
    server_factory: ServerFactory,
) -> None:
    """One line per request even when the client leaves before its answer is complete:
    status 499 as nginx writes it, streamed or not; /metrics counts it too."""
    srv = server_factory("--access-log-format", "json")
    for stream in (True, False):
        body = json.dumps(
            {
                "model": "echo",
                "stream": stream,
                "messages": [{"role": "user", "content": "/slow 500 a b c"}],
            }
        ).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: gone-{int(stream)}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
            sock.sendall(head + body)
            if stream:
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # the socket closes here, the model still writing
    lines = wait_for_lines(srv, 2)
    gone = {line["request_id"]: line for line in lines if line["request_id"].startswith("gone-")}
    assert gone["gone-1"]["status"] == 499 and gone["gone-1"]["streamed"] is True
    assert gone["gone-0"]["status"] == 499 and gone["gone-0"]["streamed"] is False
    assert {line["path"] for line in gone.values()} == {"/v1/chat/completions"}
    metrics = httpx.get(srv.base_url + "/metrics", timeout=TIMEOUT).text
    assert 'wirechat_requests_total{route="chat_completions",status="499"} 2.0' in metrics
