"""The engine's HTTP behaviour, fed bytes and read back through an h11 client oracle.

Specs: PROTOCOL.md §2-§3, reference/openai-compat.md §3-§6 and §10, reference/reliability.md
§1.4, §2.5 and §5. The test plays the provider by answering ``CallProvider`` effects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from engine_peer import (
    EnginePeer,
    Reply,
    Splitter,
    bytewise,
    chat_body,
    check_error_envelope,
    encode_request,
    normalized,
    split_at,
    stream_chunks,
    whole,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from wirechat.engine import (
    AuthMode,
    CloseTransport,
    EngineConfig,
    Finish,
    ModelInfo,
    Output,
    Phase,
    ProviderError,
    RequestCompleted,
    StaticKey,
    Surface,
    TextDelta,
    ToolCall,
    Usage,
)

T0 = 1_700_000_000.0
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
OSLO = ToolCall(id="call_aaa", name="get_weather", arguments='{"city":"Oslo"}')
STOCK = ToolCall(id="call_bbb", name="get_stock_price", arguments='{"ticker":"NVDA"}')
STATIC = EngineConfig(
    auth_mode=AuthMode.STATIC,
    static_keys=(StaticKey.from_token("sk-good", name="alice"), StaticKey.from_token("sk-other")),
)
MODELS = [
    ModelInfo(id="echo", owned_by="wirechat", created=1),
    ModelInfo(id="meta-llama/Llama-3-8B", owned_by="meta", created=2),
]


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def assert_common_headers(reply: Reply) -> None:
    request_id = reply.header("x-request-id")
    assert request_id, reply.response.headers
    assert reply.header("openai-version") == "2020-10-01"
    assert (reply.header("openai-processing-ms") or "").isdigit()


def assert_json_error(reply: Reply, status: int, **fields: Any) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.header("content-type") == "application/json"
    assert reply.header("content-length") == str(len(reply.body))
    assert_common_headers(reply)
    error = reply.error
    for key, value in fields.items():
        assert error[key] == value, (key, error)
    return error


def choice_deltas(chunks: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any], Any]]:
    out = []
    for chunk in chunks:
        if not chunk["choices"]:
            continue
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}, choice
        assert choice["logprobs"] is None
        out.append((choice["index"], choice["delta"], choice["finish_reason"]))
    return out


# --- non-streaming completions ------------------------------------------------------------


def test_non_stream_completion_has_every_required_field() -> None:
    peer = EnginePeer(now=T0 + 0.75)
    call = peer.chat(headers=[("X-Request-Id", "abc-123")])
    assert call.request.model == "echo" and call.user_id == "1"
    assert peer.wire == b""  # nothing goes out before the provider answers
    peer.answer(
        call.stream_id,
        TextDelta(text="Hel"),
        TextDelta(text="lo"),
        Finish(reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2)),
    )
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    assert reply.header("content-length") == str(len(reply.body))
    assert reply.header("x-request-id") == "abc-123"
    assert_common_headers(reply)
    body = reply.json
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) >= len("chatcmpl-") + 24
    assert body["object"] == "chat.completion"
    assert type(body["created"]) is int and body["created"] == int(T0)
    assert body["model"] == "echo"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert not peer.transport_closed()
    assert peer.phase() is Phase.IDLE


def test_completion_ids_are_unique() -> None:
    peer = EnginePeer()
    ids = set()
    for _ in range(5):
        call = peer.chat()
        peer.answer(call.stream_id, TextDelta(text="x"))
        ids.add(peer.last_reply().json["id"])
    assert len(ids) == 5


def test_non_stream_tool_only_reply() -> None:
    peer = EnginePeer()
    call = peer.chat(tools=[WEATHER_TOOL])
    assert [t.name for t in call.request.tools] == ["get_weather"]
    peer.answer(call.stream_id, OSLO, Finish(usage=Usage(prompt_tokens=4, completion_tokens=1)))
    body = peer.last_reply().json
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["logprobs"] is None
    message = choice["message"]
    assert message["role"] == "assistant"
    assert message["content"] is None
    assert message["refusal"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_aaa",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert isinstance(message["tool_calls"][0]["function"]["arguments"], str)
    assert body["usage"]["total_tokens"] == 5


@pytest.mark.parametrize(
    ("tool_choice", "provider_reason", "expected"),
    [
        ("auto", None, "tool_calls"),
        ("auto", "stop", "tool_calls"),
        ("required", "tool_calls", "tool_calls"),
        ({"type": "function", "function": {"name": "get_weather"}}, None, "stop"),
        ({"type": "function", "function": {"name": "get_weather"}}, "tool_calls", "stop"),
        ("auto", "length", "length"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_finish_reason_of_tool_calls(
    tool_choice: Any, provider_reason: Any, expected: str, stream: bool
) -> None:
    peer = EnginePeer()
    call = peer.chat(tools=[WEATHER_TOOL], tool_choice=tool_choice, stream=stream)
    peer.answer(call.stream_id, OSLO, Finish(reason=provider_reason))
    reply = peer.last_reply()
    if stream:
        finishes = [f for _, _, f in choice_deltas(stream_chunks(reply.body)) if f]
        assert finishes == [expected]
    else:
        assert reply.json["choices"][0]["finish_reason"] == expected


def test_non_stream_text_and_tool_calls_and_no_finish_item() -> None:
    peer = EnginePeer()
    call = peer.chat(tools=[WEATHER_TOOL])
    peer.answer(call.stream_id, TextDelta(text="Let me check."), OSLO, STOCK)
    body = peer.last_reply().json
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me check."
    assert [c["id"] for c in message["tool_calls"]] == ["call_aaa", "call_bbb"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    # No Finish item: usage is still present, all zeros.
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_non_stream_empty_reply_is_well_formed() -> None:
    peer = EnginePeer()
    call = peer.chat()
    peer.done(call.stream_id)
    body = peer.last_reply().json
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["total_tokens"] == 0


def test_non_stream_n2_calls_the_provider_once_per_choice() -> None:
    peer = EnginePeer()
    first = peer.chat(n=2)
    peer.answer(first.stream_id, TextDelta(text="one"), Finish(usage=usage(1, 1)))
    assert peer.replies == []
    second = peer.calls[-1]
    assert second.stream_id != first.stream_id
    peer.answer(second.stream_id, TextDelta(text="two"), Finish(usage=usage(2, 3)))
    body = peer.last_reply().json
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["one", "two"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


# --- streaming -------------------------------------------------------------------------------


def test_stream_head_and_event_sequence() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat(stream=True)
    assert peer.wire == b""  # the 200 waits for the provider's first item
    peer.chunk(call.stream_id, TextDelta(text="Hel"))
    response = peer.current_response
    assert response is not None and response.status_code == 200
    head = Reply(response, b"")
    assert head.header("content-type") == "text/event-stream"
    assert head.header("cache-control") == "no-cache"
    assert head.header("x-accel-buffering") == "no"
    assert head.header("transfer-encoding") == "chunked"
    assert head.header("content-length") is None
    assert_common_headers(head)
    assert b'"content":"Hel"' in peer.partial_body  # flushed per event, not at the end
    peer.chunk(call.stream_id, TextDelta(text="lo"))
    peer.chunk(call.stream_id, Finish(reason="stop", usage=usage(9, 2)))
    peer.done(call.stream_id)
    reply = peer.last_reply()
    assert reply.body.endswith(b"data: [DONE]\n\n")
    chunks = stream_chunks(reply.body)
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    for c in chunks:
        assert c["id"].startswith("chatcmpl-")
        assert c["object"] == "chat.completion.chunk"
        assert type(c["created"]) is int and c["created"] == int(T0)
        assert c["model"] == "echo"
        assert "usage" not in c or c["usage"] is None  # no include_usage: no usage
    assert choice_deltas(chunks) == [
        (0, {"role": "assistant", "content": "", "refusal": None}, None),
        (0, {"content": "Hel"}, None),
        (0, {"content": "lo"}, None),
        (0, {}, "stop"),
    ]
    assert peer.completed[-1].streamed is True and peer.completed[-1].status == 200


@pytest.mark.parametrize("include_usage", [True, False, None])
def test_stream_usage_chunk_only_with_include_usage(include_usage: bool | None) -> None:
    peer = EnginePeer()
    options = {"include_usage": include_usage}
    call = peer.chat(stream=True, stream_options=options)
    peer.answer(call.stream_id, TextDelta(text="a"), Finish(usage=usage(4, 1)))
    chunks = stream_chunks(peer.last_reply().body)
    with_usage = [c for c in chunks if c.get("usage") is not None]
    if include_usage:
        assert with_usage == [chunks[-1]]
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 4,
            "completion_tokens": 1,
            "total_tokens": 5,
        }
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    else:
        assert with_usage == []
        assert all(c["choices"] for c in chunks)


def test_stream_tool_calls_opening_and_argument_deltas() -> None:
    peer = EnginePeer()
    call = peer.chat(stream=True, tools=[WEATHER_TOOL])
    peer.answer(call.stream_id, OSLO, STOCK)
    deltas = choice_deltas(stream_chunks(peer.last_reply().body))
    assert deltas == [
        (0, {"role": "assistant", "content": None}, None),
        (
            0,
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_aaa",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        (0, {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}]}, None),
        (
            0,
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_bbb",
                        "type": "function",
                        "function": {"name": "get_stock_price", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        (0, {"tool_calls": [{"index": 1, "function": {"arguments": '{"ticker":"NVDA"}'}}]}, None),
        (0, {}, "tool_calls"),
    ]


def test_stream_text_then_tool_call_has_text_role_chunk() -> None:
    peer = EnginePeer()
    call = peer.chat(stream=True, tools=[WEATHER_TOOL])
    peer.answer(call.stream_id, TextDelta(text="Checking"), OSLO)
    deltas = choice_deltas(stream_chunks(peer.last_reply().body))
    assert deltas[0][1] == {"role": "assistant", "content": "", "refusal": None}
    assert deltas[1][1] == {"content": "Checking"}
    assert deltas[2][1]["tool_calls"][0]["index"] == 0
    assert deltas[-1] == (0, {}, "tool_calls")
    roles = [d for _, d, _ in deltas if "role" in d]
    assert len(roles) == 1


def test_stream_content_with_sse_control_text_stays_one_event() -> None:
    nasty = "a\n\ndata: [DONE]\n\nb\r\nc\u2028d\x85e\x00f"
    peer = EnginePeer()
    call = peer.chat(stream=True)
    peer.answer(call.stream_id, TextDelta(text=nasty))
    deltas = choice_deltas(stream_chunks(peer.last_reply().body))
    assert deltas[1] == (0, {"content": nasty}, None)


def test_stream_n2_choices_are_sequential_and_usage_is_summed() -> None:
    peer = EnginePeer()
    first = peer.chat(stream=True, n=2, stream_options={"include_usage": True})
    peer.chunk(first.stream_id, TextDelta(text="one"))
    peer.chunk(first.stream_id, Finish(usage=usage(1, 1)))
    assert len(peer.calls) == 1  # the second choice waits for the first to end
    peer.done(first.stream_id)
    assert len(peer.calls) == 2
    second = peer.calls[-1]
    assert second.request == first.request
    peer.answer(second.stream_id, TextDelta(text="two"), Finish(usage=usage(2, 5)))
    chunks = stream_chunks(peer.last_reply().body)
    assert len({c["id"] for c in chunks}) == 1
    assert choice_deltas(chunks) == [
        (0, {"role": "assistant", "content": "", "refusal": None}, None),
        (0, {"content": "one"}, None),
        (0, {}, "stop"),
        (1, {"role": "assistant", "content": "", "refusal": None}, None),
        (1, {"content": "two"}, None),
        (1, {}, "stop"),
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_stream_empty_reply_is_well_formed() -> None:
    peer = EnginePeer()
    call = peer.chat(stream=True, stream_options={"include_usage": True})
    peer.done(call.stream_id)
    reply = peer.last_reply()
    assert reply.status == 200 and reply.header("content-type") == "text/event-stream"
    chunks = stream_chunks(reply.body)
    assert choice_deltas(chunks) == [
        (0, {"role": "assistant", "content": "", "refusal": None}, None),
        (0, {}, "stop"),
    ]
    assert chunks[-1]["usage"]["total_tokens"] == 0


def test_mid_stream_failure_sends_error_event_then_done_then_ends_body() -> None:
    peer = EnginePeer()
    call = peer.chat(stream=True)
    peer.chunk(call.stream_id, TextDelta(text="partial"))
    peer.failed(call.stream_id, ProviderError("engine crashed", status=500, code="internal"))
    reply = peer.last_reply()  # the chunked body ended properly (the oracle saw 0\r\n\r\n)
    assert reply.status == 200
    events = reply.events
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "message": "engine crashed",
            "type": "server_error",
            "param": None,
            "code": "internal",
        }
    }
    assert events[1]["choices"][0]["delta"] == {"content": "partial"}
    assert peer.wire.endswith(b"0\r\n\r\n")
    # The connection is still usable.
    assert peer.get("/health").status == 200


def test_stream_n2_failure_in_second_choice_is_an_error_event() -> None:
    peer = EnginePeer()
    first = peer.chat(stream=True, n=2)
    peer.answer(first.stream_id, TextDelta(text="one"))
    second = peer.calls[-1]
    peer.failed(second.stream_id, ProviderError("overloaded", status=503))
    events = peer.last_reply().events
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "overloaded"


@pytest.mark.parametrize(
    ("error", "status", "headers", "fields"),
    [
        (
            ProviderError("slow down", status=429, retry_after=2),
            429,
            {"retry-after": "2", "retry-after-ms": "2000"},
            {"type": "rate_limit_error"},
        ),
        (
            ProviderError("busy", status=503, retry_after=1.5),
            503,
            {"retry-after": "2", "retry-after-ms": "1500"},
            {"type": "service_unavailable"},
        ),
        (
            ProviderError(
                "The model `nope` does not exist",
                status=404,
                code="model_not_found",
                param="model",
            ),
            404,
            {},
            {"code": "model_not_found", "param": "model", "type": "invalid_request_error"},
        ),
        (ProviderError("bad upstream request", status=400), 400, {}, {}),
        (ProviderError("upstream crashed", status=500), 502, {}, {}),
        (ProviderError("connection refused", status=502), 502, {}, {}),
        (ProviderError("upstream timed out", status=504), 504, {}, {}),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_first_item_is_a_plain_http_error(
    error: ProviderError, status: int, headers: dict[str, str], fields: dict[str, Any], stream: bool
) -> None:
    peer = EnginePeer()
    call = peer.chat(stream=stream)
    peer.failed(call.stream_id, error)
    reply = peer.last_reply()
    assert_json_error(reply, status, message=error.message, **fields)
    for name, value in headers.items():
        assert reply.header(name) == value
    if not headers:
        assert reply.header("retry-after") is None
    assert not peer.transport_closed()
    assert peer.completed[-1].status == status and not peer.completed[-1].streamed


def test_late_results_for_finished_or_cancelled_streams_are_ignored() -> None:
    peer = EnginePeer()
    call = peer.chat()
    peer.answer(call.stream_id, TextDelta(text="x"))
    before = (bytes(peer.wire), len(peer.effects))
    peer.chunk(call.stream_id, TextDelta(text="late"))
    peer.done(call.stream_id)
    peer.failed(call.stream_id, ProviderError("late"))
    peer.models(call.stream_id, MODELS)
    peer.chunk(999, TextDelta(text="never asked"))
    assert (bytes(peer.wire), len(peer.effects)) == before

    # Timed out (cancelled) call: its late items change nothing either.
    call = peer.chat()
    peer.timer(peer.now + peer.config.provider_first_item_timeout)
    assert call.stream_id in peer.cancels
    assert peer.last_reply().status == 504
    before = (bytes(peer.wire), len(peer.effects))
    peer.chunk(call.stream_id, TextDelta(text="late"))
    peer.done(call.stream_id)
    assert (bytes(peer.wire), len(peer.effects)) == before


# --- models, health and routing -------------------------------------------------------------


@pytest.mark.parametrize("target", ["/v1/models", "/models", "/v1/models/", "/models/"])
def test_model_list(target: str) -> None:
    peer = EnginePeer()
    peer.request("GET", target)
    (listing,) = peer.listings
    assert listing.user_id == "1"
    assert peer.wire == b""
    peer.models(listing.stream_id, MODELS)
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    assert_common_headers(reply)
    assert reply.json == {
        "object": "list",
        "data": [
            {"id": "echo", "object": "model", "created": 1, "owned_by": "wirechat"},
            {"id": "meta-llama/Llama-3-8B", "object": "model", "created": 2, "owned_by": "meta"},
        ],
    }


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/models/echo", "echo"),
        ("/models/echo", "echo"),
        ("/v1/models/echo/", "echo"),
        ("/v1/models/meta-llama/Llama-3-8B", "meta-llama/Llama-3-8B"),
        ("/v1/models/meta-llama%2FLlama-3-8B", "meta-llama/Llama-3-8B"),
        ("/v1/models/meta-llama%2fLlama-3-8B?x=1", "meta-llama/Llama-3-8B"),
    ],
)
def test_model_by_id(target: str, expected: str) -> None:
    peer = EnginePeer()
    peer.request("GET", target)
    (listing,) = peer.listings
    peer.models(listing.stream_id, MODELS)
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.json["id"] == expected
    assert set(reply.json) == {"id", "object", "created", "owned_by"}
    assert reply.json["object"] == "model"


def test_unknown_model_id_is_404_model_not_found() -> None:
    peer = EnginePeer()
    peer.request("GET", "/v1/models/gpt-9")
    peer.models(peer.listings[0].stream_id, MODELS)
    error = assert_json_error(peer.last_reply(), 404, code="model_not_found", param="model")
    assert "gpt-9" in error["message"]


def test_model_listing_failure_and_timeout() -> None:
    peer = EnginePeer()
    peer.request("GET", "/v1/models")
    peer.failed(peer.listings[-1].stream_id, ProviderError("upstream down", status=500))
    assert_json_error(peer.last_reply(), 502)
    peer.request("GET", "/v1/models")
    sid = peer.listings[-1].stream_id
    peer.timer(peer.now + peer.config.provider_first_item_timeout)
    assert sid in peer.cancels
    assert_json_error(peer.last_reply(), 504)


@pytest.mark.parametrize("target", ["/health", "/ping", "/v1/health", "/health/", "/ping?x=1"])
def test_health_and_ping(target: str) -> None:
    peer = EnginePeer(now=T0 + 0.5)
    reply = peer.get(target)
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    assert_common_headers(reply)
    body = reply.json
    assert set(body) == {"status", "timestamp"} and body["status"] == "healthy"
    stamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert stamp.tzinfo is not None
    assert stamp == datetime.fromtimestamp(T0 + 0.5, UTC)
    assert peer.effects[-1] == RequestCompleted(
        method="GET",
        target=target.partition("?")[0],
        status=200,
        request_id=reply.header("x-request-id") or "",
        duration=0.0,
        user_id=None,  # a public route: nobody was authenticated
        route="health",
    )


def test_ping_is_not_on_the_chat_server_surface() -> None:
    peer = EnginePeer(EngineConfig(surface=Surface.CHAT_SERVER))
    assert peer.get("/health").status == 200
    assert_json_error(peer.get("/ping"), 404, code="unknown_url")


@pytest.mark.parametrize(
    ("method", "target", "path"),
    [
        ("GET", "/v1/nope", "/v1/nope"),
        ("POST", "/v1/v1/chat/completions", "/v1/v1/chat/completions"),
        (
            "GET",
            "/v1/chat/completions/chat/completions?key=secret",
            "/v1/chat/completions/chat/completions",
        ),
        ("GET", "/", "/"),
        ("GET", "/v1", "/v1"),
    ],
)
def test_unknown_path_is_404_unknown_url_with_exact_envelope(
    method: str, target: str, path: str
) -> None:
    peer = EnginePeer()
    peer.request(method, target)
    reply = peer.last_reply()
    assert reply.status == 404
    assert reply.json == {
        "error": {
            "message": f"Invalid URL ({method} {path})",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        },
        "detail": f"Invalid URL ({method} {path})",
    }
    assert reply.header("content-length") == str(len(reply.body))
    assert_common_headers(reply)
    assert not peer.transport_closed()


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [
        ("POST", "/v1/models", "GET"),
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models/echo", "GET"),
        ("POST", "/health", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(method: str, target: str, allowed: str) -> None:
    peer = EnginePeer()
    peer.request(method, target, body=b"{}" if method in ("POST", "PUT") else b"")
    reply = peer.last_reply()
    assert_json_error(reply, 405, type="invalid_request_error")
    allow = {m.strip() for m in (reply.header("allow") or "").split(",")}
    assert allowed in allow
    assert not peer.transport_closed()


@pytest.mark.parametrize("target", ["/v1/models", "/health", "/v1/nope"])
def test_head_request_gets_an_answer_not_an_exception(target: str) -> None:
    # A HEAD response carries no body: the engine must not try to write the JSON one through
    # h11 (which raises LocalProtocolError out of receive_data).
    peer = EnginePeer()
    peer.request("HEAD", target)
    if peer.listings:  # HEAD served like GET: answer the listing
        peer.models(peer.listings[0].stream_id, MODELS)
    reply = peer.last_reply()
    assert reply.status in (200, 404, 405)
    assert reply.body == b""
    assert reply.header("x-request-id")


# --- CORS preflight -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/models", "/v1/nope"])
def test_options_preflight_needs_no_auth(target: str) -> None:
    peer = EnginePeer(STATIC)
    peer.request(
        "OPTIONS",
        target,
        [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")],
    )
    reply = peer.last_reply()
    assert reply.status == 204
    assert reply.body == b""
    assert reply.header("x-request-id")
    assert reply.header("www-authenticate") is None
    assert reply.header("access-control-allow-origin") is None  # no cors_origins configured
    assert peer.calls == [] and not peer.transport_closed()


def _methods(header: str | None) -> set[str]:
    return {m.strip() for m in (header or "").split(",")} - {""}


GET_ALLOW = {"GET", "HEAD", "OPTIONS"}
POST_ALLOW = {"POST", "OPTIONS"}
ANY_ALLOW = {"GET", "HEAD", "POST", "OPTIONS"}


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("/v1/models", GET_ALLOW),
        ("/models/", GET_ALLOW),
        ("/v1/models/echo", GET_ALLOW),
        ("/v1/models/meta-llama%2FLlama", GET_ALLOW),
        ("/v1/chat/completions", POST_ALLOW),
        ("/chat/completions/", POST_ALLOW),
        ("/health", GET_ALLOW),
        ("/ping?x=1", GET_ALLOW),
        ("/openapi.json", GET_ALLOW),
        ("/workflows", GET_ALLOW),
        ("/workflows/summarize/run", POST_ALLOW),
        ("/workflows/summarize/run/stream", POST_ALLOW),
        ("/chat", GET_ALLOW),
        ("/predict", GET_ALLOW),
        # No endpoint there: every method the server has (see routing.ANY_PATH_ALLOW).
        ("/v1/nope", ANY_ALLOW),
        ("*", ANY_ALLOW),
    ],
)
def test_options_allow_lists_the_methods_of_the_path(target: str, allowed: set[str]) -> None:
    peer = EnginePeer(STATIC)
    peer.request("OPTIONS", target)
    reply = peer.last_reply()
    assert reply.status == 204
    assert _methods(reply.header("allow")) == allowed
    assert reply.header("www-authenticate") is None
    assert peer.calls == [] and not peer.transport_closed()


def test_options_allow_follows_the_surface() -> None:
    # The chat server has no /chat, /ping or workflows: OPTIONS there is an unknown path's.
    peer = EnginePeer(EngineConfig(surface=Surface.CHAT_SERVER))
    for target in ("/chat", "/ping", "/workflows"):
        peer.request("OPTIONS", target)
        assert _methods(peer.last_reply().header("allow")) == ANY_ALLOW, target
    peer.request("OPTIONS", "/v1/models")
    assert _methods(peer.last_reply().header("allow")) == GET_ALLOW


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/echo"),
        ("GET", "/v1/chat/completions"),
        ("PUT", "/workflows/summarize/run"),
        ("POST", "/chat"),
    ],
)
def test_405_allow_is_the_options_allow(method: str, target: str) -> None:
    peer = EnginePeer()
    peer.request(method, target, body=b"{}" if method in ("POST", "PUT") else b"")
    refused = peer.last_reply()
    assert refused.status == 405
    peer.request("OPTIONS", target)
    assert _methods(refused.header("allow")) == _methods(peer.last_reply().header("allow"))
    assert method not in _methods(refused.header("allow"))


def test_options_preflight_with_cors_origins_reflects_requested_headers() -> None:
    config = dataclasses.replace(STATIC, cors_origins=("https://app.example",))
    peer = EnginePeer(config)
    asked = "authorization, content-type, x-stainless-retry-count, x-stainless-read-timeout"
    peer.request(
        "OPTIONS",
        "/v1/chat/completions",
        [
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", asked),
        ],
    )
    reply = peer.last_reply()
    assert reply.status == 204
    assert reply.header("access-control-allow-origin") == "https://app.example"
    assert reply.header("access-control-allow-headers") == asked
    assert _methods(reply.header("access-control-allow-methods")) == POST_ALLOW
    assert _methods(reply.header("allow")) == POST_ALLOW
    assert reply.header("access-control-allow-credentials") is None

    # A GET path grants its own methods, not POST.
    peer.request("OPTIONS", "/v1/models", [("Origin", "https://app.example")])
    assert _methods(peer.last_reply().header("access-control-allow-methods")) == GET_ALLOW

    # An origin that is not configured gets no CORS grant.
    peer.request("OPTIONS", "/v1/models", [("Origin", "https://evil.example")])
    assert peer.last_reply().header("access-control-allow-origin") is None


def test_cors_headers_on_ordinary_responses() -> None:
    peer = EnginePeer(EngineConfig(cors_origins=("*",)))
    reply = peer.get("/health", [("Origin", "https://anything.example")])
    assert reply.header("access-control-allow-origin") == "*"
    exposed = (reply.header("access-control-expose-headers") or "").lower()
    assert "x-request-id" in exposed
    assert peer.get("/health").header("access-control-allow-origin") is None  # no Origin


# --- request ids ------------------------------------------------------------------------------


def test_sane_client_request_id_is_echoed_everywhere() -> None:
    peer = EnginePeer()
    rid = "trace-01HF.x:9_Z-" + "r" * 111
    assert len(rid) == 128
    call = peer.chat(headers=[("X-Request-Id", rid)])
    peer.answer(call.stream_id, TextDelta(text="x"))
    assert peer.last_reply().header("x-request-id") == rid
    assert peer.completed[-1].request_id == rid
    assert peer.get("/nope", [("X-Request-Id", rid)]).header("x-request-id") == rid


@pytest.mark.parametrize(
    "supplied", ["has spaces in it", "a" * 129, "a" * 300, "semi;colon", "", b"caf\xe9", "<script>"]
)
def test_insane_client_request_id_is_replaced(supplied: str | bytes) -> None:
    peer = EnginePeer()
    reply = peer.get("/health", [("X-Request-Id", supplied)])
    rid = reply.header("x-request-id")
    assert rid and rid != supplied
    assert rid.startswith("req_") and len(rid) <= 128
    assert peer.completed[-1].request_id == rid


def test_generated_request_ids_differ() -> None:
    peer = EnginePeer()
    ids = {peer.get("/health").header("x-request-id") for _ in range(4)}
    assert len(ids) == 4


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sk-bad", "Bearer", "Basic c2stZ29vZA==", "sk-good", "Bearer sk-good extra"],
)
def test_static_auth_refuses_missing_or_invalid_token(authorization: str | None) -> None:
    peer = EnginePeer(STATIC)
    headers = [("Authorization", authorization)] if authorization is not None else []
    call = peer.post_chat(chat_body(), headers)
    assert call is None
    reply = peer.last_reply()
    assert_json_error(reply, 401, code="invalid_api_key", type="invalid_request_error")
    assert reply.header("www-authenticate") == "Bearer"
    assert not peer.transport_closed()
    assert peer.completed[-1].user_id is None


def test_static_auth_non_ascii_token_is_401_not_an_exception() -> None:
    peer = EnginePeer(STATIC)
    raw = b"GET /v1/models HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-g\xc3\xb6\xf6d\r\n\r\n"
    peer.send_raw(raw, target="/v1/models")
    reply = peer.last_reply()
    assert_json_error(reply, 401, code="invalid_api_key")
    assert reply.header("www-authenticate") == "Bearer"
    assert peer.listings == []


def test_static_auth_valid_token_passes_with_the_keys_user_id() -> None:
    peer = EnginePeer(STATIC)
    call = peer.chat(headers=[("Authorization", "Bearer sk-good")])
    assert call.user_id == "alice"
    peer.answer(call.stream_id, TextDelta(text="x"))
    assert peer.last_reply().status == 200
    assert peer.completed[-1].user_id == "alice"

    call = peer.chat(headers=[("Authorization", "bearer sk-other")])
    assert call.user_id.startswith("key-")
    assert "sk-other" not in call.user_id
    assert "sk-other" not in repr(peer.effects)

    peer.request("GET", "/v1/models", [("Authorization", "Bearer sk-good")])
    # The previous chat is still waiting: the listing comes after it is answered.
    peer.answer(call.stream_id, TextDelta(text="y"))
    assert peer.listings[-1].user_id == "alice"


def test_static_auth_exempts_health() -> None:
    peer = EnginePeer(STATIC)
    assert peer.get("/health").status == 200
    assert peer.get("/ping").status == 200


# --- connection management ----------------------------------------------------------------


def test_keep_alive_serves_sequential_requests() -> None:
    peer = EnginePeer()
    for text in ("one", "two", "three"):
        call = peer.chat()
        peer.answer(call.stream_id, TextDelta(text=text))
        assert peer.last_reply().json["choices"][0]["message"]["content"] == text
        stream = peer.chat(stream=True)
        peer.answer(stream.stream_id, TextDelta(text=text))
        assert stream_chunks(peer.last_reply().body)[1]["choices"][0]["delta"]["content"] == text
    assert len(peer.replies) == 6
    assert not peer.transport_closed()
    assert len({c.stream_id for c in peer.calls}) == 6


def test_pipelined_requests_in_one_read_are_answered_in_order() -> None:
    peer = EnginePeer()
    data = (
        encode_request("GET", "/health", [("X-Request-Id", "r1")])
        + encode_request("GET", "/nope", [("X-Request-Id", "r2")])
        + encode_request("GET", "/ping", [("X-Request-Id", "r3")])
    )
    for target in ("/health", "/nope", "/ping"):
        peer.expect("GET", target)
    peer.feed(data)
    assert [r.header("x-request-id") for r in peer.replies] == ["r1", "r2", "r3"]
    assert [r.status for r in peer.replies] == [200, 404, 200]


def test_pipelined_request_waits_for_the_one_in_flight() -> None:
    peer = EnginePeer()
    body = chat_body(stream=True)
    data = encode_request("POST", "/v1/chat/completions", [], body) + encode_request(
        "GET", "/health"
    )
    peer.expect("POST", "/v1/chat/completions")
    peer.expect("GET", "/health")
    peer.feed(data)
    (call,) = peer.calls
    assert peer.wire == b""
    peer.chunk(call.stream_id, TextDelta(text="x"))
    assert peer.replies == []  # the health check does not overtake the stream
    peer.done(call.stream_id)
    assert [r.status for r in peer.replies] == [200, 200]
    assert peer.replies[0].header("content-type") == "text/event-stream"
    assert peer.replies[1].json["status"] == "healthy"


def test_pipelined_bad_request_behind_a_provider_call_is_refused_not_raised() -> None:
    # The bad head is only examined once the first response is done, from provider_done:
    # it must still become a 400 and a close, never an exception out of the engine.
    peer = EnginePeer()
    peer.expect("POST", "/v1/chat/completions")
    peer.expect("GET", "/")
    peer.feed(
        encode_request("POST", "/v1/chat/completions", [], chat_body())
        + b"GET / HTTP/1.1\nHost: a\n\n"
    )
    (call,) = peer.calls
    peer.answer(call.stream_id, TextDelta(text="x"))
    assert [r.status for r in peer.replies] == [200, 400]
    assert peer.transport_closed()


def test_pipelined_request_after_a_framing_4xx_is_not_processed() -> None:
    peer = EnginePeer()
    bad = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    peer.expect("GET", "/health")
    peer.expect("POST", "/v1/chat/completions")
    peer.expect("GET", "/health")
    peer.feed(encode_request("GET", "/health") + bad + encode_request("GET", "/health"))
    assert [r.status for r in peer.replies] == [200, 400]
    assert peer.replies[1].header("connection") == "close"
    assert peer.transport_closed() and peer.server_closed()
    assert len(peer.completed) == 1
    peer.feed(encode_request("GET", "/health"))
    assert len(peer.replies) == 2


def test_pipelined_request_after_connection_close_is_not_processed() -> None:
    peer = EnginePeer()
    peer.expect("GET", "/health", close=True)
    peer.feed(
        encode_request("GET", "/health", [("Connection", "close")])
        + encode_request("GET", "/v1/models")
    )
    assert [r.status for r in peer.replies] == [200]
    assert peer.transport_closed() and peer.listings == []


def test_body_of_a_get_is_skipped_before_the_next_pipelined_request() -> None:
    peer = EnginePeer()
    peer.expect("GET", "/health")
    peer.expect("GET", "/ping")
    peer.feed(
        encode_request("GET", "/health", [], b"GET /v1/models HTTP/1.1\r\n\r\n")
        + encode_request("GET", "/ping", [], [b"ab", b"cd"], chunked=True)
    )
    assert [r.status for r in peer.replies] == [200, 200]
    assert peer.listings == [] and not peer.transport_closed()


def test_http10_request_is_answered_and_closed() -> None:
    peer = EnginePeer()
    peer.send_raw(b"GET /health HTTP/1.0\r\n\r\n", target="/health")
    reply = peer.last_reply()
    assert reply.status == 200 and reply.json["status"] == "healthy"
    assert peer.transport_closed()


def test_http10_stream_is_close_delimited() -> None:
    peer = EnginePeer()
    body = chat_body(stream=True)
    raw = b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    peer.send_raw(raw, method="POST", target="/v1/chat/completions")
    (call,) = peer.calls
    peer.answer(call.stream_id, TextDelta(text="old"))
    reply = peer.last_reply()  # the oracle only completes it at EOF
    assert reply.header("transfer-encoding") is None
    assert stream_chunks(reply.body)[1]["choices"][0]["delta"] == {"content": "old"}
    assert peer.transport_closed()


def test_connection_close_is_honoured() -> None:
    peer = EnginePeer()
    peer.request("GET", "/health", [("Connection", "close")])
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.header("connection") == "close"
    assert peer.transport_closed() and peer.server_closed()
    assert peer.server.next_deadline() is None


def test_connection_close_after_a_stream() -> None:
    peer = EnginePeer()
    call = peer.chat(headers=[("Connection", "close")], stream=True)
    peer.answer(call.stream_id, TextDelta(text="bye"))
    assert peer.last_reply().header("connection") == "close"
    assert peer.transport_closed()


def test_expect_100_continue_gets_100_then_the_response() -> None:
    peer = EnginePeer()
    body = chat_body()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    peer.send_raw(head, method="POST", target="/v1/chat/completions")
    assert [i.status_code for i in peer.informational] == [100]
    assert peer.replies == [] and peer.calls == []
    peer.feed(body)
    (call,) = peer.calls
    peer.answer(call.stream_id, TextDelta(text="x"))
    assert peer.last_reply().status == 200
    assert not peer.transport_closed()


def test_expect_100_continue_refused_when_auth_fails() -> None:
    peer = EnginePeer(STATIC)
    body = chat_body()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer nope\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    peer.send_raw(head, method="POST", target="/v1/chat/completions")
    assert peer.informational == []
    reply = peer.last_reply()
    assert_json_error(reply, 401, code="invalid_api_key")
    assert reply.header("connection") == "close"
    assert peer.transport_closed()
    peer.feed(body)  # the held-back body is never parsed as a request
    assert len(peer.replies) == 1 and peer.calls == []


def test_expect_100_continue_with_oversized_length_is_413() -> None:
    peer = EnginePeer(EngineConfig(max_body_bytes=100))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
        b"Expect: 100-continue\r\nContent-Length: 101\r\n\r\n"
    )
    peer.send_raw(head, method="POST", target="/v1/chat/completions")
    assert peer.informational == []
    assert peer.last_reply().status == 413
    assert peer.transport_closed()


def test_eof_while_waiting_for_a_non_stream_reply_cancels_the_provider() -> None:
    peer = EnginePeer()
    call = peer.chat()
    peer.take_effects()
    peer.eof()
    effects = peer.take_effects()
    assert peer.cancels == [call.stream_id]
    kinds = [type(e).__name__ for e in effects]
    assert kinds.index("CancelProvider") < kinds.index("CloseTransport")
    assert any(isinstance(e, CloseTransport) for e in effects)
    assert peer.wire == b""
    assert peer.server_closed() and peer.server.next_deadline() is None
    peer.chunk(call.stream_id, TextDelta(text="late"))
    peer.done(call.stream_id)
    assert peer.wire == b""


def test_eof_mid_stream_cancels_the_provider() -> None:
    peer = EnginePeer()
    call = peer.chat(stream=True)
    peer.chunk(call.stream_id, TextDelta(text="x"))
    written = len(peer.wire)
    peer.eof()
    assert peer.cancels == [call.stream_id]
    assert peer.transport_closed()
    peer.chunk(call.stream_id, TextDelta(text="late"))
    peer.done(call.stream_id)
    assert len(peer.wire) == written


def test_eof_when_idle_just_closes() -> None:
    peer = EnginePeer()
    assert peer.get("/health").status == 200
    peer.eof()
    assert peer.cancels == [] and peer.transport_closed()


# --- timers -------------------------------------------------------------------------------------


def test_fresh_idle_connection_closes_quietly_at_head_timeout() -> None:
    peer = EnginePeer(now=T0)
    assert peer.server.next_deadline() == T0 + peer.config.head_timeout
    peer.timer(T0 + peer.config.head_timeout - 0.01)  # early calls are harmless
    assert not peer.transport_closed()
    peer.timer(T0 + peer.config.head_timeout)
    assert peer.transport_closed()
    assert peer.wire == b""
    assert peer.server.next_deadline() is None


def test_partial_head_gets_408_at_the_head_deadline_even_when_trickled() -> None:
    peer = EnginePeer(now=T0)
    peer.expect("GET", "/health")
    peer.feed(b"GET /health HTTP/1.1\r\n", now=T0 + 1)
    deadline = T0 + 1 + peer.config.head_timeout
    assert peer.server.next_deadline() == deadline
    for i in range(2, 10):  # slowloris: one line every second does not extend the deadline
        peer.feed(b"X-Slow-%d: a\r\n" % i, now=T0 + i)
        assert peer.server.next_deadline() == deadline
    peer.timer(deadline - 0.5)
    assert peer.replies == []
    peer.timer(deadline)
    reply = peer.last_reply()
    assert reply.status == 408
    assert reply.header("connection") == "close"
    check_error_envelope(reply.json)
    assert peer.transport_closed()


def test_stalled_body_gets_408_after_the_body_timeout() -> None:
    peer = EnginePeer(now=T0)
    body = chat_body()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    peer.send_raw(head + body[:10], method="POST", target="/v1/chat/completions")
    assert peer.server.next_deadline() == T0 + peer.config.body_timeout
    peer.feed(body[10:20], now=T0 + 20)  # every read restarts the body timer
    assert peer.server.next_deadline() == T0 + 20 + peer.config.body_timeout
    peer.timer(T0 + 20 + peer.config.body_timeout)
    reply = peer.last_reply()
    assert reply.status == 408 and reply.header("connection") == "close"
    assert peer.transport_closed() and peer.calls == []


def test_keep_alive_connection_closes_quietly_after_keepalive_timeout() -> None:
    peer = EnginePeer(now=T0)
    assert peer.get("/health").status == 200
    wire = bytes(peer.wire)
    assert peer.server.next_deadline() == T0 + peer.config.keepalive_timeout
    peer.timer(T0 + peer.config.keepalive_timeout)
    assert peer.transport_closed()
    assert bytes(peer.wire) == wire


def test_provider_first_item_timeout_cancels_and_answers_504() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat(stream=True)
    deadline = T0 + peer.config.provider_first_item_timeout
    assert peer.server.next_deadline() == deadline
    peer.timer(deadline)
    assert peer.cancels == [call.stream_id]
    reply = peer.last_reply()
    assert_json_error(reply, 504)
    assert reply.header("content-type") == "application/json"
    assert not peer.transport_closed()  # the connection stays usable
    assert peer.get("/health").status == 200


def test_provider_idle_timeout_mid_stream_ends_with_error_event() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat(stream=True)
    peer.chunk(call.stream_id, TextDelta(text="a"), now=T0 + 5)
    assert peer.server.next_deadline() == T0 + 5 + peer.config.provider_idle_timeout
    peer.chunk(call.stream_id, TextDelta(text="b"), now=T0 + 50)
    deadline = T0 + 50 + peer.config.provider_idle_timeout
    assert peer.server.next_deadline() == deadline
    peer.timer(deadline)
    assert peer.cancels == [call.stream_id]
    events = peer.last_reply().events
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["a", "b"]


def test_next_deadline_follows_the_phases() -> None:
    cfg = EngineConfig(
        head_timeout=7.0,
        body_timeout=11.0,
        keepalive_timeout=3.0,
        provider_first_item_timeout=13.0,
        provider_idle_timeout=17.0,
    )
    peer = EnginePeer(cfg, now=T0)
    assert peer.server.next_deadline() == T0 + 7
    body = chat_body()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    peer.expect("POST", "/v1/chat/completions")
    peer.feed(head[:5], now=T0 + 1)
    assert peer.server.next_deadline() == T0 + 1 + 7
    peer.feed(head[5:], now=T0 + 2)
    assert peer.phase() is Phase.BODY
    assert peer.server.next_deadline() == T0 + 2 + 11
    peer.feed(body, now=T0 + 3)
    assert peer.phase() is Phase.WORKING
    assert peer.server.next_deadline() == T0 + 3 + 13
    call = peer.calls[-1]
    peer.chunk(call.stream_id, TextDelta(text="x"), now=T0 + 4)
    assert peer.server.next_deadline() == T0 + 4 + 17
    peer.done(call.stream_id, now=T0 + 5)
    assert peer.phase() is Phase.IDLE
    assert peer.server.next_deadline() == T0 + 5 + 3
    peer.shutdown(now=T0 + 6)
    assert peer.server_closed() and peer.server.next_deadline() is None


# --- graceful shutdown ------------------------------------------------------------------------


def test_shutdown_closes_an_idle_connection_at_once() -> None:
    peer = EnginePeer()
    assert peer.get("/health").status == 200
    wire = bytes(peer.wire)
    peer.shutdown()
    assert peer.transport_closed() and peer.server_closed()
    assert bytes(peer.wire) == wire


def test_shutdown_lets_an_in_flight_stream_finish_then_closes() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat(stream=True)
    peer.chunk(call.stream_id, TextDelta(text="a"))
    peer.shutdown(now=T0 + 1)
    assert not peer.transport_closed()
    assert peer.server.next_deadline() == min(
        T0 + 1 + peer.config.shutdown_grace, T0 + peer.config.provider_idle_timeout
    )
    peer.answer(call.stream_id, TextDelta(text="b"), now=T0 + 2)
    chunks = stream_chunks(peer.last_reply().body)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert peer.transport_closed()


def test_shutdown_before_the_stream_head_marks_it_connection_close() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat(stream=True)
    peer.shutdown(now=T0 + 1)
    peer.chunk(call.stream_id, TextDelta(text="a"), now=T0 + 2)
    response = peer.current_response
    assert response is not None
    assert Reply(response, b"").header("connection") == "close"
    peer.done(call.stream_id)
    assert peer.transport_closed()


def test_shutdown_lets_a_non_stream_request_finish_with_connection_close() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat()
    peer.shutdown(now=T0 + 1)
    peer.answer(call.stream_id, TextDelta(text="done"), now=T0 + 2)
    reply = peer.last_reply()
    assert reply.status == 200 and reply.header("connection") == "close"
    assert peer.transport_closed()


def test_shutdown_grace_deadline_ends_a_stream_with_an_error_event() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat(stream=True)
    peer.chunk(call.stream_id, TextDelta(text="a"), now=T0 + 1)
    peer.shutdown(now=T0 + 2)
    grace_end = T0 + 2 + peer.config.shutdown_grace
    assert peer.server.next_deadline() == grace_end
    peer.chunk(call.stream_id, TextDelta(text="b"), now=T0 + 3)
    peer.timer(grace_end)
    events = peer.last_reply().events
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_shutdown"
    assert peer.cancels == [call.stream_id]
    assert peer.transport_closed() and peer.server_closed()
    peer.chunk(call.stream_id, TextDelta(text="late"))


def test_shutdown_grace_deadline_answers_a_waiting_request_503() -> None:
    peer = EnginePeer(now=T0)
    call = peer.chat()
    peer.shutdown(now=T0 + 1)
    peer.timer(T0 + 1 + peer.config.shutdown_grace)
    reply = peer.last_reply()
    assert_json_error(reply, 503)
    assert reply.header("retry-after")
    assert reply.header("connection") == "close"
    assert peer.cancels == [call.stream_id]
    assert peer.transport_closed()


def test_request_arriving_during_shutdown_gets_503() -> None:
    peer = EnginePeer(now=T0)
    peer.expect("GET", "/v1/models")
    peer.feed(b"GET /v1/models HTTP/1.1\r\n")
    peer.shutdown(now=T0 + 1)
    assert not peer.transport_closed()  # a request is on its way
    peer.feed(b"Host: a\r\n\r\n", now=T0 + 2)
    reply = peer.last_reply()
    assert_json_error(reply, 503)
    assert reply.header("retry-after")
    assert reply.header("connection") == "close"
    assert peer.listings == []
    assert peer.transport_closed()


# --- back-pressure and notices -----------------------------------------------------------------


def test_reading_pauses_when_too_much_is_pipelined() -> None:
    peer = EnginePeer(EngineConfig(max_pipelined_bytes=200))
    call = peer.chat()
    assert not peer.reading_paused()
    extra = b"".join(encode_request("GET", "/health") for _ in range(6))
    assert len(extra) > 200
    for _ in range(6):
        peer.expect("GET", "/health")
    peer.feed(extra)
    assert peer.reading_paused()
    assert peer.replies == []
    peer.answer(call.stream_id, TextDelta(text="x"))
    assert not peer.reading_paused()
    assert [r.status for r in peer.replies] == [200] * 7


def test_request_completed_notice_has_no_query_string() -> None:
    peer = EnginePeer(now=T0)
    peer.request("GET", "/v1/models?api_key=sk-secret&x=1")
    peer.models(peer.listings[0].stream_id, MODELS, now=T0 + 0.25)
    notice = peer.completed[-1]
    assert notice.target == "/v1/models"
    assert notice.method == "GET" and notice.status == 200
    assert notice.duration == pytest.approx(0.25)
    assert "sk-secret" not in repr(peer.effects)


def test_request_completed_for_errors_and_streams() -> None:
    peer = EnginePeer()
    peer.get("/nope?token=abc")
    assert peer.completed[-1].target == "/nope" and peer.completed[-1].status == 404
    call = peer.chat(stream=True)
    peer.answer(call.stream_id, TextDelta(text="x"))
    assert peer.completed[-1].streamed and peer.completed[-1].status == 200


# --- split feeding ---------------------------------------------------------------------------


def _normalized_effects(effects: list[Output]) -> list[Output]:
    out: list[Output] = []
    for effect in effects:
        if isinstance(effect, RequestCompleted):
            effect = dataclasses.replace(effect, request_id="x")
        out.append(effect)
    return out


def _scenario(split: Splitter) -> tuple[bytes, list[Output], list[tuple[int, Any]]]:
    """Several requests on one connection, each fed with ``split``; returns what came out."""
    peer = EnginePeer(now=T0, split=split)
    # 1. A streamed completion with a tool call.
    call = peer.chat(stream=True, tools=[WEATHER_TOOL], stream_options={"include_usage": True})
    peer.answer(call.stream_id, TextDelta(text="hi "), OSLO, Finish(usage=usage(2, 3)))
    # 2. A chunked, non-streamed completion with a query and a request id.
    peer.request(
        "POST",
        "/v1/chat/completions?x=1",
        [("X-Request-Id", "split-test"), ("Content-Type", "application/json")],
        [chat_body()[:7], chat_body()[7:20], chat_body()[20:]],
        chunked=True,
    )
    peer.answer(peer.calls[-1].stream_id, TextDelta(text="plain"))
    # 3. Pipelined: model listing, a 404 and health in one write.
    for target in ("/v1/models/meta-llama%2FLlama-3-8B", "/v1/nope", "/health"):
        peer.expect("GET", target)
    peer.feed(
        encode_request("GET", "/v1/models/meta-llama%2FLlama-3-8B")
        + encode_request("GET", "/v1/nope")
        + encode_request("GET", "/health")
    )
    peer.models(peer.listings[-1].stream_id, MODELS)
    # 4. A request refused for bad JSON, then one that closes the connection.
    peer.post_chat(b'{"model": "echo", "messages": [}')
    peer.request("GET", "/health", [("Connection", "close")])
    parsed = [
        (r.status, r.json if r.body[:1] == b"{" else stream_chunks(r.body)) for r in peer.replies
    ]
    for _status, payload in parsed:
        if isinstance(payload, dict) and "id" in payload:
            payload["id"] = "x"
        if isinstance(payload, list):
            for chunk in payload:
                chunk["id"] = "x"
    assert len(parsed) == 7 and peer.transport_closed()
    return normalized(bytes(peer.wire)), _normalized_effects(peer.effects), parsed


@functools.cache
def _whole_scenario() -> tuple[bytes, list[Output], list[tuple[int, Any]]]:
    return _scenario(whole)


def test_byte_by_byte_feeding_gives_identical_results() -> None:
    assert _scenario(bytewise) == _whole_scenario()


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(points=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_random_split_points_give_identical_results(points: list[int]) -> None:
    assert _scenario(split_at(points)) == _whole_scenario()


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(points=st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=8))
def test_pipelined_stream_and_requests_split_anywhere(points: list[int]) -> None:
    body = chat_body(stream=True)
    data = (
        encode_request("POST", "/v1/chat/completions", [], body)
        + encode_request("GET", "/health")
        + encode_request("POST", "/v1/chat/completions", [], chat_body(n=2))
    )

    def run(split: Splitter) -> tuple[bytes, list[Output]]:
        peer = EnginePeer(now=T0)
        for method, target in (
            ("POST", "/v1/chat/completions"),
            ("GET", "/health"),
            ("POST", "/v1/chat/completions"),
        ):
            peer.expect(method, target)
        peer.feed(data, split=split)
        peer.answer(peer.calls[-1].stream_id, TextDelta(text="s"))
        peer.answer(peer.calls[-1].stream_id, TextDelta(text="c0"))
        peer.answer(peer.calls[-1].stream_id, TextDelta(text="c1"))
        assert [r.status for r in peer.replies] == [200, 200, 200]
        return normalized(bytes(peer.wire)), _normalized_effects(peer.effects)

    assert run(split_at(points)) == run(whole)


def test_split_feeding_json_sanity() -> None:
    wire, _effects, parsed = _whole_scenario()
    assert b"HTTP/1.1 200" in wire
    statuses = [status for status, _ in parsed]
    assert statuses == [200, 200, 200, 404, 200, 400, 200]
    assert json.dumps(parsed)  # plain data all the way down


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_mid_answer_leaves_one_abandoned_record(stream: bool) -> None:
    """EOF with an answer incomplete: one ``RequestAbandoned`` (status 499, no query in the
    target), no ``RequestCompleted``; EOF between requests leaves none."""
    from wirechat.engine import RequestAbandoned

    peer = EnginePeer()
    finish = peer.chat()
    peer.answer(finish.stream_id, TextDelta(text="done"))
    call = peer.post_chat(chat_body(stream=stream), target="/v1/chat/completions?x=secret")
    assert call is not None
    if stream:
        peer.chunk(call.stream_id, TextDelta(text="half"))
    peer.eof()
    (gone,) = peer.of_type(RequestAbandoned)
    assert gone.record.status == 499 and gone.record.streamed is stream
    assert gone.record.target == "/v1/chat/completions"
    assert [c.status for c in peer.completed] == [200]
    assert call.stream_id in peer.cancels

    idle = EnginePeer()
    idle.chat()
    idle.answer(idle.calls[0].stream_id, TextDelta(text="x"))
    idle.eof()
    assert idle.of_type(RequestAbandoned) == []


@pytest.mark.parametrize("stream", [True, False])
def test_has_only_data_marks_the_inputs_whose_output_is_bytes_alone(stream: bool) -> None:
    """The transport writes ``data_to_send()`` and skips the rest of its pass when
    ``has_only_data``: it must never hide an effect or a notice."""
    from wirechat.engine import CallProvider, ServerConnection

    conn = ServerConnection(EngineConfig(), T0)
    body = chat_body(stream=stream)
    conn.receive_data(encode_request("POST", "/v1/chat/completions", [], body), T0)
    assert not conn.has_only_data  # a CallProvider is out
    (call,) = [e for e in conn.effects() if isinstance(e, CallProvider)]
    conn.data_to_send()
    seen: list[tuple[bool, bool, bool]] = []
    for word in ("one ", "two ", "three"):
        conn.provider_chunk(call.stream_id, TextDelta(text=word), T0)
        only = conn.has_only_data
        effects, data = conn.effects(), conn.data_to_send()
        seen.append((only, bool(effects), bool(data)))
        assert not (only and effects)
    if stream:
        # the first token starts the response (a FirstTokenSent notice); the rest are bytes
        assert seen == [(False, True, True), (True, False, True), (True, False, True)]
    else:
        assert seen == [(False, False, False)] * 3  # gathered until the end: nothing at all
    if stream:
        conn.start_shutdown(T0)
        conn.effects(), conn.data_to_send()
        conn.provider_chunk(call.stream_id, TextDelta(text="four"), T0)
        assert conn.data_to_send() and not conn.effects()
        conn.provider_chunk(call.stream_id, TextDelta(text="five"), T0)
        assert not conn.has_only_data  # bytes alone, but a shutdown wants the whole pass
    conn.provider_done(call.stream_id, T0)
    assert not conn.has_only_data  # the end of the exchange: its access-log record is out


def test_a_workflow_run_over_http_starts_its_job_with_the_callers_key() -> None:
    """The job's own model calls are then admitted against that key's limits."""
    from wirechat.engine.chat import WorkflowSpec
    from wirechat.engine.events import StartJob

    config = dataclasses.replace(
        STATIC, workflows=(WorkflowSpec(id="summarize", name="S", description="", inputs=()),)
    )
    peer = EnginePeer(config)
    peer.request("POST", "/workflows/summarize/run", [("Authorization", "Bearer sk-good")], b"{}")
    (start,) = peer.of_type(StartJob)
    assert start.key == STATIC.static_keys[0] and start.user_id == "alice"
