"""``GET /metrics`` end to end: real servers, real clients, the exposition parsed by
``prometheus_client``'s own parser.

Counters are compared before and after the traffic a test drives (the module's server is
shared), gauges are polled with a bound until they settle.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ServerFactory, ServerProcess, running_server
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

import wirechat

TIMEOUT = 5.0
TOKEN = "metrics-secret-token-1234"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def srv(server_dir: Path) -> Iterator[ServerProcess]:
    """``serve`` with the test workflows; local auth."""
    log_path = Path(tempfile.mkdtemp(prefix="metrics-", dir=server_dir)) / "server.log"
    args = ["--db", ":memory:", "--workflow", "tests/workflows_for_tests.py:WORKFLOWS"]
    with running_server(args, log_path=log_path) as process:
        yield process


def scrape(base_url: str, headers: dict[str, str] | None = None) -> Samples:
    reply = httpx.get(base_url + "/metrics", headers=headers, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return parse(reply.text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(check: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def client(srv: ServerProcess) -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- the endpoint ----------------------------------------------------------------------------


def test_metrics_is_prometheus_text_with_every_family(srv: ServerProcess) -> None:
    reply = httpx.get(srv.base_url + "/metrics", timeout=TIMEOUT)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.headers["x-request-id"]
    names = {family.name for family in text_string_to_metric_families(reply.text)}
    assert {
        "wirechat_requests",
        "wirechat_request_duration_seconds",
        "wirechat_time_to_first_token_seconds",
        "wirechat_prompt_tokens",
        "wirechat_completion_tokens",
        "wirechat_provider_errors",
        "wirechat_protocol_errors",
        "wirechat_websocket_sessions",
        "wirechat_connections_open",
        "wirechat_websockets_open",
        "wirechat_active_streams",
        "wirechat_jobs_active",
        "wirechat_jobs_finished",
    } <= names
    # Only our own registry: no process or platform collectors of the global one.
    assert not any(name.startswith(("process_", "python_")) for name in names)
    assert httpx.head(srv.base_url + "/metrics", timeout=TIMEOUT).status_code == 200
    assert httpx.get(srv.base_url + "/v1/metrics", timeout=TIMEOUT).status_code == 404
    assert httpx.post(srv.base_url + "/metrics", timeout=TIMEOUT).status_code == 405


def test_completions_count_requests_tokens_and_time_to_first_token(srv: ServerProcess) -> None:
    before = scrape(srv.base_url)
    with client(srv) as api:
        reply = api.chat.completions.create(model="echo", messages=user("one two three"))
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        stream = api.chat.completions.create(model="echo", messages=user("a b c d"), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b c d"
    after = scrape(srv.base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"route": "chat_completions", "status": "200"}
    assert delta("wirechat_requests_total", **ok) == 2
    # echo counts words: 3 + 4 in the prompts, 3 + 4 in the replies (PROTOCOL.md §1).
    assert delta("wirechat_prompt_tokens_total", model="echo") == 7
    assert delta("wirechat_completion_tokens_total", model="echo") == 7
    route = {"route": "chat_completions"}
    assert delta("wirechat_request_duration_seconds_count", **route) == 2
    # Only the streamed completion has a first token apart from its end.
    assert delta("wirechat_time_to_first_token_seconds_count", **route) == 1
    assert delta("wirechat_time_to_first_token_seconds_bucket", le="+Inf", **route) == 1
    assert value(after, "wirechat_time_to_first_token_seconds_sum", **route) > 0


def test_provider_errors_by_provider_model_and_status(srv: ServerProcess) -> None:
    before = scrape(srv.base_url)
    with client(srv) as api:
        with pytest.raises(openai.APIStatusError) as info:
            api.chat.completions.create(model="echo", messages=user("/error 500"))
        assert info.value.status_code == 502
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="no-such-model-xyz", messages=user("hi"))
    after = scrape(srv.base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    echo = {"provider": "wirechat", "model": "echo"}
    assert delta("wirechat_provider_errors_total", status="500", **echo) == 1
    # A made-up model name never becomes a label of its own.
    unknown = {"provider": "none", "model": "unknown", "status": "404"}
    assert delta("wirechat_provider_errors_total", **unknown) == 1
    assert not any("no-such-model-xyz" in str(labels) for _, labels in after)
    assert delta("wirechat_requests_total", route="chat_completions", status="502") == 1
    assert delta("wirechat_requests_total", route="chat_completions", status="404") == 1


def test_unknown_paths_share_one_label(srv: ServerProcess) -> None:
    before = scrape(srv.base_url)
    for index in range(3):
        reply = httpx.get(f"{srv.base_url}/no/such/path-{index}?q=1", timeout=TIMEOUT)
        assert reply.status_code == 404
    after = scrape(srv.base_url)
    labels = {"route": "unknown", "status": "404"}
    assert (
        value(after, "wirechat_requests_total", **labels)
        - value(before, "wirechat_requests_total", **labels)
        == 3
    )
    assert not any("path-" in str(sample_labels) for _, sample_labels in after)


def test_protocol_errors_are_counted(srv: ServerProcess) -> None:
    before = scrape(srv.base_url)
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    after = scrape(srv.base_url)
    delta = value(after, "wirechat_protocol_errors_total", status="400") - value(
        before, "wirechat_protocol_errors_total", status="400"
    )
    assert delta == 1


# --- /chat and the gauges --------------------------------------------------------------------


def test_chat_turn_tokens_and_the_open_websockets_gauge(srv: ServerProcess) -> None:
    url = f"ws://{srv.host}:{srv.port}/chat"
    before = scrape(srv.base_url)
    base_open = value(before, "wirechat_websockets_open", endpoint="chat")

    async def talk() -> Samples:
        async with connect(url, open_timeout=TIMEOUT) as ws:
            frame = {"role": "user", "content": "hello there world", "model": "echo"}
            await ws.send(json.dumps(frame))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                assert reply["type"] != "error", reply
                if reply["type"] == "message" and reply["role"] == "assistant":
                    break
            # Scraped while the socket is open (from a thread: this loop keeps serving it).
            return await asyncio.to_thread(scrape, srv.base_url)

    during = asyncio.run(asyncio.wait_for(talk(), 30))
    assert value(during, "wirechat_websockets_open", endpoint="chat") == base_open + 1
    assert wait_for(
        lambda: (
            value(scrape(srv.base_url), "wirechat_websockets_open", endpoint="chat") == base_open
        )
    )
    after = scrape(srv.base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("wirechat_requests_total", route="chat_ws", status="101") == 1
    assert delta("wirechat_prompt_tokens_total", model="echo") == 3
    assert delta("wirechat_completion_tokens_total", model="echo") == 3
    assert delta("wirechat_time_to_first_token_seconds_count", route="chat_ws") == 1
    assert delta("wirechat_websocket_sessions_total", endpoint="chat") == 1


def test_active_streams_gauge_follows_a_slow_stream(srv: ServerProcess) -> None:
    base = value(scrape(srv.base_url), "wirechat_active_streams")
    with client(srv) as api:
        stream = api.chat.completions.create(
            model="echo", messages=user("/slow 100 a b c d e f"), stream=True
        )
        first = next(iter(stream))
        assert first.choices
        during = value(scrape(srv.base_url), "wirechat_active_streams")
        for _ in stream:
            pass
    assert during == base + 1
    assert wait_for(lambda: value(scrape(srv.base_url), "wirechat_active_streams") == base)


def test_jobs_by_state(srv: ServerProcess) -> None:
    before = scrape(srv.base_url)
    done = httpx.post(
        srv.base_url + "/workflows/ticker/run", json={"ticks": 1, "delay": 0}, timeout=TIMEOUT
    )
    assert done.status_code == 200 and done.json()["status"] == "completed"
    failed = httpx.post(srv.base_url + "/workflows/raising/run", json={}, timeout=TIMEOUT)
    assert failed.status_code == 500
    # A run over HTTP belongs to its request: hanging up cancels the job.
    body = b"{}"
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /workflows/gated/run HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        running = value(before, "wirechat_jobs_active", state="running") + 1
        assert wait_for(
            lambda: value(scrape(srv.base_url), "wirechat_jobs_active", state="running") == running
        )

    def finished(state: str) -> float:
        return value(scrape(srv.base_url), "wirechat_jobs_finished_total", state=state) - value(
            before, "wirechat_jobs_finished_total", state=state
        )

    assert wait_for(lambda: finished("cancelled") == 1)
    assert finished("completed") == 1 and finished("failed") == 1
    after = scrape(srv.base_url)
    assert value(after, "wirechat_jobs_active", state="running") == value(
        before, "wirechat_jobs_active", state="running"
    )


# --- access to the endpoint --------------------------------------------------------------------


def test_metrics_needs_the_api_token_when_auth_is_enforced(server_factory: ServerFactory) -> None:
    srv = server_factory("--auth-provider", "static", env={"WORKER_AUTH_TOKEN": TOKEN})
    refused = httpx.get(srv.base_url + "/metrics", timeout=TIMEOUT)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    scrape(srv.base_url, {"Authorization": f"Bearer {TOKEN}"})


def test_metrics_public_and_no_metrics(server_factory: ServerFactory) -> None:
    public = server_factory(
        "--auth-provider", "static", "--metrics-public", env={"WORKER_AUTH_TOKEN": TOKEN}
    )
    scrape(public.base_url)
    assert httpx.get(public.base_url + "/v1/models", timeout=TIMEOUT).status_code == 401
    off = server_factory("--no-metrics")
    assert httpx.get(off.base_url + "/metrics", timeout=TIMEOUT).status_code == 404


def test_metrics_on_the_worker_and_chat_server_surfaces(server_factory: ServerFactory) -> None:
    worker = server_factory(
        "--auth-provider", "static", command="worker", env={"WORKER_AUTH_TOKEN": TOKEN}
    )
    samples = scrape(worker.base_url, {"Authorization": f"Bearer {TOKEN}"})
    assert value(samples, "wirechat_connections_open") >= 1  # the scrape's own connection
    chat_server = server_factory(command="chat-server")
    scrape(chat_server.base_url)


def test_each_server_has_its_own_registry() -> None:
    """Two servers in one process: each scrape shows its own server's traffic only."""

    async def health_count(http: httpx.AsyncClient, base_url: str) -> float:
        samples = parse((await http.get(base_url + "/metrics")).text)
        return value(samples, "wirechat_requests_total", route="health", status="200")

    async def main() -> None:
        async with (
            wirechat.start() as first,
            wirechat.start() as second,
            httpx.AsyncClient(timeout=TIMEOUT) as http,
        ):
            for _ in range(2):
                assert (await http.get(first.base_url + "/health")).status_code == 200
            assert await health_count(http, first.base_url) == 2
            assert await health_count(http, second.base_url) == 0

    asyncio.run(asyncio.wait_for(main(), 30))
