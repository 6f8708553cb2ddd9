"""``supabase`` auth in the sans-IO engine: the ``VerifyToken`` effect and its verdicts.

The engine never asks Supabase itself: a token that is no static key becomes a
``VerifyToken(op_id, token)`` effect, the request waits (its body still read, nothing
dispatched), and the test plays the verifier with ``token_verified`` / ``token_check_failed``
(the allowed test double). An ``h11`` client (``EnginePeer``) and a ``wsproto`` client
(``WsPeer``) parse everything the engine writes. PROTOCOL.md §3.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from engine_peer import EnginePeer, Reply, chat_body, encode_request, split_at
from hypothesis import given, settings
from hypothesis import strategies as st
from wirechat.engine import (
    AuthMode,
    CallProvider,
    EngineConfig,
    ListModels,
    RequestCompleted,
    StaticKey,
    TextDelta,
    VerifyToken,
)
from wirechat.engine.events import JobCommand, OpenThread
from ws_peer import T0, WsPeer, frame, only

SUPABASE = EngineConfig(
    auth_mode=AuthMode.SUPABASE,
    static_keys=(StaticKey.from_token("sk-static", name="ops"),),
    auth_timeout=5.0,
    ws_ping_interval=1e6,
)
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
BEARER = [("Authorization", f"Bearer {JWT}")]


def verdicts(peer: EnginePeer | WsPeer) -> list[VerifyToken]:
    return peer.of_type(VerifyToken)


def verified(peer: EnginePeer | WsPeer, op_id: int, user_id: str | None) -> None:
    peer.server.token_verified(op_id, user_id, peer.now)
    peer._pump()


def check_failed(peer: EnginePeer | WsPeer, op_id: int, message: str) -> None:
    peer.server.token_check_failed(op_id, message, peer.now)
    peer._pump()


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.header("content-type") == "application/json"
    error = reply.error
    assert error["code"] == code
    assert reply.json["detail"] == error["message"]
    return error


# --- HTTP ------------------------------------------------------------------------------------


def test_unknown_token_becomes_a_verify_effect_and_nothing_is_dispatched() -> None:
    peer = EnginePeer(SUPABASE)
    assert peer.post_chat(chat_body(), BEARER) is None
    check = only(verdicts(peer))
    assert check.token == JWT
    assert JWT not in repr(check) and JWT not in repr(peer.effects)
    assert peer.calls == [] and peer.replies == []
    assert peer.server.next_deadline() == peer.now + SUPABASE.auth_timeout

    verified(peer, check.op_id, "user-alice")
    call = only(peer.calls)
    assert call.user_id == "user-alice"
    peer.answer(call.stream_id, TextDelta(text="hi"))
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.json["choices"][0]["message"]["content"] == "hi"
    assert peer.completed[-1].user_id == "user-alice"
    assert not peer.transport_closed()


def test_refused_token_is_401_with_www_authenticate_and_the_connection_lives_on() -> None:
    peer = EnginePeer(SUPABASE)
    peer.post_chat(chat_body(), BEARER)
    verified(peer, only(verdicts(peer)).op_id, None)
    reply = peer.last_reply()
    assert_error(reply, 401, "invalid_api_key")
    assert reply.header("www-authenticate") == "Bearer"
    assert peer.calls == []
    assert not peer.transport_closed()
    assert peer.get("/health").status == 200  # the next request on the same connection


@pytest.mark.parametrize("how", ["failed", "deadline"])
def test_unavailable_provider_is_503_with_retry_after_never_a_pass(how: str) -> None:
    peer = EnginePeer(SUPABASE)
    peer.post_chat(chat_body(), BEARER)
    check = only(verdicts(peer))
    if how == "failed":
        check_failed(peer, check.op_id, "the authentication provider is unreachable")
    else:
        peer.timer(peer.now + SUPABASE.auth_timeout - 0.01)
        assert peer.replies == []
        peer.timer(peer.now + 0.01)
    reply = peer.last_reply()
    error = assert_error(reply, 503, "auth_unavailable")
    assert error["type"] == "service_unavailable"
    assert reply.header("retry-after") == "2"
    assert reply.header("www-authenticate") is None
    assert peer.calls == []
    assert not peer.transport_closed()
    # A verdict that arrives after the answer is dropped.
    verified(peer, check.op_id, "user-late")
    assert peer.calls == [] and len(peer.replies) == 1


def test_static_key_is_checked_first_without_any_effect() -> None:
    peer = EnginePeer(SUPABASE)
    call = peer.chat(headers=[("Authorization", "Bearer sk-static")])
    assert call.user_id == "ops"
    assert verdicts(peer) == []


@pytest.mark.parametrize(
    "raw_token",
    [b"", b"tok\x01en", "t\u00f6ken".encode()],
    ids=["missing", "control", "non-ascii"],
)
def test_tokens_that_cannot_be_sent_upstream_are_refused_without_asking(raw_token: bytes) -> None:
    peer = EnginePeer(SUPABASE)
    auth = b"Authorization: Bearer %s\r\n" % raw_token if raw_token else b""
    raw = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + auth + b"\r\n"
    peer.send_raw(raw, target="/v1/models")
    assert_error(peer.last_reply(), 401, "invalid_api_key")
    assert verdicts(peer) == [] and peer.listings == []


def test_health_ping_and_preflight_need_no_verdict() -> None:
    peer = EnginePeer(SUPABASE)
    for target in ("/health", "/ping"):
        assert peer.get(target, BEARER).status == 200
    peer.request("OPTIONS", "/v1/chat/completions", BEARER)
    assert peer.last_reply().status == 204
    assert verdicts(peer) == []


def test_model_listing_waits_for_the_verdict_and_carries_the_user() -> None:
    peer = EnginePeer(SUPABASE)
    peer.request("GET", "/v1/models", BEARER)
    assert peer.listings == []
    verified(peer, only(verdicts(peer)).op_id, "user-bob")
    assert only(peer.listings).user_id == "user-bob"


def test_body_is_read_while_the_token_is_checked_and_dispatched_only_at_its_end() -> None:
    peer = EnginePeer(SUPABASE)
    body = chat_body()
    data = encode_request(
        "POST", "/v1/chat/completions", [("Content-Type", "application/json"), *BEARER], body
    )
    head, rest = data[: len(data) - len(body)], data[len(data) - len(body) :]
    peer.expect("POST", "/v1/chat/completions")
    peer.feed(head + rest[:10])
    check = only(verdicts(peer))
    verified(peer, check.op_id, "user-carol")  # the verdict comes before the body ends
    assert peer.calls == []
    peer.feed(rest[10:])
    call = only(peer.calls)
    assert call.user_id == "user-carol"
    assert call.request.messages[-1].content == "hi"
    peer.answer(call.stream_id, TextDelta(text="ok"))
    assert peer.last_reply().status == 200


def test_refusal_while_the_body_arrives_is_answered_at_its_end() -> None:
    peer = EnginePeer(SUPABASE)
    body = chat_body()
    data = encode_request(
        "POST", "/v1/chat/completions", [("Content-Type", "application/json"), *BEARER], body
    )
    split = len(data) - len(body) + 5
    peer.expect("POST", "/v1/chat/completions")
    peer.feed(data[:split])
    verified(peer, only(verdicts(peer)).op_id, None)
    assert peer.replies == []
    peer.feed(data[split:])
    assert_error(peer.last_reply(), 401, "invalid_api_key")
    assert peer.calls == [] and not peer.transport_closed()


def test_body_limit_and_body_timeout_still_hold_while_the_token_is_checked() -> None:
    config = EngineConfig(
        auth_mode=AuthMode.SUPABASE, max_body_bytes=100, body_timeout=3.0, auth_timeout=60.0
    )
    peer = EnginePeer(config)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + JWT.encode()
        + b"\r\nContent-Length: 90\r\n\r\n"
    )
    peer.send_raw(head + b"x" * 10, method="POST", target="/v1/chat/completions")
    assert len(verdicts(peer)) == 1
    assert peer.server.next_deadline() == peer.now + 3.0  # the body's, not the verdict's
    peer.timer(peer.now + 3.0)
    assert peer.last_reply().status == 408
    assert peer.transport_closed()

    peer = EnginePeer(config)
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + JWT.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    peer.send_raw(chunked + b"50\r\n" + b"x" * 80 + b"\r\n", method="POST", target="/")
    verified(peer, only(verdicts(peer)).op_id, "user-dave")
    peer.feed(b"50\r\n" + b"x" * 80 + b"\r\n")
    assert peer.last_reply().status == 413
    assert peer.calls == [] and peer.transport_closed()


def test_late_body_after_the_deadline_is_503_at_once() -> None:
    peer = EnginePeer(SUPABASE)
    body = chat_body()
    data = encode_request(
        "POST", "/v1/chat/completions", [("Content-Type", "application/json"), *BEARER], body
    )
    peer.expect("POST", "/v1/chat/completions")
    peer.feed(data[:-5])
    later = peer.now + SUPABASE.auth_timeout + 1
    peer.feed(data[-5:], now=later)
    assert peer.replies == []
    assert (peer.server.next_deadline() or later) < later  # already past: fires at once
    peer.timer(later)
    assert_error(peer.last_reply(), 503, "auth_unavailable")


def test_expect_100_continue_waits_for_the_verdict() -> None:
    body = chat_body()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + JWT.encode()
        + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    peer = EnginePeer(SUPABASE)
    peer.send_raw(head, method="POST", target="/v1/chat/completions")
    assert peer.informational == []  # no 100 before the token is judged
    verified(peer, only(verdicts(peer)).op_id, "user-erin")
    assert [i.status_code for i in peer.informational] == [100]
    peer.feed(body)
    assert only(peer.calls).user_id == "user-erin"

    peer = EnginePeer(SUPABASE)
    peer.send_raw(head, method="POST", target="/v1/chat/completions")
    check_failed(peer, only(verdicts(peer)).op_id, "down")
    assert peer.informational == []
    reply = peer.last_reply()
    assert_error(reply, 503, "auth_unavailable")
    assert reply.header("connection") == "close"
    assert peer.transport_closed()


def test_pipelined_requests_wait_behind_the_verdict_and_are_answered_in_order() -> None:
    peer = EnginePeer(SUPABASE)
    first = encode_request("GET", "/v1/models", BEARER)
    second = encode_request("GET", "/health")
    peer.expect("GET", "/v1/models")
    peer.expect("GET", "/health")
    peer.feed(first + second)
    assert peer.replies == []
    verified(peer, only(verdicts(peer)).op_id, None)
    assert [r.status for r in peer.replies] == [401, 200]


def test_client_gone_while_waiting_drops_the_late_verdict() -> None:
    peer = EnginePeer(SUPABASE)
    peer.post_chat(chat_body(), BEARER)
    peer.eof()
    assert peer.transport_closed()
    verified(peer, only(verdicts(peer)).op_id, "user-frank")
    assert peer.calls == []


def test_shutdown_while_waiting_still_answers() -> None:
    peer = EnginePeer(SUPABASE)
    peer.post_chat(chat_body(), BEARER)
    peer.shutdown()
    verified(peer, only(verdicts(peer)).op_id, "user-gina")
    call = only(peer.calls)
    peer.answer(call.stream_id, TextDelta(text="bye"))
    reply = peer.last_reply()
    assert reply.status == 200 and reply.header("connection") == "close"
    assert peer.transport_closed()


def test_each_request_is_judged_on_its_own() -> None:
    # The engine keeps no cache: that is the verifier's job (providers/supabase_auth.py).
    peer = EnginePeer(SUPABASE)
    for user in ("user-1", "user-2"):
        peer.request("GET", "/v1/models", BEARER)
        verified(peer, verdicts(peer)[-1].op_id, user)
        assert peer.listings[-1].user_id == user
        peer.models(peer.listings[-1].stream_id, [])
    assert len(verdicts(peer)) == 2
    assert len({v.op_id for v in verdicts(peer)}) == 2


# --- WebSockets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (f"/chat?api_key={JWT}", []),
        (f"/chat?token={JWT}", []),
        ("/chat", BEARER),
    ],
)
def test_websocket_is_accepted_then_held_until_the_verdict(
    target: str, headers: list[tuple[str, str]]
) -> None:
    peer = WsPeer(SUPABASE).connect(target, headers)
    assert peer.accepted is not None  # the 101 is out
    check = only(peer.of_type(VerifyToken))
    assert check.token == JWT
    done = only(peer.of_type(RequestCompleted))
    assert done.target == "/chat"
    assert JWT not in repr(peer.effects)
    # Frames sent before the verdict wait: no work for a user nobody knows yet.
    peer.send_json({"type": "message", "content": "hi", "thread_id": "t1"})
    peer.send_json({"type": "ping"})
    assert peer.got == [] and not peer.of_type(OpenThread)
    assert peer.deadline() == T0 + SUPABASE.auth_timeout
    verified(peer, check.op_id, "user-alice")
    assert peer.last(OpenThread).user_id == "user-alice"
    assert [g.frame for g in peer.got] == [{"type": "pong", "ts": peer.now}]
    assert peer.server_close is None


def test_websocket_frame_in_the_handshake_packet_waits_too() -> None:
    peer = WsPeer(SUPABASE)
    message = json.dumps({"type": "message", "content": "hi"}).encode()
    peer.connect(f"/chat?api_key={JWT}", extra=frame(0x1, message))
    assert not peer.of_type(OpenThread)
    verified(peer, only(peer.of_type(VerifyToken)).op_id, "user-bob")
    assert peer.last(OpenThread).user_id == "user-bob"


@pytest.mark.parametrize(
    ("outcome", "code", "reason"),
    [
        ("refused", 1008, "Invalid authentication"),
        ("failed", 1011, "Authentication unavailable"),
        ("deadline", 1011, "Authentication unavailable"),
    ],
)
def test_websocket_verdicts_that_close(outcome: str, code: int, reason: str) -> None:
    peer = WsPeer(SUPABASE).connect(f"/chat?api_key={JWT}")
    peer.send_json({"type": "message", "content": "hi"})
    check = only(peer.of_type(VerifyToken))
    if outcome == "refused":
        verified(peer, check.op_id, None)
    elif outcome == "failed":
        check_failed(peer, check.op_id, "unreachable")
    else:
        peer.timer(T0 + SUPABASE.auth_timeout)
    assert peer.server_close is not None
    assert (peer.close_code(), peer.server_close.reason) == (code, reason)
    assert peer.got == [] and not peer.of_type(OpenThread)
    peer.answer_close()
    assert peer.transport_closed()


def test_predict_socket_uses_the_supabase_user() -> None:
    peer = WsPeer(SUPABASE).connect("/predict", BEARER)
    peer.send_json({"command": "get_status", "data": {}})
    assert not peer.of_type(JobCommand)
    verified(peer, only(peer.of_type(VerifyToken)).op_id, "user-carol")
    assert peer.last(JobCommand).user_id == "user-carol"


def test_websocket_static_key_and_missing_token_need_no_verdict() -> None:
    peer = WsPeer(SUPABASE).open("/chat?api_key=sk-static")
    assert peer.of_type(VerifyToken) == [] and peer.server_close is None
    peer.send_json({"type": "message", "content": "hi"})
    assert peer.last(OpenThread).user_id == "ops"

    peer = WsPeer(SUPABASE).connect("/chat")
    assert peer.of_type(VerifyToken) == []
    assert (peer.close_code(), peer.server_close and peer.server_close.reason) == (
        1008,
        "Missing authentication",
    )


def test_websocket_client_gone_while_held() -> None:
    peer = WsPeer(SUPABASE).connect(f"/chat?api_key={JWT}")
    peer.eof()
    assert peer.transport_closed()
    verified(peer, only(peer.of_type(VerifyToken)).op_id, "user-late")
    assert not peer.of_type(OpenThread) and not peer.of_type(CallProvider)


def test_websocket_reading_pauses_while_held() -> None:
    peer = WsPeer(SUPABASE).connect(f"/chat?api_key={JWT}")
    big = json.dumps({"type": "message", "content": "x" * (SUPABASE.max_pipelined_bytes + 10)})
    peer.send_text(big)
    assert peer.server.reading_paused
    verified(peer, only(peer.of_type(VerifyToken)).op_id, "user-h")
    assert not peer.server.reading_paused
    assert peer.last(OpenThread).user_id == "user-h"


def test_shutdown_while_held_closes_1001_with_the_verdict() -> None:
    peer = WsPeer(SUPABASE).connect(f"/chat?api_key={JWT}")
    peer.shutdown()
    verified(peer, only(peer.of_type(VerifyToken)).op_id, "user-i")
    assert peer.close_code() == 1001


def test_model_listing_and_other_effects_never_carry_the_token() -> None:
    peer = EnginePeer(SUPABASE)
    peer.request("GET", f"/v1/models?api_key={JWT}", BEARER)
    verified(peer, only(verdicts(peer)).op_id, "user-j")
    assert isinstance(peer.effects[-1], ListModels)
    shown = [e for e in peer.effects if not isinstance(e, VerifyToken)]
    assert JWT not in repr(shown)
    peer.models(only(peer.listings).stream_id, [])
    assert peer.completed[-1].target == "/v1/models"


# --- any split, any moment for the verdict ----------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    when=st.integers(min_value=0, max_value=8),
    outcome=st.sampled_from(["user", "refused", "failed", "deadline"]),
    expect_continue=st.booleans(),
)
def test_one_answer_whatever_the_split_and_the_moment_of_the_verdict(
    cuts: list[int], when: int, outcome: str, expect_continue: bool
) -> None:
    body = chat_body()
    headers = [("Content-Type", "application/json"), *BEARER]
    if expect_continue:
        headers.append(("Expect", "100-continue"))
    data = encode_request("POST", "/v1/chat/completions", headers, body)
    pieces = split_at(cuts)(data)
    peer = EnginePeer(SUPABASE)
    peer.expect("POST", "/v1/chat/completions")
    delivered = False

    def deliver() -> None:
        nonlocal delivered
        checks = verdicts(peer)
        if delivered or not checks:
            return
        delivered = True
        if outcome == "user":
            verified(peer, checks[0].op_id, "user-any")
        elif outcome == "refused":
            verified(peer, checks[0].op_id, None)
        elif outcome == "failed":
            check_failed(peer, checks[0].op_id, "down")
        else:
            peer.timer(peer.now + SUPABASE.auth_timeout)

    for index, piece in enumerate(pieces):
        if index == when:
            deliver()
        if peer.transport_closed():
            break
        peer.feed(piece)
    deliver()
    deadline = peer.server.next_deadline()
    if outcome == "deadline" and not peer.replies and deadline is not None:
        peer.timer(max(deadline, peer.now))  # a verdict deadline passed mid-body fires now
    assert len(verdicts(peer)) == 1
    if outcome == "user":
        call = only(peer.calls)
        assert call.user_id == "user-any"
        peer.answer(call.stream_id, TextDelta(text="ok"))
        assert only(peer.replies).status == 200
    else:
        assert peer.calls == []
        expected = 401 if outcome == "refused" else 503
        if peer.replies or not peer.transport_closed():
            assert only(peer.replies).status == expected
