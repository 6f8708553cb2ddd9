"""Keys and limits (issue 8 item 2): per-key models, requests/tokens per minute, concurrent
streams, and the server's in-flight admission limit.

Three layers, each with a real peer: the bookkeeping itself (``engine/limits.py``, pure),
the engine answering an ``h11`` client and a ``wsproto`` client, and a running server
answering the official ``openai`` client (which must see the 429, read its headers and retry
as told) and the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ServerFactory
from engine_peer import EnginePeer, chat_body
from websockets.asyncio.client import connect
from wirechat.engine import (
    AuthMode,
    CallProvider,
    EngineConfig,
    Finish,
    ModelInfo,
    StaticKey,
    TextDelta,
    Usage,
)
from wirechat.engine.events import OpenThread, SaveMessages
from wirechat.engine.limits import Admission, KeyLimits, Refusal, Ticket, _duration
from ws_peer import WsPeer

T0 = 1_700_000_000.0


def key(
    token: str = "sk-a", name: str = "alice", **limits: Any
) -> StaticKey:  # limits: KeyLimits fields
    return StaticKey.from_token(token, name, KeyLimits(**limits))


def config(*keys: StaticKey, **fields: Any) -> EngineConfig:
    return EngineConfig(auth_mode=AuthMode.STATIC, static_keys=keys, **fields)


AUTH = [("Authorization", "Bearer sk-a")]


# --- the bookkeeping -------------------------------------------------------------------------


def test_requests_per_minute_is_a_bucket_refilled_continuously() -> None:
    admission = Admission(0)
    limits = KeyLimits(requests_per_minute=2)
    first = admission.admit("k", limits, T0)
    second = admission.admit("k", limits, T0)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    refused = admission.admit("k", limits, T0 + 1)
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.kind) == (429, "requests")
    assert refused.retry_after == pytest.approx(29.0)  # one request back every 30 s
    assert "Please try again in 29s" in refused.message
    assert isinstance(admission.admit("k", limits, T0 + 30), Ticket)
    assert isinstance(admission.admit("k", limits, T0 + 30), Refusal)
    assert isinstance(admission.admit("other", limits, T0 + 30), Ticket)  # per key


def test_tokens_are_taken_when_a_generation_ends() -> None:
    admission = Admission(0)
    limits = KeyLimits(tokens_per_minute=600)  # 10 tokens back a second
    ticket = admission.admit("k", limits, T0)
    assert isinstance(ticket, Ticket)
    assert isinstance(admission.admit("k", limits, T0), Ticket)  # balance not yet touched
    ticket.tokens = 700
    admission.release(ticket)
    admission.release(ticket)  # twice is once
    refused = admission.admit("k", limits, T0)
    assert isinstance(refused, Refusal) and refused.kind == "tokens"
    assert refused.retry_after == pytest.approx(10.1)  # from -100 back to +1
    assert isinstance(admission.admit("k", limits, T0 + 10.2), Ticket)


def test_concurrent_streams_free_up_on_release() -> None:
    admission = Admission(0)
    limits = KeyLimits(concurrent_streams=1)
    ticket = admission.admit("k", limits, T0)
    assert isinstance(ticket, Ticket)
    refused = admission.admit("k", limits, T0)
    assert isinstance(refused, Refusal) and refused.kind == "concurrent"
    admission.release(ticket)
    assert isinstance(admission.admit("k", limits, T0), Ticket)


def test_in_flight_limit_is_a_503_for_everyone() -> None:
    admission = Admission(2)
    tickets = [admission.admit(None, None, T0), admission.admit("k", KeyLimits(), T0)]
    refused = admission.admit(None, None, T0)
    assert isinstance(refused, Refusal) and (refused.status, refused.kind) == (503, "overloaded")
    for ticket in tickets:
        assert isinstance(ticket, Ticket)
        admission.release(ticket)
    assert admission.inflight == 0


def test_model_patterns() -> None:
    limits = KeyLimits(models=("echo", "openai/*"))
    assert limits.allows_model("echo") and limits.allows_model("openai/gpt-4o")
    assert not limits.allows_model("echo2") and not limits.allows_model("anthropic/x")
    assert KeyLimits().allows_model("anything")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0123, "13ms"), (6.5961, "6.596s"), (2.0, "2s"), (60.0, "1m0s")]
)
def test_reset_durations_read_like_openais(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        KeyLimits(requests_per_minute=0)


# --- the engine, over HTTP -------------------------------------------------------------------


def finish(peer: EnginePeer, call: CallProvider, prompt: int = 3, completion: int = 2) -> None:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    peer.answer(call.stream_id, TextDelta(text="ok"), Finish(reason="stop", usage=usage))


def test_a_limited_key_gets_ratelimit_headers_then_a_429_it_can_obey() -> None:
    peer = EnginePeer(config(key(requests_per_minute=2, tokens_per_minute=1000)), now=T0)
    finish(peer, peer.chat(AUTH))
    ok = peer.last_reply()
    assert ok.status == 200
    assert ok.header("x-ratelimit-limit-requests") == "2"
    assert ok.header("x-ratelimit-remaining-requests") == "1"
    assert ok.header("x-ratelimit-reset-requests") == "30s"
    assert ok.header("x-ratelimit-limit-tokens") == "1000"
    assert ok.header("x-ratelimit-remaining-tokens") == "995"  # 3 + 2 used
    finish(peer, peer.chat(AUTH))
    assert peer.post_chat(chat_body(), AUTH) is None  # refused before any provider call
    refused = peer.last_reply()
    assert refused.status == 429
    assert refused.error["type"] == "requests"
    assert refused.error["code"] == "rate_limit_exceeded"
    assert "Rate limit reached for requests per min (RPM): Limit 2" in refused.error["message"]
    assert refused.header("retry-after") == "30"
    assert refused.header("retry-after-ms") == "30000"
    assert refused.header("x-ratelimit-remaining-requests") == "0"
    assert not peer.transport_closed()
    peer.now = T0 + 30
    finish(peer, peer.chat(AUTH))
    assert peer.last_reply().status == 200


def test_a_streamed_generation_holds_its_slot_until_it_ends() -> None:
    shared = Admission(0)
    cfg = config(key(concurrent_streams=1))
    first, second = EnginePeer(cfg, admission=shared), EnginePeer(cfg, admission=shared)
    call = first.chat(AUTH, stream=True)
    first.chunk(call.stream_id, TextDelta(text="a"))
    assert second.post_chat(chat_body(stream=True), AUTH) is None
    refused = second.last_reply()
    assert refused.status == 429 and refused.header("retry-after") == "1"
    assert "concurrent" in refused.error["message"]
    first.done(call.stream_id)
    assert second.chat(AUTH)  # the slot is free again


@pytest.mark.parametrize("how", ["disconnect", "provider failure"])
def test_a_generation_that_ends_badly_is_released_too(how: str) -> None:
    from wirechat.engine import ProviderError

    shared = Admission(0)
    cfg = config(key(concurrent_streams=1))
    first = EnginePeer(cfg, admission=shared)
    call = first.chat(AUTH)
    if how == "disconnect":
        first.eof()
    else:
        first.failed(call.stream_id, ProviderError("down", status=502))
    assert EnginePeer(cfg, admission=shared).chat(AUTH)
    assert shared.inflight == 1


def test_the_server_wide_in_flight_limit_is_a_503() -> None:
    shared = Admission(1)
    cfg = EngineConfig(max_inflight_generations=1)
    first = EnginePeer(cfg, admission=shared)
    call = first.chat()
    second = EnginePeer(cfg, admission=shared)
    assert second.post_chat(chat_body()) is None
    refused = second.last_reply()
    assert refused.status == 503
    assert refused.error["code"] == "server_overloaded"
    assert refused.header("retry-after") == "1"
    finish(first, call)
    assert second.chat()


BOTH = [ModelInfo(id="echo", owned_by="w"), ModelInfo(id="gpt-4o", owned_by="o")]
X = [{"role": "user", "content": "x"}]


def test_a_key_limited_to_models_sees_and_uses_only_those() -> None:
    peer = EnginePeer(config(key(models=("echo",))))
    assert peer.post_chat(chat_body(model="gpt-4o"), AUTH) is None
    refused = peer.last_reply()
    assert refused.status == 403
    assert (refused.error["code"], refused.error["param"]) == ("model_not_allowed", "model")
    peer.request("GET", "/v1/models", AUTH)
    listing = peer.listings[-1]
    peer.models(
        listing.stream_id,
        [ModelInfo(id="echo", owned_by="w"), ModelInfo(id="gpt-4o", owned_by="o")],
    )
    assert [m["id"] for m in peer.last_reply().json["data"]] == ["echo"]
    peer.request("GET", "/v1/models/gpt-4o", AUTH)
    peer.models(
        peer.listings[-1].stream_id,
        [ModelInfo(id="echo", owned_by="w"), ModelInfo(id="gpt-4o", owned_by="o")],
    )
    assert peer.last_reply().status == 404


def test_unlimited_keys_and_no_auth_get_no_ratelimit_headers() -> None:
    for peer, headers in ((EnginePeer(config(key())), AUTH), (EnginePeer(), [])):
        finish(peer, peer.chat(headers))
        assert peer.last_reply().header("x-ratelimit-limit-requests") is None


# --- the engine, over /chat ------------------------------------------------------------------


def chat_turn(peer: WsPeer, content: str = "hi") -> list[dict[str, Any]]:
    """Send one message and run its turn to the end if it starts; the frames it got."""
    peer.send_json({"type": "message", "content": content, "model": "echo", "thread_id": "t"})
    for effect in peer.take_effects():
        if isinstance(effect, OpenThread):
            peer.opened(effect.op_id, list(effect.append))
            call = next(e for e in peer.take_effects() if isinstance(e, CallProvider))
            usage = Usage(prompt_tokens=1, completion_tokens=1)
            peer.answer(call.stream_id, TextDelta(text="ok"), Finish(reason="stop", usage=usage))
            save = next(e for e in peer.take_effects() if isinstance(e, SaveMessages))
            peer.saved(save.op_id)
    return peer.take_frames()


def test_each_chat_turn_is_a_request_and_a_refused_turn_keeps_the_socket() -> None:
    cfg = config(key(requests_per_minute=2), ws_ping_interval=1e6)
    peer = WsPeer(cfg).open("/chat?api_key=sk-a")
    peer.take_effects()
    for _ in range(2):
        assert chat_turn(peer)[-1]["type"] == "message"
    frames = chat_turn(peer)
    assert frames == [
        {
            "type": "error",
            "message": frames[0]["message"],
            "error_type": "rate_limit",
            "retry_after": 30.0,
            "thread_id": "t",
        }
    ]
    assert "requests per min" in frames[0]["message"]
    assert peer.close_code() is None and not peer.transport_closed()
    peer.send_json({"type": "ping"})
    assert peer.take_frames()[0]["type"] == "pong"
    peer.now += 30
    assert chat_turn(peer)[-1]["type"] == "message"


def test_a_chat_turn_for_a_model_the_key_may_not_use() -> None:
    peer = WsPeer(config(key(models=("gpt-4o",)), ws_ping_interval=1e6)).open("/chat?api_key=sk-a")
    peer.take_effects()
    frames = chat_turn(peer)
    assert [f.get("error_type") for f in frames] == ["model_not_allowed"]
    assert not peer.of_type(OpenThread)


def test_a_stopped_or_dropped_turn_frees_its_stream() -> None:
    cfg = config(key(concurrent_streams=1), ws_ping_interval=1e6)
    peer = WsPeer(cfg).open("/chat?api_key=sk-a")
    peer.send_json({"type": "message", "content": "hi", "thread_id": "t"})
    peer.send_json({"type": "stop"})
    peer.take_effects()
    assert chat_turn(peer)[-1]["type"] == "message"  # the stopped turn held nothing


# --- a running server, the openai client -----------------------------------------------------


def write_config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "wirechat.toml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_openai_client_sees_the_429_and_retries_as_told(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A key with one concurrent stream: while a slow stream runs, a second request gets a
    429 with `retry-after-ms: 1000`; the openai client waits that long and succeeds."""
    path = write_config(
        tmp_path,
        """
        [[keys]]
        name = "alice"
        token_env = "ALICE_KEY"
        concurrent_streams = 1
        """,
    )
    server = server_factory(
        "--auth-provider", "static", "--config", path, env={"ALICE_KEY": "sk-alice"}
    )
    statuses: list[int] = []
    http = httpx.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]})
    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="sk-alice", http_client=http, max_retries=2
    )
    started = threading.Event()

    def slow_stream() -> None:
        with client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "/slow 150 a b c d"}], stream=True
        ) as stream:
            for _ in stream:
                started.set()

    runner = threading.Thread(target=slow_stream)
    runner.start()
    assert started.wait(10)
    began = time.monotonic()
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}]
    )
    waited = time.monotonic() - began
    runner.join(10)
    assert reply.choices[0].message.content == "hello there"
    assert 429 in statuses and statuses[-1] == 200
    assert waited >= 0.9  # it waited as told (retry-after-ms 1000), not its own backoff
    assert reply.usage is not None and reply.usage.total_tokens == 4

    raw = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-alice", max_retries=0)
    with raw.chat.completions.with_streaming_response.create(
        model="echo", messages=[{"role": "user", "content": "/slow 300 a b c"}], stream=True
    ) as held:
        with pytest.raises(openai.RateLimitError) as caught:
            raw.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        held.read()
    response = caught.value.response
    assert response.headers["retry-after"] == "1"
    assert response.headers["retry-after-ms"] == "1000"
    assert caught.value.code == "rate_limit_exceeded"


