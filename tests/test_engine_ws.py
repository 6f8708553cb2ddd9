"""The engine's ``/chat`` WebSocket below the chat session: handshake, encodings, RFC 6455
framing, limits, close codes and keep-alive. Bytes go into ``ServerConnection``; what comes
out is parsed by an independent wsproto client (``ws_peer``).

Specs: PROTOCOL.md §3, §4, §6; reference/nodetool-spec.md §2.5, §3.1-§3.2;
reference/reliability.md §2.6, §2.7 and checklist items 41-55.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirechat.engine import (
    AuthMode,
    ChatMessage,
    CloseTransport,
    EngineConfig,
    RequestCompleted,
    StaticKey,
    Surface,
    TextDelta,
)
from wirechat.engine.events import (
    CallProvider,
    CancelProvider,
    OpenThread,
    RunTool,
    SaveMessages,
)
from ws_peer import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    T0,
    WsPeer,
    accept_for,
    close_payload,
    frame,
    http_exchange,
    only,
    pieces_of,
    upgrade_request,
)
from wsproto.extensions import PerMessageDeflate

PING = b'{"type":"ping"}'
STATIC = EngineConfig(
    auth_mode=AuthMode.STATIC,
    static_keys=(StaticKey.from_token("sk-good", name="alice"),),
)
# Keep-alive out of the way unless a test is about it.
QUIET = EngineConfig(ws_ping_interval=1e6)


def assert_alive(peer: WsPeer) -> None:
    """The socket still serves: a JSON ping gets its pong."""
    peer.take()
    peer.send_text('{"type":"ping"}')
    assert [g.frame for g in peer.take()] == [{"type": "pong", "ts": peer.now}]
    assert peer.server_close is None and not peer.transport_closed()


def assert_failed_with(peer: WsPeer, code: int) -> None:
    """The server sent Close ``code`` and asked for the socket to be closed, with no chat
    work started."""
    assert peer.close_code() == code, (peer.server_close, bytes(peer.wire[-40:]))
    assert peer.transport_closed()
    assert peer.server.closed
    assert peer.deadline() is None
    assert not peer.of_type(OpenThread)


def response_head(wire: bytes) -> dict[str, str]:
    """The status line and headers of the first response on the wire, parsed by hand."""
    head = wire[: wire.index(b"\r\n\r\n")].decode("latin-1")
    status, *lines = head.split("\r\n")
    fields = {"": status}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in fields, f"duplicate {name}"
        fields[name.lower()] = value.strip()
    return fields


def sent_key(request: bytes) -> bytes:
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"sec-websocket-key":
            return value.strip()
    raise AssertionError(request)


# --- handshake -------------------------------------------------------------------------------


def test_upgrade_gets_101_with_correct_accept() -> None:
    peer = WsPeer(QUIET).open()
    head = response_head(bytes(peer.wire))
    assert head[""].startswith("HTTP/1.1 101 ")
    assert head["upgrade"].lower() == "websocket"
    assert "upgrade" in head["connection"].lower()
    assert head["sec-websocket-accept"].encode() == accept_for(sent_key(peer.sent_request))
    assert "sec-websocket-extensions" not in head
    # No greeting frame after the 101 (nodetool-spec §3.1 step 2).
    assert peer.got == [] and peer.pings == []
    done = only(peer.of_type(RequestCompleted))
    assert (done.method, done.target, done.status, done.user_id) == ("GET", "/chat", 101, "1")
    assert not peer.transport_closed()
    assert_alive(peer)


def test_accept_token_matches_rfc_example() -> None:
    # RFC 6455 §1.3's own example key and accept value.
    raw = upgrade_request(key="dGhlIHNhbXBsZSBub25jZQ==")
    peer = WsPeer(QUIET)
    peer.feed(raw)
    head = response_head(bytes(peer.wire))
    assert head["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_permessage_deflate_is_never_negotiated() -> None:
    # wsproto inflates without bound (reliability §2.6, checklist 49).
    peer = WsPeer(QUIET).connect(extensions=[PerMessageDeflate()])
    assert peer.accepted is not None
    assert peer.accepted.extensions == []
    assert "sec-websocket-extensions" not in response_head(bytes(peer.wire))


def test_trailing_slash_target_upgrades() -> None:
    WsPeer(QUIET).open("/chat/")


def test_frame_in_the_handshake_packet_is_processed() -> None:
    peer = WsPeer(QUIET)
    peer.connect(extra=frame(OP_TEXT, PING) + frame(OP_PING, b"hb"))
    assert peer.accepted is not None
    assert peer.take_frames() == [{"type": "pong", "ts": T0}]
    assert peer.pongs == [b"hb"]


def test_handshake_split_byte_by_byte_with_trailing_frame() -> None:
    peer = WsPeer(QUIET)
    raw = upgrade_request() + frame(OP_BINARY, msgpack.packb({"type": "ping"}))
    peer.feed(raw, split=pieces_of(1))
    # The oracle sent no request of its own: check the reply by hand.
    assert peer.wire.startswith(b"HTTP/1.1 101 ")
    payload = bytes(peer.wire[peer.wire.index(b"\r\n\r\n") + 4 :])
    assert payload[0] == 0x82  # FIN + binary: the pong mirrors the binary frame
    assert msgpack.unpackb(payload[2:]) == {"type": "pong", "ts": T0}


def test_plain_get_chat_is_426() -> None:
    reply = http_exchange(QUIET, upgrade_request(headers=[]))
    assert reply.status == 426
    assert (reply.header("upgrade") or "").lower() == "websocket"
    assert reply.json["error"]["message"]
    assert not any(isinstance(e, OpenThread) for e in reply.effects)


@pytest.mark.parametrize("version", ["8", "14", "13, 8", ""])
def test_bad_websocket_version_is_426_naming_13(version: str) -> None:
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    if version:
        headers.append(("Sec-WebSocket-Version", version))
    reply = http_exchange(QUIET, upgrade_request(headers=headers))
    assert reply.status == 426
    assert reply.header("sec-websocket-version") == "13"


@pytest.mark.parametrize(
    "key",
    [
        None,  # missing
        "",  # empty
        "c2hvcnQ=",  # base64 of 5 bytes
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # 24 bytes
        "not base64 at all!!!!!==",
    ],
)
def test_missing_or_malformed_key_is_400(key: str | None) -> None:
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]
    if key is not None:
        headers.append(("Sec-WebSocket-Key", key))
    reply = http_exchange(QUIET, upgrade_request(headers=headers))
    assert reply.status == 400
    assert "key" in reply.json["error"]["message"].lower()


def test_post_chat_is_405() -> None:
    reply = http_exchange(QUIET, upgrade_request(method="POST"))
    assert reply.status == 405
    assert reply.header("allow") is not None
    assert "GET" in (reply.header("allow") or "")


@pytest.mark.parametrize("surface", [Surface.CHAT_SERVER, Surface.WORKER])
def test_chat_is_not_routed_on_other_surfaces(surface: Surface) -> None:
    reply = http_exchange(EngineConfig(surface=surface), upgrade_request())
    assert reply.status == 404
    peer = WsPeer(EngineConfig(surface=surface)).connect()
    assert peer.accepted is None
    assert peer.rejected is not None and peer.rejected.status_code == 404


def test_upgrade_refused_during_shutdown() -> None:
    # A handshake whose head completes after shutdown began is not upgraded (reliability
    # §1.4 and checklist 39: new WS handshakes get 503).
    peer = WsPeer(QUIET)
    peer.feed(upgrade_request()[:10])
    peer.shutdown()
    peer.feed(upgrade_request()[10:])
    assert bytes(peer.wire).startswith(b"HTTP/1.1 503 ")
    assert peer.transport_closed()


# --- authentication (PROTOCOL.md §3: accept, then close 1008) ----------------------------


@pytest.mark.parametrize(
    ("target", "headers", "reason"),
    [
        ("/chat", [], "Missing authentication"),
        ("/chat?api_key=", [], "Missing authentication"),
        ("/chat?api_key=sk-bad", [], "Invalid authentication"),
        ("/chat", [("Authorization", "Bearer sk-bad")], "Invalid authentication"),
        ("/chat?token=sk-good-not", [], "Invalid authentication"),
    ],
)
def test_static_auth_failure_accepts_then_closes_1008(
    target: str, headers: list[tuple[str, str]], reason: str
) -> None:
    peer = WsPeer(STATIC).connect(target, headers)
    assert peer.accepted is not None
    assert peer.server_close is not None
    assert (peer.close_code(), peer.server_close.reason) == (1008, reason)
    assert peer.got == []
    assert only(peer.of_type(RequestCompleted)).target == "/chat"
    assert not peer.transport_closed()  # the peer is owed the closing handshake
    peer.answer_close()
    assert peer.transport_closed() and peer.server.closed


def test_static_auth_failure_closes_after_close_timeout_without_answer() -> None:
    peer = WsPeer(STATIC).connect()
    assert peer.close_code() == 1008
    deadline = peer.deadline()
    assert deadline == T0 + STATIC.ws_close_timeout
    peer.timer(deadline - 0.001)
    assert not peer.transport_closed()
    peer.timer(deadline)
    assert peer.transport_closed()


def test_unauthenticated_socket_gets_no_chat_work() -> None:
    # The server has closed with 1008; frames the client sent before reading that Close
    # must not reach the chat session (no store or provider work for an unknown user).
    peer = WsPeer(STATIC).connect()
    assert peer.close_code() == 1008
    raw = frame(OP_TEXT, b'{"type":"message","content":"hi"}') + frame(OP_TEXT, PING)
    peer.feed(raw)
    assert not peer.of_type(OpenThread)
    assert not peer.of_type(CallProvider)
    assert peer.got == []
    peer.feed(frame(OP_CLOSE, close_payload(1008)))
    assert peer.transport_closed()
    assert not peer.of_type(OpenThread)


@pytest.mark.parametrize(
    "before",
    [frame(OP_PING, b"x"), frame(OP_PONG, b"x"), frame(OP_TEXT, PING)],
    ids=["ping", "pong", "text"],
)
def test_close_answer_behind_another_frame_completes_the_handshake(before: bytes) -> None:
    # Our 1008 Close is answered by the peer's Close, which arrives in the same packet as a
    # frame the peer sent earlier: the closing handshake is complete, so the socket closes
    # now, not after ws_close_timeout (RFC 6455 §5.5.1, §7.1.1).
    peer = WsPeer(STATIC).connect()
    assert peer.close_code() == 1008
    peer.feed(before + frame(OP_CLOSE, close_payload(1008)))
    assert peer.transport_closed()
    assert not peer.of_type(OpenThread)


def test_frame_in_the_handshake_packet_is_ignored_when_auth_fails() -> None:
    peer = WsPeer(STATIC)
    peer.connect(extra=frame(OP_TEXT, b'{"type":"message","content":"hi"}'))
    assert peer.close_code() == 1008
    assert not peer.of_type(OpenThread)
    assert peer.got == []


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/chat", [("Authorization", "Bearer sk-good")]),
        ("/chat", [("Authorization", "bearer sk-good")]),
        ("/chat?api_key=sk-good", []),
        ("/chat?token=sk-good", []),
        ("/chat?x=1&api_key=sk-good&y=2", []),
    ],
)
def test_static_auth_accepted_ways(target: str, headers: list[tuple[str, str]]) -> None:
    peer = WsPeer(STATIC).open(target, headers)
    assert peer.server_close is None
    done = only(peer.of_type(RequestCompleted))
    assert done.target == "/chat"  # the query (and its token) is never in a notice
    assert done.user_id == "alice"
    assert "sk-good" not in repr(peer.effects)
    assert_alive(peer)
    peer.send_json({"type": "message", "content": "hi"})
    assert peer.last(OpenThread).user_id == "alice"


def test_no_auth_mode_ignores_a_bad_token() -> None:
    peer = WsPeer(EngineConfig(auth_mode=AuthMode.NONE)).open("/chat?api_key=whatever")
    assert only(peer.of_type(RequestCompleted)).target == "/chat"
    assert_alive(peer)


# --- encodings (PROTOCOL.md §4, nodetool-spec §3.2) ---------------------------------------


def test_text_frame_gets_json_replies() -> None:
    peer = WsPeer(QUIET).open()
    peer.send_json({"type": "ping"})
    (got,) = peer.take()
    assert got.encoding == "json" and got.frame == {"type": "pong", "ts": T0}


def test_binary_frame_gets_msgpack_replies() -> None:
    peer = WsPeer(QUIET).open()
    peer.send_msgpack({"type": "ping"})
    (got,) = peer.take()
    assert got.encoding == "msgpack" and got.frame == {"type": "pong", "ts": T0}


def test_replies_mirror_the_most_recent_frame() -> None:
    peer = WsPeer(QUIET).open()
    peer.send_msgpack({"type": "message", "content": "hi", "thread_id": "t1"})
    op = peer.last(OpenThread).op_id
    peer.opened(op, [ChatMessage(role="user", content="hi")])
    stream = peer.last(CallProvider).stream_id
    peer.chunk(stream, TextDelta(text="a"))
    peer.send_json({"type": "ping"})  # switches the turn's later frames to JSON
    peer.chunk(stream, TextDelta(text="b"))
    peer.send_msgpack({"type": "ping"})
    peer.chunk(stream, TextDelta(text="c"))
    got = peer.take()
    assert [(g.encoding, g.type, g.frame.get("content")) for g in got] == [
        ("msgpack", "chunk", "a"),
        ("json", "pong", None),
        ("json", "chunk", "b"),
        ("msgpack", "pong", None),
        ("msgpack", "chunk", "c"),
    ]


def _deep_json(levels: int) -> str:
    # ``levels`` nested containers in all, the outer object included.
    return '{"type":"ping","x":' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def _deep_msgpack(levels: int) -> bytes:
    inner = b"\x90"  # fixarray 0
    for _ in range(levels - 2):
        inner = b"\x91" + inner
    return b"\x82\xa4type\xa4ping\xa1x" + inner


BAD_TEXT = [
    "{",
    '{"type": "ping"',
    "[1, 2]",
    '"just a string"',
    "42",
    "null",
    '{"type": "ping", "x": NaN}',
    '{"type": "ping", "x": Infinity}',
    '{"type": "ping"} trailing',
    "",
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 5000 + "1" + "}" * 5000,
    _deep_json(20),  # past max_depth (16 in these tests)
]
BAD_BINARY = [
    b"\xc1",  # never-used byte
    b"",
    msgpack.packb([1, 2]),
    msgpack.packb("str"),
    msgpack.packb({"type": "ping"}) + b"\x00",  # trailing data
    msgpack.packb({1: "int key"}),
    msgpack.packb({"type": "ping", "x": msgpack.ExtType(5, b"data")}),
    msgpack.packb({"type": "ping", "t": msgpack.Timestamp(1, 0)}),
    msgpack.packb(msgpack.ExtType(5, b"data")),
    b"\xdd\xee\x6b\x28\x00",  # array32 declaring 4e9 items
    b"\x81\xa1a\xdd\xee\x6b\x28\x00",  # ... as a value
    b"\xdb\xff\xff\xff\xff",  # str32 declaring 4 GB
    b"\x81\xa1a\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",  # bin32 declaring 4 GB
    b"\xdf\xff\xff\xff\xff",  # map32 declaring 4e9 pairs
    b"\x81\xa1a\xa2\xff\xfe",  # str with invalid UTF-8
    b"\x91" * 2000 + b"\x90",  # nesting deeper than msgpack's own stack
    _deep_msgpack(20),  # past max_depth (16 in these tests)
]


@pytest.mark.parametrize("payload", BAD_TEXT, ids=lambda p: repr(p[:20]))
def test_undecodable_text_frame_gets_error_and_socket_stays_open(payload: str) -> None:
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_depth=16)).open()
    peer.send_text(payload)
    (got,) = peer.take()
    assert got.encoding == "json"
    assert got.type == "error" and isinstance(got.frame["message"], str) and got.frame["message"]
    assert not peer.of_type(OpenThread)
    assert_alive(peer)


@pytest.mark.parametrize("payload", BAD_BINARY, ids=lambda p: repr(p[:12]))
def test_undecodable_binary_frame_gets_error_and_socket_stays_open(payload: bytes) -> None:
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_depth=16)).open()
    peer.send_bytes(payload)
    (got,) = peer.take()
    assert got.encoding == "msgpack"
    assert got.type == "error" and isinstance(got.frame["message"], str) and got.frame["message"]
    assert not peer.of_type(OpenThread)
    peer.send_msgpack({"type": "ping"})
    assert [g.frame for g in peer.take()] == [{"type": "pong", "ts": T0}]
    assert peer.server_close is None


@pytest.mark.parametrize("depth", [1, 2, 7, 8])
def test_nesting_at_max_depth_is_accepted(depth: int) -> None:
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_depth=8)).open()
    if depth == 1:
        peer.send_text('{"type":"ping"}')
        peer.send_bytes(msgpack.packb({"type": "ping"}))
    else:
        peer.send_text(_deep_json(depth))
        peer.send_bytes(_deep_msgpack(depth))
    assert [g.type for g in peer.take()] == ["pong", "pong"]


@pytest.mark.parametrize("depth", [9, 10, 64, 500])
def test_nesting_past_max_depth_is_refused(depth: int) -> None:
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_depth=8)).open()
    peer.send_text(_deep_json(depth))
    peer.send_bytes(_deep_msgpack(depth))
    got = peer.take()
    assert [(g.encoding, g.type) for g in got] == [("json", "error"), ("msgpack", "error")]
    assert all("8" in g.frame["message"] for g in got)
    assert_alive(peer)


def test_msgpack_bin_value_is_accepted() -> None:
    peer = WsPeer(QUIET).open()
    peer.send_msgpack({"type": "ping", "blob": b"\x00\x01"})
    assert peer.take_frames() == [{"type": "pong", "ts": T0}]


def test_unknown_frame_type_gets_error() -> None:
    peer = WsPeer(QUIET).open()
    peer.send_json({"type": "bogus"})
    (got,) = peer.take()
    assert got.type == "error" and "bogus" in got.frame["message"]
    assert not peer.of_type(OpenThread)
    assert_alive(peer)


# --- framing (RFC 6455; reliability §2.6) -----------------------------------------------


def test_fragmented_text_message_is_reassembled() -> None:
    peer = WsPeer(QUIET).open()
    text = '{"type":"message","content":"caf\u00e9 \U0001f600","thread_id":"t"}'.encode()
    cut1 = text.index(b"\xc3") + 1  # inside the 2-byte é
    cut2 = text.index(b"\xf0") + 2  # inside the 4-byte emoji
    peer.feed(
        frame(OP_TEXT, text[:cut1], fin=False)
        + frame(OP_CONT, text[cut1:cut2], fin=False)
        + frame(OP_CONT, b"", fin=False)
        + frame(OP_CONT, text[cut2:])
    )
    opened = only(peer.of_type(OpenThread))
    assert opened.append == (ChatMessage(role="user", content="caf\u00e9 \U0001f600"),)
    assert opened.thread_id == "t"


def test_fragmented_binary_message_is_reassembled_with_a_ping_in_between() -> None:
    peer = WsPeer(QUIET).open()
    data = msgpack.packb({"type": "message", "content": "binary hello"})
    peer.feed(
        frame(OP_BINARY, data[:3], fin=False)
        + frame(OP_PING, b"mid")  # control frames may be interleaved (RFC 6455 §5.4)
        + frame(OP_CONT, data[3:10], fin=False)
        + frame(OP_CONT, data[10:])
    )
    assert peer.pongs == [b"mid"]
    assert only(peer.of_type(OpenThread)).append[0].content == "binary hello"
    peer.send_msgpack({"type": "ping"})
    assert peer.take()[-1].encoding == "msgpack"


@pytest.mark.parametrize("size", [1, 7, 64])
def test_message_split_into_small_reads(size: int) -> None:
    peer = WsPeer(QUIET).open()
    text = json.dumps({"type": "message", "content": "x" * 300 + "\u00e9" * 50})
    peer.send_text(text, split=pieces_of(size))
    assert only(peer.of_type(OpenThread)).append[0].content == "x" * 300 + "\u00e9" * 50


def test_message_within_limit_in_many_small_reads_is_accepted() -> None:
    # A legal 10 KB message that arrives in 2-byte reads (a slow link) is one message of
    # one frame: it must not be refused as too big or too fragmented (PROTOCOL.md §4: 1009
    # is for a message over the size limit).
    peer = WsPeer(QUIET).open()
    content = "y" * 10_000
    peer.send_text(json.dumps({"type": "message", "content": content}), split=pieces_of(2))
    assert peer.server_close is None, peer.server_close
    assert only(peer.of_type(OpenThread)).append[0].content == content


def test_message_at_the_size_limit_is_accepted() -> None:
    limit = 200
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_ws_message_bytes=limit)).open()
    head = '{"type":"ping","pad":"'
    text = head + "\u00e9" * ((limit - len(head) - 2) // 2) + '"}'
    text += " " * (limit - len(text.encode()))
    assert len(text.encode()) == limit
    peer.send_text(text)
    assert peer.take_frames() == [{"type": "pong", "ts": T0}]


@pytest.mark.parametrize("binary", [False, True])
def test_message_over_the_limit_in_one_frame_closes_1009(binary: bool) -> None:
    limit = 200
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_ws_message_bytes=limit)).open()
    if binary:
        peer.send_bytes(msgpack.packb({"type": "ping", "pad": b"x" * limit}))
    else:
        peer.send_text(json.dumps({"type": "ping", "pad": "x" * limit}))
    assert_failed_with(peer, 1009)
    assert peer.got == []


def test_message_over_the_limit_via_fragments_closes_1009() -> None:
    limit = 1000
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_ws_message_bytes=limit)).open()
    raw = frame(OP_TEXT, b'{"type":"ping","pad":"', fin=False)
    for _ in range(10):
        raw += frame(OP_CONT, b"x" * 100, fin=False)
    raw += frame(OP_CONT, b'"}')
    peer.feed(raw)
    assert_failed_with(peer, 1009)
    assert peer.got == []


def test_many_empty_fragments_are_bounded() -> None:
    # Empty fragments cost memory without counting as bytes (reliability §2.6: cap total
    # bytes and fragment count).
    peer = WsPeer(QUIET).open()
    raw = frame(OP_TEXT, b"{", fin=False) + frame(OP_CONT, b"", fin=False) * 20_000
    peer.feed(raw)
    assert_failed_with(peer, 1009)


def test_limit_applies_per_message_not_per_connection() -> None:
    limit = 300
    peer = WsPeer(EngineConfig(ws_ping_interval=1e6, max_ws_message_bytes=limit)).open()
    text = json.dumps({"type": "ping", "pad": "x" * 200})
    for _ in range(5):
        peer.send_text(text, split=pieces_of(50))
    assert [g.type for g in peer.take()] == ["pong"] * 5


VIOLATIONS: list[tuple[str, bytes, int]] = [
    ("unmasked text", frame(OP_TEXT, PING, masked=False), 1002),
    ("unmasked ping", frame(OP_PING, b"x", masked=False), 1002),
    ("ping of 126 bytes", frame(OP_PING, b"p" * 126), 1002),
    ("fragmented ping", frame(OP_PING, b"p", fin=False), 1002),
    ("close of 126 bytes", frame(OP_CLOSE, close_payload(1000, b"r" * 124)), 1002),
    ("rsv1 text", frame(OP_TEXT, PING, rsv=4), 1002),
    ("rsv2 text", frame(OP_TEXT, PING, rsv=2), 1002),
    ("rsv3 ping", frame(OP_PING, b"", rsv=1), 1002),
    ("opcode 3", frame(0x3, b"x"), 1002),
    ("opcode 7", frame(0x7, b""), 1002),
    ("opcode 0xB", frame(0xB, b""), 1002),
    ("opcode 0xF", frame(0xF, b"x"), 1002),
    ("continuation without start", frame(OP_CONT, PING), 1002),
    (
        "new text during a fragmented message",
        frame(OP_TEXT, b'{"type":', fin=False) + frame(OP_TEXT, PING),
        1002,
    ),
    ("non-minimal 16-bit length", frame(OP_TEXT, PING, length_form=126), 1002),
    ("non-minimal 64-bit length", frame(OP_TEXT, PING, length_form=127), 1002),
    ("64-bit length with the MSB set", b"\x81\xff\x80" + b"\x00" * 7 + b"\x00" * 4, 1002),
    ("close with a 1-byte payload", frame(OP_CLOSE, b"\x03"), 1002),
    ("invalid UTF-8 text", frame(OP_TEXT, b'{"type":"\xff"}'), 1007),
    ("overlong UTF-8 text", frame(OP_TEXT, b'{"a":"\xc0\xaf"}'), 1007),
    ("surrogate in UTF-8 text", frame(OP_TEXT, b'{"a":"\xed\xa0\x80"}'), 1007),
    (
        "invalid UTF-8 across fragments",
        frame(OP_TEXT, b'{"a":"\xc3', fin=False) + frame(OP_CONT, b'("}'),
        1007,
    ),
    ("invalid UTF-8 close reason", frame(OP_CLOSE, close_payload(1000, b"\xff\xfe")), 1007),
]


@pytest.mark.parametrize(
    ("raw", "code"), [(raw, code) for _, raw, code in VIOLATIONS], ids=[n for n, _, _ in VIOLATIONS]
)
def test_protocol_violation_closes_with_code(raw: bytes, code: int) -> None:
    peer = WsPeer(QUIET).open()
    peer.feed(raw + frame(OP_TEXT, b'{"type":"message","content":"after"}'))
    assert_failed_with(peer, code)
    assert peer.got == []


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2999, 5000, 65535])
def test_invalid_close_code_closes_1002(code: int) -> None:
    peer = WsPeer(QUIET).open()
    peer.feed(frame(OP_CLOSE, close_payload(code)))
    assert_failed_with(peer, 1002)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1008, 1011, 3000, 4999])
def test_client_close_is_echoed_and_transport_closed(code: int) -> None:
    peer = WsPeer(QUIET).open()
    peer.close(code, "bye")
    assert peer.close_code() == code
    assert peer.transport_closed() and peer.server.closed
    assert peer.deadline() is None
    peer.eof()  # the peer then drops TCP: nothing more happens
    assert len(peer.of_type(CloseTransport)) == 1


def test_client_close_without_code_is_answered() -> None:
    peer = WsPeer(QUIET).open()
    peer.feed(frame(OP_CLOSE, b""))
    assert peer.server_close is not None
    assert peer.transport_closed()


def test_client_close_cancels_the_running_turn() -> None:
    peer = WsPeer(QUIET).open()
    peer.send_json({"type": "message", "content": "hi"})
    peer.opened(peer.last(OpenThread).op_id, [ChatMessage(role="user", content="hi")])
    stream = peer.last(CallProvider).stream_id
    peer.close(1000)
    assert peer.transport_closed()
    assert [e.stream_id for e in peer.of_type(CancelProvider)] == [stream]
    peer.chunk(stream, TextDelta(text="late"))  # a late item after the close: dropped
    peer.done(stream)
    assert peer.got == []


def test_bytes_after_client_close_are_ignored() -> None:
    peer = WsPeer(QUIET).open()
    peer.feed(frame(OP_CLOSE, close_payload(1000)) + frame(OP_TEXT, PING))
    assert peer.close_code() == 1000 and peer.got == []
    peer.feed(frame(OP_TEXT, PING))
    assert peer.got == [] and not peer.of_type(OpenThread)


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
def test_client_ping_gets_pong_with_same_payload(payload: bytes) -> None:
    peer = WsPeer(QUIET).open()
    peer.ping(payload)
    assert peer.pongs == [payload]
    assert peer.got == []


def test_unsolicited_pong_is_ignored() -> None:
    peer = WsPeer(QUIET).open()
    peer.take_effects()
    before = len(peer.wire)
    peer.pong(b"unasked")
    assert len(peer.wire) == before
    assert peer.take_effects() == []
    assert_alive(peer)


# --- keep-alive (PROTOCOL.md §6; checklist 52, 53) ------------------------------------


def test_ping_after_interval_and_pong_keeps_the_socket() -> None:
    config = EngineConfig(ws_ping_interval=20.0, ws_ping_timeout=5.0)
    peer = WsPeer(config).open()
    assert peer.deadline() == T0 + 20.0
    peer.timer(T0 + 19.9)  # early: harmless
    assert peer.pings == []
    peer.timer(T0 + 20.0)
    assert len(peer.pings) == 1
    assert peer.deadline() == T0 + 25.0
    peer.pong(peer.pings[0])
    assert peer.deadline() == T0 + 40.0
    peer.timer(T0 + 25.0)
    assert peer.server_close is None
    peer.timer(T0 + 40.0)
    assert len(peer.pings) == 2
    peer.pong(peer.pings[1])
    assert peer.server_close is None and not peer.transport_closed()
    assert peer.got == []  # liveness uses protocol pings, never JSON ping frames (§4)
    assert_alive(peer)


def test_unanswered_ping_closes_1011_then_drops_after_close_timeout() -> None:
    config = EngineConfig(ws_ping_interval=20.0, ws_ping_timeout=5.0, ws_close_timeout=3.0)
    peer = WsPeer(config).open()
    peer.timer(T0 + 20.0)
    assert len(peer.pings) == 1
    peer.timer(T0 + 24.9)
    assert peer.server_close is None
    peer.timer(T0 + 25.0)
    assert peer.close_code() == 1011
    assert not peer.transport_closed()
    assert peer.deadline() == T0 + 28.0
    peer.timer(T0 + 27.9)
    assert not peer.transport_closed()
    peer.timer(T0 + 28.0)
    assert peer.transport_closed() and peer.server.closed
    assert peer.deadline() is None


def test_keepalive_close_answered_by_peer() -> None:
    config = EngineConfig(ws_ping_interval=20.0, ws_ping_timeout=5.0)
    peer = WsPeer(config).open()
    peer.timer(T0 + 20.0)
    peer.timer(T0 + 25.0)
    assert peer.close_code() == 1011
    peer.answer_close()
    assert peer.transport_closed()


def test_keepalive_close_cancels_the_running_turn() -> None:
    config = EngineConfig(ws_ping_interval=20.0, ws_ping_timeout=5.0, ws_close_timeout=3.0)
    peer = WsPeer(config).open()
    peer.send_json({"type": "message", "content": "hi"})
    peer.opened(peer.last(OpenThread).op_id, [])
    stream = peer.last(CallProvider).stream_id
    peer.timer(T0 + 20.0)
    peer.timer(T0 + 25.0)
    assert peer.close_code() == 1011
    peer.timer(T0 + 28.0)
    assert peer.transport_closed()
    assert stream in [e.stream_id for e in peer.of_type(CancelProvider)]


def test_protocol_ping_is_not_sent_while_the_client_is_closing() -> None:
    config = EngineConfig(ws_ping_interval=20.0)
    peer = WsPeer(config).open()
    peer.close(1000)
    peer.timer(T0 + 100.0)
    assert peer.pings == []


@pytest.mark.parametrize("when", ["idle", "opening", "generating"])
def test_receive_eof_closes_and_cancels(when: str) -> None:
    peer = WsPeer(QUIET).open()
    stream = None
    if when != "idle":
        peer.send_json({"type": "message", "content": "hi"})
    if when == "generating":
        peer.opened(peer.last(OpenThread).op_id, [])
        stream = peer.last(CallProvider).stream_id
    peer.eof(T0 + 1)
    assert peer.transport_closed() and peer.server.closed
    assert peer.deadline() is None
    cancels = [e.stream_id for e in peer.of_type(CancelProvider)]
    assert cancels == ([stream] if stream is not None else [])
    if stream is not None:
        peer.chunk(stream, TextDelta(text="late"))
        peer.done(stream)
    assert peer.got == []


def test_receive_eof_before_the_upgrade_completes() -> None:
    peer = WsPeer(QUIET)
    peer.feed(upgrade_request()[:30])
    peer.eof()
    assert peer.transport_closed()
    assert peer.wire == b""


def test_receive_eof_after_close_is_harmless() -> None:
    peer = WsPeer(QUIET).open()
    peer.feed(frame(OP_TEXT, PING, masked=False))
    assert peer.close_code() == 1002
    peer.eof()
    peer.timer(T0 + 1000)
    assert len(peer.of_type(CloseTransport)) == 1


# --- property: no input raises out of the engine -------------------------------------


def _fresh_open_peer() -> WsPeer:
    return WsPeer(EngineConfig(ws_ping_interval=5.0, ws_ping_timeout=5.0, max_depth=6)).open()


FRAME_PIECES = st.one_of(
    st.binary(max_size=40),
    st.builds(
        frame,
        st.sampled_from([OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, 0x3, 0xB]),
        st.binary(max_size=30),
        fin=st.booleans(),
        rsv=st.sampled_from([0, 0, 0, 1, 4]),
        masked=st.sampled_from([True, True, True, False]),
    ),
    st.sampled_from(
        [
            frame(OP_TEXT, PING),
            frame(OP_TEXT, b'{"type":"message","content":"x"}'),
            frame(OP_BINARY, msgpack.packb({"type": "stop"})),
            frame(OP_CLOSE, close_payload(1000)),
        ]
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    pieces=st.lists(FRAME_PIECES, max_size=8),
    cuts=st.lists(st.integers(1, 40), max_size=6),
    tick=st.floats(0, 30),
)
def test_arbitrary_bytes_after_upgrade_never_raise(
    pieces: list[bytes], cuts: list[int], tick: float
) -> None:
    peer = _fresh_open_peer()
    data = b"".join(pieces)
    sizes = iter(cuts)
    start = 0
    while start < len(data):
        end = start + next(sizes, len(data))
        peer.feed(data[start:end])
        start = end
    peer.timer(T0 + tick)
    for op in peer.of_type(OpenThread):
        peer.opened(op.op_id, [])
    for call in peer.of_type(CallProvider):
        peer.answer(call.stream_id, TextDelta(text="ok"))
    peer.timer(T0 + tick + 20)
    peer.eof()
    assert peer.transport_closed()
    assert len(peer.of_type(CloseTransport)) == 1


TEXT = st.text(max_size=10) | st.text(
    st.sampled_from(["a", "\u00e9", "\x00", "\U0001f600", "\ud800", "\udfff"]), max_size=4
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
FRAME_KEYS = st.sampled_from(
    [
        "type",
        "content",
        "thread_id",
        "model",
        "provider",
        "tools",
        "workflow_id",
        "tool_call_id",
        "ok",
        "result",
        "error",
        "role",
    ]
)
FRAME_TYPES = st.sampled_from(
    [
        "message",
        "chat_message",
        "stop",
        "ping",
        "pong",
        "client_tools_manifest",
        "tool_result",
        "nonsense",
    ]
)
FRAMES = st.builds(
    lambda kind, extra: {"type": kind, **extra} if kind is not None else extra,
    st.one_of(st.none(), FRAME_TYPES),
    st.dictionaries(FRAME_KEYS, JSON_VALUES, max_size=5),
)


def _packs(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (UnicodeEncodeError, OverflowError):
        return False  # not representable in MessagePack: the test sends it as JSON
    return True


def settle(peer: WsPeer) -> None:
    """Answer whatever the session asks for until it asks for nothing, so turns progress."""
    while effects := peer.take_effects():
        for effect in effects:
            if isinstance(effect, OpenThread):
                peer.opened(effect.op_id, list(effect.append))
            elif isinstance(effect, CallProvider):
                peer.answer(effect.stream_id, TextDelta(text="ok"))
            elif isinstance(effect, SaveMessages):
                peer.saved(effect.op_id)
            elif isinstance(effect, RunTool):
                peer.tool_done(effect.op_id, True, 1)


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(frames=st.lists(FRAMES, min_size=1, max_size=6), binary=st.lists(st.booleans()))
def test_arbitrary_decoded_frames_never_raise(
    frames: list[dict[str, Any]], binary: list[bool]
) -> None:
    peer = _fresh_open_peer()
    modes = iter(binary)
    for value in frames:
        if next(modes, False) and _packs(value):
            peer.send_msgpack(value)
        else:
            peer.send_text(json.dumps(value))
        settle(peer)
    assert peer.server_close is None  # decodable frames never close the socket
    for got in peer.got:
        assert isinstance(got.type, str)
        if got.type in ("chunk", "message", "tool_call", "tool_result"):
            assert isinstance(got.frame.get("thread_id"), str)


def test_close_frame_struct_helper() -> None:
    # The helper builds what the RFC describes (a sanity check of the test's own tool).
    raw = frame(OP_CLOSE, close_payload(1000, b"ok"), mask=b"\x00\x00\x00\x00")
    assert raw == b"\x88\x84\x00\x00\x00\x00" + struct.pack("!H", 1000) + b"ok"


# --- the fast paths of sending (framed by us, encoded by template) ---------------------------

_texts = st.text(max_size=300) | st.text(alphabet='\ud800\udfff\u2028\x00é😀"\\', max_size=20)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(payload=st.binary(max_size=70_000) | _texts.map(lambda t: t.encode("utf-8", "replace")))
def test_data_frames_are_the_bytes_wsproto_writes(payload: bytes) -> None:
    """``WebSocketSession.send_message`` frames data itself: byte for byte wsproto's frame,
    at every length encoding (7-bit, 16-bit, 64-bit)."""
    from wirechat.engine.websocket import WebSocketSession
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, TextMessage

    reference = Connection(ConnectionType.SERVER)
    session = WebSocketSession(EngineConfig(), 0.0)
    text = payload.decode("utf-8", "replace")
    session.send_message(payload)
    session.send_message(text)
    expected = reference.send(BytesMessage(data=payload)) + reference.send(TextMessage(data=text))
    assert session.data_to_send() == expected


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    texts=st.lists(_texts, min_size=1, max_size=4),
    thread_id=st.none() | st.text(max_size=40),
)
def test_chunk_frames_are_the_bytes_encode_frame_writes(
    texts: list[str], thread_id: str | None
) -> None:
    """``ChunkEncoder`` encodes only the text per token; the frame is exactly the whole
    dict's ``encode_frame`` in both encodings, lone surrogates included."""
    from wirechat.engine.codec import ChunkEncoder, chunk_frame, encode_frame

    encoder = ChunkEncoder()
    for text in texts:
        for encoding in ("json", "msgpack"):
            fast = encoder.encode(text, thread_id, encoding)  # type: ignore[arg-type]
            assert fast == encode_frame(chunk_frame(text, thread_id), encoding)  # type: ignore[arg-type]


def test_a_thread_id_holding_the_template_mark_cannot_move_the_split() -> None:
    from wirechat.engine.codec import ChunkEncoder, chunk_frame, encode_frame

    thread = "t" + ChunkEncoder._MARK + "x"
    encoder = ChunkEncoder()
    for encoding in ("json", "msgpack"):
        fast = encoder.encode("hello", thread, encoding)  # type: ignore[arg-type]
        assert fast == encode_frame(chunk_frame("hello", thread), encoding)  # type: ignore[arg-type]
