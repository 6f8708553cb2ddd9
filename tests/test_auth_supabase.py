"""``--auth-provider supabase`` end to end, against a small real HTTP server playing Supabase.

``FakeSupabase`` is an ``http.server`` on 127.0.0.1 in a thread that answers
``GET /auth/v1/user`` by the token's prefix (``good-NAME`` is user ``sb-NAME``; ``lag-``
answers after a short pause; ``slow-`` after longer than the server's ``--auth-timeout``;
``boom-`` with 500; ``noid-`` with a 200 without an ``id``; ``forbid-`` with 403; anything else
401) and counts the requests per token. The wirechat server runs as a real process
(``conftest.py``); the peers are the official ``openai`` client, httpx and ``websockets``.
Every wait is bounded. PROTOCOL.md §3.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import CliRunner, ServerFactory, ServerProcess, running_server
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from wirechat.providers.supabase_auth import AuthUnavailable, SupabaseVerifier

TIMEOUT = 5.0
TEST_TIMEOUT = 30.0
SERVICE_KEY = "service-role-key-for-tests"
STATIC = "static-worker-token"
LAG = 0.4  # "lag-" tokens: long enough for concurrent checks to overlap
SLOW = 3.0  # "slow-" tokens: longer than the server's --auth-timeout
AUTH_TIMEOUT = "1"
Frame = dict[str, Any]


class FakeSupabase:
    """``GET /auth/v1/user`` as Supabase answers it, with a request counter per token."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.apikeys: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ")
                with fake.lock:
                    fake.calls[token] += 1
                    fake.apikeys.append(self.headers.get("apikey"))
                if self.path != "/auth/v1/user" or not auth.startswith("Bearer "):
                    self.answer(404, {"msg": "not found"})
                    return
                kind, _, name = token.partition("-")
                if kind in ("lag", "slow"):
                    time.sleep(LAG if kind == "lag" else SLOW)
                if kind in ("good", "lag", "slow"):
                    self.answer(200, {"id": f"sb-{name}", "aud": "authenticated", "role": "x"})
                elif kind == "boom":
                    self.answer(500, {"msg": "database down"})
                elif kind == "noid":
                    self.answer(200, {"aud": "authenticated"})
                elif kind == "forbid":
                    self.answer(403, {"code": "bad_jwt", "msg": "invalid JWT"})
                else:
                    self.answer(401, {"code": 401, "msg": "invalid JWT"})

            def answer(self, status: int, body: Frame) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a slow answer): nothing to do

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, token: str) -> int:
        with self.lock:
            return self.calls[token]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def closed_port_url() -> str:
    """A URL nobody listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def supabase_env(url: str, **extra: str) -> dict[str, str]:
    return {"SUPABASE_URL": url, "SUPABASE_KEY": SERVICE_KEY, "WORKER_AUTH_TOKEN": STATIC, **extra}


SERVER_ARGS = [
    "--auth-provider",
    "supabase",
    "--auth-timeout",
    AUTH_TIMEOUT,
    "--log-level",
    "debug",
    "--db",
    ":memory:",
    "--workflow",
    "tests/workflows_for_tests.py:WORKFLOWS",
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSupabase]:
    supabase = FakeSupabase()
    yield supabase
    supabase.close()


@pytest.fixture(scope="module")
def sb_server(server_dir: Path, fake: FakeSupabase) -> Iterator[ServerProcess]:
    """``serve`` in supabase mode against ``fake`` (cache TTL 60 s, the default)."""
    log_path = Path(tempfile.mkdtemp(prefix="supabase-", dir=server_dir)) / "server.log"
    with running_server(SERVER_ARGS, log_path=log_path, env=supabase_env(fake.url)) as srv:
        yield srv


def client(srv: ServerProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{srv.base_url}/v1", api_key=token, max_retries=0, timeout=TIMEOUT
    )


def get_models(srv: ServerProcess, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{srv.base_url}/v1/models", headers=headers, timeout=TIMEOUT)


def ws_url(srv: ServerProcess, path: str = "/chat", query: str = "") -> str:
    return f"ws://{srv.host}:{srv.port}{path}{query}"


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), TEST_TIMEOUT))


async def recv(ws: ClientConnection) -> Frame:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value


async def turn(ws: ClientConnection, frame: Frame) -> list[Frame]:
    await ws.send(json.dumps(frame))
    frames: list[Frame] = []
    while True:
        reply = await recv(ws)
        frames.append(reply)
        if reply["type"] == "error":
            return frames
        if reply["type"] == "message" and reply["role"] == "assistant":
            return frames


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert closed.value.rcvd is not None, "the server sent no Close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def assert_envelope(response: httpx.Response, status: int, code: str) -> Frame:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert body["detail"] == error["message"]
    assert response.headers["x-request-id"]
    return dict(error)


# --- HTTP with the openai client ---------------------------------------------------------------


def test_openai_client_with_a_token_supabase_accepts(
    sb_server: ServerProcess, fake: FakeSupabase
) -> None:
    with client(sb_server, "good-alice") as alice:
        reply = alice.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hello supabase"}]
        )
        assert reply.choices[0].message.content == "hello supabase"
        assert [m.id for m in alice.models.list()] == ["echo"]
        stream = alice.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "a b c"
    # Three requests, one question to Supabase: the rest came from the cache.
    assert fake.count("good-alice") == 1
    assert SERVICE_KEY in fake.apikeys  # the service key travels as `apikey`


@pytest.mark.parametrize("token", ["wrong-token", "forbid-x", "noid-y"])
def test_openai_client_with_a_token_supabase_refuses(
    sb_server: ServerProcess, fake: FakeSupabase, token: str
) -> None:
    with client(sb_server, token) as bad, pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.response.headers["www-authenticate"] == "Bearer"
    assert fake.count(token) == 1
    # Refusals are cached for a few seconds: a second try does not reach Supabase.
    response = get_models(sb_server, token)
    assert_envelope(response, 401, "invalid_api_key")
    assert fake.count(token) == 1


def test_static_token_is_accepted_without_asking_supabase(
    sb_server: ServerProcess, fake: FakeSupabase
) -> None:
    before = sum(fake.calls.values())
    with client(sb_server, STATIC) as ops:
        reply = ops.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "static"}]
        )
        assert reply.choices[0].message.content == "static"
    assert sum(fake.calls.values()) == before


def test_missing_token_is_401_without_asking_supabase(
    sb_server: ServerProcess, fake: FakeSupabase
) -> None:
    before = sum(fake.calls.values())
    response = httpx.get(f"{sb_server.base_url}/v1/models", timeout=TIMEOUT)
    assert_envelope(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{sb_server.base_url}/health", timeout=TIMEOUT).status_code == 200
    assert sum(fake.calls.values()) == before


def test_concurrent_checks_of_one_token_share_one_upstream_request(
    sb_server: ServerProcess, fake: FakeSupabase
) -> None:
    token = "lag-dora"

    async def main() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=sb_server.base_url, timeout=TIMEOUT) as http:
            replies = await asyncio.gather(
                *(http.get("/v1/models", headers=headers) for _ in range(8))
            )
        assert [r.status_code for r in replies] == [200] * 8

    run(main)
    assert fake.count(token) == 1


@pytest.mark.parametrize(
    ("token", "calls"),
    [("slow-eve", 1), ("boom-fay", 1)],
    ids=["timeout", "500"],
)
def test_supabase_failing_is_503_with_retry_after_and_never_cached(
    sb_server: ServerProcess, fake: FakeSupabase, token: str, calls: int
) -> None:
    for attempt in (1, 2):
        started = time.monotonic()
        response = get_models(sb_server, token)
        error = assert_envelope(response, 503, "auth_unavailable")
        assert error["type"] == "service_unavailable"
        assert response.headers["retry-after"] == "2"
        assert "www-authenticate" not in response.headers
        assert time.monotonic() - started < float(AUTH_TIMEOUT) + 1.5
        assert fake.count(token) >= attempt * calls  # "unavailable" is asked again
    with client(sb_server, token) as openai_client, pytest.raises(openai.APIStatusError) as info:
        openai_client.models.list()
    assert info.value.status_code == 503


def test_supabase_down_is_503_and_websockets_close_1011(server_factory: ServerFactory) -> None:
    srv = server_factory(*SERVER_ARGS, env=supabase_env(closed_port_url()))
    response = get_models(srv, "good-gus")
    assert_envelope(response, 503, "auth_unavailable")
    assert response.headers["retry-after"] == "2"
    # The static token needs no Supabase: it works while Supabase is down.
    assert get_models(srv, STATIC).status_code == 200

    async def main() -> None:
        async with connect(ws_url(srv, query="?api_key=good-gus")) as ws:
            assert await closed_with(ws) == (1011, "Authentication unavailable")
        async with connect(ws_url(srv, "/predict", "?token=good-gus")) as ws:
            assert await closed_with(ws) == (1011, "Authentication unavailable")

    run(main)
    assert "good-gus" not in srv.log()


def test_cache_expires_after_its_ttl(server_factory: ServerFactory, fake: FakeSupabase) -> None:
    srv = server_factory(*SERVER_ARGS, env=supabase_env(fake.url, AUTH_CACHE_TTL="0.5"))
    token = "good-hal"
    assert get_models(srv, token).status_code == 200
    assert get_models(srv, token).status_code == 200
    assert fake.count(token) == 1
    time.sleep(0.7)
    assert get_models(srv, token).status_code == 200
    assert fake.count(token) == 2


def test_cache_ttl_zero_asks_every_time(server_factory: ServerFactory, fake: FakeSupabase) -> None:
    srv = server_factory(*SERVER_ARGS, env=supabase_env(fake.url, AUTH_CACHE_TTL="0"))
    for _ in range(3):
        assert get_models(srv, "good-ivy").status_code == 200
    assert fake.count("good-ivy") == 3


# --- WebSockets: the Supabase user owns threads and jobs ----------------------------------------


def test_threads_belong_to_the_supabase_user(sb_server: ServerProcess) -> None:
    thread = "t-supabase-alice"

    async def main() -> None:
        async with connect(ws_url(sb_server, query="?api_key=good-alice")) as alice:
            frames = await turn(alice, {"role": "user", "content": "secret", "thread_id": thread})
            assert frames[-1]["content"] == "secret"
        bob_headers = {"Authorization": "Bearer good-bob"}
        async with connect(ws_url(sb_server), additional_headers=bob_headers) as bob:
            frames = await turn(bob, {"role": "user", "content": "/history", "thread_id": thread})
            assert frames == [{"type": "error", "message": "Thread not found", "thread_id": thread}]
        async with connect(ws_url(sb_server, query="?token=good-alice")) as alice:
            frames = await turn(alice, {"role": "user", "content": "/history", "thread_id": thread})
            assert frames[-1]["content"] == "history: 2 messages"

    run(main)


def test_jobs_belong_to_the_supabase_user(sb_server: ServerProcess) -> None:
    async def call(ws: ClientConnection, command: str, data: Frame) -> Frame:
        await ws.send(json.dumps({"command": command, "data": data}))
        while True:
            frame = await recv(ws)
            if "type" not in frame:
                return frame

    async def main() -> None:
        url = ws_url(sb_server, "/predict")
        async with (
            connect(url + "?api_key=good-carol") as carol,
            connect(url, additional_headers={"Authorization": "Bearer good-dan"}) as dan,
        ):
            started = await call(carol, "run_job", {"workflow_id": "gated"})
            job_id = started["job_id"]
            assert (await call(dan, "get_status", {"job_id": job_id}))["status"] == "not_found"
            assert (await call(carol, "get_status", {"job_id": job_id}))["status"] == "running"
            cancel = await call(carol, "cancel_job", {"job_id": job_id})
            assert cancel["message"] == "Job cancellation requested"

    run(main)


@pytest.mark.parametrize(
    ("query", "reason"),
    [("?api_key=wrong-jon", "Invalid authentication"), ("", "Missing authentication")],
)
def test_websocket_refused_token_closes_1008(
    sb_server: ServerProcess, query: str, reason: str
) -> None:
    async def main() -> None:
        async with connect(ws_url(sb_server, query=query)) as ws:
            assert await closed_with(ws) == (1008, reason)

    run(main)


def test_websocket_with_supabase_timing_out_closes_1011(sb_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(sb_server, query="?api_key=slow-kim")) as ws:
            assert await closed_with(ws) == (1011, "Authentication unavailable")

    run(main)


def test_no_token_reaches_the_log(sb_server: ServerProcess) -> None:
    # Runs after the tests above on the same server (debug logs, access log included).
    log = sb_server.log()
    assert "GET /chat " in log or "GET /chat" in log  # the access log did see the sockets
    for token in ("good-alice", "good-bob", "wrong-token", "slow-eve", "boom-fay", "lag-dora"):
        assert token not in log
    assert SERVICE_KEY not in log
    assert "api_key" not in log and "token=" not in log


# --- start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "SUPABASE_URL and SUPABASE_KEY"),
        ({"SUPABASE_URL": "https://example.supabase.co"}, "SUPABASE_KEY"),
        ({"SUPABASE_KEY": "k"}, "SUPABASE_URL"),
    ],
)
def test_missing_url_or_key_refuses_to_start(
    run_wirechat: CliRunner, env: dict[str, str], missing: str
) -> None:
    status, err = run_wirechat("serve", "--auth-provider", "supabase", "--port", "0", env=env)
    assert status == 2
    assert f"--auth-provider supabase needs {missing}" in err
    status, err = run_wirechat("serve", "--port", "0", env={"AUTH_PROVIDER": "supabase", **env})
    assert status == 2 and "needs" in err


def test_bad_url_or_cache_setting_refuses_to_start(run_wirechat: CliRunner) -> None:
    env = {"SUPABASE_URL": "example.supabase.co", "SUPABASE_KEY": "k"}
    status, err = run_wirechat("serve", "--auth-provider", "supabase", env=env)
    assert status == 2 and "SUPABASE_URL must be an http" in err
    env = {"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_KEY": "k", "AUTH_CACHE_TTL": "soon"}
    status, err = run_wirechat("serve", "--auth-provider", "supabase", env=env)
    assert status == 2 and "AUTH_CACHE_TTL must be a number" in err


def test_worker_starts_in_supabase_mode(server_factory: ServerFactory, fake: FakeSupabase) -> None:
    srv = server_factory(*SERVER_ARGS, command="worker", env=supabase_env(fake.url))
    assert get_models(srv, "good-lea").status_code == 200
    assert get_models(srv, "bad-lea").status_code == 401


# --- the verifier on its own -------------------------------------------------------------------


def test_verifier_cache_is_lru_bounded_and_keyed_by_digest(fake: FakeSupabase) -> None:
    now = [0.0]

    async def main() -> None:
        verifier = SupabaseVerifier(
            fake.url, SERVICE_KEY, ttl=10, max_entries=2, clock=lambda: now[0]
        )
        try:
            for name in ("m1", "m2"):
                assert await verifier.verify(f"good-{name}") == f"sb-{name}"
            assert verifier.cached("good-m1") is not None  # m1 is now the most recent
            assert await verifier.verify("good-m3") == "sb-m3"  # evicts m2
            assert verifier.cached("good-m2") is None
            assert verifier.cached("good-m1") is not None
            entries = verifier._accepted._entries
            assert all(len(k) == 32 for k in entries)  # SHA-256 digests, never tokens
            assert "good-m1" not in repr(entries) and SERVICE_KEY not in repr(verifier)
            now[0] = 10.0
            assert verifier.cached("good-m1") is None  # expired
            # Refusals: cached apart, for at most negative_ttl (5 s).
            assert await verifier.verify("nope-m4") is None
            assert verifier.cached("nope-m4") is not None
            now[0] = 15.0
            assert verifier.cached("nope-m4") is None
        finally:
            await verifier.aclose()

    run(main)
    assert fake.count("good-m1") == 1 and fake.count("good-m2") == 1


def test_verifier_unavailable_is_an_exception_without_the_token() -> None:
    async def main() -> None:
        verifier = SupabaseVerifier(closed_port_url(), SERVICE_KEY, timeout=1.0)
        try:
            with pytest.raises(AuthUnavailable) as info:
                await verifier.verify("good-secret-token")
            assert "good-secret-token" not in str(info.value)
            assert verifier.cached("good-secret-token") is None
        finally:
            await verifier.aclose()

    run(main)


def test_verifier_check_survives_a_cancelled_waiter(fake: FakeSupabase) -> None:
    async def main() -> None:
        verifier = SupabaseVerifier(fake.url, SERVICE_KEY)
        try:
            first = asyncio.ensure_future(verifier.verify("lag-nia"))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(verifier.verify("lag-nia"))
            first.cancel()
            assert await asyncio.wait_for(second, TIMEOUT) == "sb-nia"
            assert verifier.cached("lag-nia") is not None
        finally:
            await verifier.aclose()

    run(main)
    assert fake.count("lag-nia") == 1


# --- embedding -------------------------------------------------------------------------------


def test_embedded_server_with_a_supabase_verifier(fake: FakeSupabase) -> None:
    from wirechat.engine import AuthMode, EngineConfig

    import wirechat

    config = EngineConfig(auth_mode=AuthMode.SUPABASE)

    async def main() -> None:
        verifier = SupabaseVerifier(fake.url, SERVICE_KEY)
        async with wirechat.start(config=config, auth=verifier) as running:
            http = httpx.AsyncClient(base_url=running.base_url, timeout=TIMEOUT)
            async with http:
                ok = await http.get("/v1/models", headers={"Authorization": "Bearer good-ola"})
                bad = await http.get("/v1/models", headers={"Authorization": "Bearer nope-ola"})
        assert (ok.status_code, bad.status_code) == (200, 401)
        with pytest.raises(ValueError, match="supabase needs a token verifier"):
            async with wirechat.start(config=config):
                pass

    run(main)
    assert fake.count("good-ola") == 1