def test_keys_from_the_config_file_are_users_with_their_models(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = write_config(
        tmp_path,
        """
        [[keys]]
        name = "bob"
        token = "sk-bob"
        models = ["echo"]
        requests_per_minute = 100
        """,
    )
    # No WORKER_AUTH_TOKEN: the file's keys are enough for static mode.
    server = server_factory("--auth-provider", "static", "--config", path)
    bob = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-bob", max_retries=0)
    raw = bob.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    with pytest.raises(openai.PermissionDeniedError):
        bob.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=server.base_url + "/v1", api_key="sk-eve", max_retries=0
        ).models.list()


def test_admission_limit_on_a_running_server(server_factory: ServerFactory) -> None:
    server = server_factory("--max-inflight-generations", "1")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="echo", messages=[{"role": "user", "content": "/slow 300 a b c"}], stream=True
    ) as held:
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "x"}]
            )
        held.read()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert (
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "after"}]
        )
        .choices[0]
        .message.content
        == "after"
    )


def test_chat_turn_over_the_limit_on_a_running_server(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = write_config(tmp_path, '[[keys]]\ntoken = "sk-c"\nrequests_per_minute = 1\n')
    server = server_factory("--auth-provider", "static", "--config", path)

    async def talk() -> list[dict[str, Any]]:
        url = f"ws://{server.host}:{server.port}/chat?api_key=sk-c"
        frames: list[dict[str, Any]] = []
        async with connect(url) as ws:
            for text in ("one", "two"):
                await ws.send(json.dumps({"type": "message", "content": text, "thread_id": "t"}))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    frames.append(frame)
                    if frame["type"] in ("message", "error"):
                        break
            await ws.send(json.dumps({"type": "ping"}))
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return frames

    frames = asyncio.run(talk())
    ends = [f for f in frames if f["type"] in ("message", "error", "pong")]
    assert [f["type"] for f in ends] == ["message", "error", "pong"]
    assert ends[0]["content"] == "one"
    assert ends[1]["error_type"] == "rate_limit" and ends[1]["retry_after"] > 50


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[keys]]\nname = "x"\n', "needs token"),
        ('[[keys]]\ntoken = "t"\nrequests_per_minute = 0\n', "at least 1"),
        ('[[keys]]\ntoken = "t"\nrpm = 5\n', "unknown fields: rpm"),
        ('keys = "sk"\n', "array of tables"),
    ],
)
def test_a_bad_key_table_refuses_to_start(
    run_wirechat: Any, tmp_path: Path, body: str, message: str
) -> None:
    path = write_config(tmp_path, body)
    status, err = run_wirechat("serve", "--auth-provider", "static", "--config", path)
    assert status == 2, err
    assert message in err
