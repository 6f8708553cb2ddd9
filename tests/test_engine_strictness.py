"""The strictness layer: raw bytes a trusted server refuses, and what the engine answers.

Specs: reference/reliability.md §2.1 (h11 vs gunicorn/nginx table), §2.2 (size limits),
§2.3 (header injection) and the checklist §6 items 1-22; PROTOCOL.md §2 and §6. Every refusal
is a complete error response followed by ``CloseTransport``, and nothing ever raises out of
``receive_data``.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest
from engine_peer import (
    EnginePeer,
    Splitter,
    bytewise,
    chat_body,
    check_error_envelope,
    encode_request,
    split_at,
    whole,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirechat.engine import (
    AuthMode,
    CallProvider,
    ConnectionFailed,
    EngineConfig,
    ListModels,
    ServerConnection,
    StaticKey,
)

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
BODY = chat_body()


def refused(
    raw: bytes,
    statuses: Collection[int],
    *,
    config: EngineConfig | None = None,
    split: Splitter = whole,
    method: str = "POST",
) -> EnginePeer:
    """Feed ``raw``; assert one error reply with a status in ``statuses``, then a close."""
    peer = EnginePeer(config)
    peer.send_raw(raw, method=method, split=split)
    assert len(peer.replies) == 1, (peer.replies, bytes(peer.wire)[:300])
    reply = peer.replies[0]
    assert reply.status in statuses, (reply.status, reply.body)
    assert reply.header("connection") == "close"
    assert reply.header("content-type") == "application/json"
    check_error_envelope(reply.json)
    assert peer.transport_closed() and peer.server_closed()
    assert peer.server.next_deadline() is None
    assert not any(isinstance(e, CallProvider | ListModels) for e in peer.effects)
    failures = peer.of_type(ConnectionFailed)
    assert len(failures) == 1 and failures[0].status == reply.status
    # Whatever comes next is never parsed.
    wire = bytes(peer.wire)
    peer.feed(encode_request("GET", "/health"))
    assert bytes(peer.wire) == wire
    return peer


def ok(raw: bytes, *, method: str = "POST") -> EnginePeer:
    """Feed ``raw``; assert it was accepted (a provider call or a non-4xx reply)."""
    peer = EnginePeer()
    peer.send_raw(raw, method=method)
    assert not peer.transport_closed(), peer.replies
    assert peer.calls or (peer.replies and peer.replies[0].status < 400), peer.replies
    return peer


def with_cl(body: bytes = BODY) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def chunked(body: bytes = BODY) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


TE = b"Transfer-Encoding: chunked\r\n"

# (id, raw request, accepted statuses): reliability.md §2.1 and checklist §6 items 7-21.
FRAMING_CASES: list[tuple[str, bytes, set[int]]] = [
    # 7: CL + TE
    ("cl-and-te", CHAT + with_cl() + TE + b"\r\n" + chunked(), {400}),
    ("te-and-cl", CHAT + TE + with_cl() + b"\r\n" + chunked(), {400}),
    # 8: duplicate CL
    ("cl-twice-same", CHAT + with_cl() + with_cl() + b"\r\n" + BODY, {400}),
    (
        "cl-twice-different",
        CHAT + with_cl() + b"Content-Length: 3\r\n\r\n" + BODY,
        {400},
    ),
    ("cl-list-same", CHAT + b"Content-Length: 3, 3\r\n\r\nabc", {400}),
    ("cl-list-different", CHAT + b"Content-Length: 3, 4\r\n\r\nabcd", {400}),
    # 9: CL values
    ("cl-plus", CHAT + b"Content-Length: +3\r\n\r\nabc", {400}),
    ("cl-hex", CHAT + b"Content-Length: 0x3\r\n\r\nabc", {400}),
    ("cl-empty", CHAT + b"Content-Length: \r\n\r\nabc", {400}),
    ("cl-negative", CHAT + b"Content-Length: -3\r\n\r\nabc", {400}),
    ("cl-25-digits", CHAT + b"Content-Length: " + b"1" * 25 + b"\r\n\r\nabc", {400, 413}),
    ("cl-space-inside", CHAT + b"Content-Length: 1 2\r\n\r\nabc", {400}),
    # 10: TE values
    ("te-gzip-chunked", CHAT + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(), {501, 400}),
    ("te-xchunked", CHAT + b"Transfer-Encoding: xchunked\r\n\r\n" + chunked(), {501, 400}),
    ("te-comma-chunked", CHAT + b"Transfer-Encoding: ,chunked\r\n\r\n" + chunked(), {501, 400}),
    ("te-identity", CHAT + b"Transfer-Encoding: identity\r\n\r\n" + chunked(), {501, 400}),
    ("te-twice", CHAT + TE + TE + b"\r\n" + chunked(), {400, 501}),
    (
        "te-chunked-then-identity",
        CHAT + TE + b"Transfer-Encoding: identity\r\n\r\n" + chunked(),
        {400, 501},
    ),
    # 11: TE on HTTP/1.0
    (
        "te-on-http10",
        b"POST /v1/chat/completions HTTP/1.0\r\n" + TE + b"\r\n" + chunked(),
        {400},
    ),
    # 12: obs-fold
    ("obs-fold", CHAT + b"X-Thing: a\r\n b\r\n" + with_cl() + b"\r\n" + BODY, {400}),
    ("obs-fold-tab", CHAT + b"X-Thing: a\r\n\tb\r\n" + with_cl() + b"\r\n" + BODY, {400}),
    ("obs-fold-on-te", CHAT + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + chunked(), {400}),
    # 13: bare LF
    ("bare-lf-everywhere", b"GET /health HTTP/1.1\nHost: a\n\n", {400}),
    ("bare-lf-one-line", b"GET /health HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", {400}),
    (
        "bare-lf-garden-19",
        b"GET /health HTTP/1.1\r\nHost: a\r\nUseless:\n\n"
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
        {400},
    ),
    # 14: bare CR / NUL / CR-hidden header
    ("bare-cr-line-end", b"GET /health HTTP/1.1\rHost: a\r\n\r\n", {400}),
    ("cr-in-value", b"GET /health HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", {400}),
    (
        "cr-hides-te-cve-2023-37276",
        CHAT + b"X-Abc: \rxTransfer-Encoding: chunked\r\n\r\n" + chunked(),
        {400},
    ),
    ("nul-in-value", b"GET /health HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", {400}),
    # 15: whitespace before the colon
    ("space-before-colon", CHAT + b"Content-Length : %d\r\n\r\n" % len(BODY) + BODY, {400}),
    ("tab-before-colon", b"GET /health HTTP/1.1\r\nHost\t: a\r\n\r\n", {400}),
    ("no-colon", b"GET /health HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n", {400}),
    ("empty-name", b"GET /health HTTP/1.1\r\nHost: a\r\n: value\r\n\r\n", {400}),
    # 16: Host
    ("missing-host", b"GET /health HTTP/1.1\r\n\r\n", {400}),
    ("two-hosts", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    # 17: chunk footer (CVE-2025-43859)
    ("chunk-footer", CHAT + TE + b"\r\n3\r\nabcXX0\r\n\r\n", {400}),
    # 18: chunk size
    ("chunk-size-21-hex", CHAT + TE + b"\r\n" + b"0" * 20 + b"3\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk-size-0x", CHAT + TE + b"\r\n0x3\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk-size-minus", CHAT + TE + b"\r\n-3\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk-size-leading-space", CHAT + TE + b"\r\n 3\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk-size-not-hex", CHAT + TE + b"\r\nzz\r\nabc\r\n0\r\n\r\n", {400}),
    # 19: LF or CR inside a chunk extension (CVE-2024-52304; HTTP Garden #36)
    ("chunk-ext-bare-lf", CHAT + TE + b"\r\n%x;a\nb\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY), {400}),
    ("chunk-ext-bare-cr", CHAT + TE + b"\r\n%x;\rxx\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY), {400}),
    # 21: versions
    ("http-1.2", b"GET /health HTTP/1.2\r\nHost: a\r\n\r\n", {505, 400}),
    ("http-2.0", b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", {505, 400}),
    ("http-0.9-style", b"GET /health HTTP/0.9\r\nHost: a\r\n\r\n", {505, 400}),
    ("http-11-lower", b"GET /health http/1.1\r\nHost: a\r\n\r\n", {400}),
    ("http-two-digit", b"GET /health HTTP/11.1\r\nHost: a\r\n\r\n", {400, 505}),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {505, 400}),
    # Request line shape
    ("lowercase-method", b"get /health HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("garbage-line", b"HELLO\r\n\r\n", {400}),
    ("no-version", b"GET /health\r\nHost: a\r\n\r\n", {400}),
    ("double-space", b"GET  /health HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("space-in-target", b"GET /he alth HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("leading-crlf", b"\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("binary-line", b"\x16\x03\x01\x00\xa5\x01\x00\r\n\r\n", {400}),
    ("method-with-digit", b"G3T /health HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("non-ascii-target", b"GET /h\xe9alth HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
]


@pytest.mark.parametrize(
    ("raw", "statuses"), [pytest.param(r, s, id=i) for i, r, s in FRAMING_CASES]
)
@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_framing_violations_are_refused_and_closed(
    raw: bytes, statuses: set[int], split: Splitter
) -> None:
    refused(raw, statuses, split=split)


def test_pipelined_request_behind_a_refusal_is_not_processed() -> None:
    # Checklist §6 item 22.
    raw = (
        CHAT
        + with_cl()
        + TE
        + b"\r\n"
        + chunked()
        + encode_request("GET", "/v1/models")
        + encode_request("POST", "/v1/chat/completions", [], BODY)
    )
    peer = refused(raw, {400})
    assert peer.completed == []


# --- controls: what the strict layer must still accept ------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(CHAT + with_cl() + b"\r\n" + BODY, id="plain"),
        pytest.param(CHAT + TE + b"\r\n" + chunked(), id="chunked"),
        pytest.param(CHAT + b"Transfer-Encoding: Chunked\r\n\r\n" + chunked(), id="te-case"),
        pytest.param(
            CHAT + TE + b"\r\n%x;name=value\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY),
            id="chunk-ext",
        ),
        pytest.param(CHAT + TE + b"\r\n" + chunked()[:-2] + b"X-Trailer: t\r\n\r\n", id="trailers"),
        pytest.param(
            CHAT + b"Content-Length: 0%d\r\n\r\n" % len(BODY) + BODY, id="cl-leading-zero"
        ),
        pytest.param(CHAT + b"X-Empty:\r\n" + with_cl() + b"\r\n" + BODY, id="empty-value"),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.0\r\n" + with_cl() + b"\r\n" + BODY, id="http10"
        ),
        pytest.param(
            CHAT + b"X-Latin: caf\xe9\r\n" + with_cl() + b"\r\n" + BODY, id="obs-text-value"
        ),
    ],
)
def test_well_formed_variants_are_accepted(raw: bytes) -> None:
    peer = ok(raw)
    assert peer.calls and peer.calls[0].request.model == "echo"


# --- size limits (reliability.md §2.2, checklist §6 items 1-6) -----------------------------


def test_request_line_over_8k_is_414() -> None:
    line = b"GET /" + b"a" * (9 * 1024) + b" HTTP/1.1\r\n"
    refused(line + b"Host: a\r\n\r\n", {414}, method="GET")


@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_request_line_over_8k_without_end_is_414(split: Splitter) -> None:
    refused(b"GET /" + b"a" * (8 * 1024 + 10), {414}, split=split, method="GET")


def test_head_over_16k_in_one_read_is_431() -> None:
    fields = b"".join(b"X-Field-%03d: %s\r\n" % (i, b"v" * 300) for i in range(60))
    assert len(fields) > 16 * 1024
    refused(b"GET /health HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", {431}, method="GET")


def test_one_megabyte_head_in_one_read_is_431() -> None:
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(1000))
    refused(b"GET /health HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", {431}, method="GET")


def test_incomplete_head_over_16k_is_431() -> None:
    fields = b"".join(b"X-Field-%03d: %s\r\n" % (i, b"v" * 300) for i in range(60))
    refused(b"GET /health HTTP/1.1\r\nHost: a\r\n" + fields, {431}, method="GET")


def test_more_than_100_header_fields_is_431() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(101))
    refused(b"GET /health HTTP/1.1\r\n" + fields + b"Host: a\r\n\r\n", {431}, method="GET")


def test_100_header_fields_are_fine() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(99))
    ok(b"GET /health HTTP/1.1\r\n" + fields + b"Host: a\r\n\r\n", method="GET")


def test_one_field_over_8k_is_431() -> None:
    raw = b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * (8 * 1024 + 1) + b"\r\n\r\n"
    refused(raw, {431}, method="GET")


def test_content_length_over_the_limit_is_413_before_the_body() -> None:
    config = EngineConfig(max_body_bytes=1000)
    peer = refused(CHAT + b"Content-Length: 1001\r\n\r\n", {413}, config=config)
    assert peer.completed == []


@pytest.mark.parametrize("digits", [b"99999999999999999999", b"18446744073709551616"])
def test_huge_content_length_is_refused_without_allocation(digits: bytes) -> None:
    refused(CHAT + b"Content-Length: " + digits + b"\r\n\r\n", {413, 400})


@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_chunked_body_passing_the_limit_is_413(split: Splitter) -> None:
    config = EngineConfig(max_body_bytes=1000)
    piece = b"258\r\n" + b"x" * 600 + b"\r\n"
    peer = refused(CHAT + TE + b"\r\n" + piece * 2, {413}, config=config, split=split)
    assert peer.calls == []


def test_chunked_body_at_the_limit_is_accepted() -> None:
    body = chat_body(padding="p" * 500)
    config = EngineConfig(max_body_bytes=len(body))
    peer = EnginePeer(config)
    peer.request("POST", "/v1/chat/completions", [], [body[:300], body[300:]], chunked=True)
    assert len(peer.calls) == 1


def test_huge_chunk_size_hits_the_body_limit() -> None:
    config = EngineConfig(max_body_bytes=1000)
    raw = CHAT + TE + b"\r\nFFFFFFFFFFFFFFFFFFFF\r\n" + b"x" * 1200
    refused(raw, {413}, config=config)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/nope",  # no such route: the body is never stored, but it still counts
        "/v1/models",  # wrong method
    ],
)
def test_chunked_body_over_the_limit_is_413_whatever_the_route(target: str) -> None:
    config = EngineConfig(max_body_bytes=1000)
    piece = b"258\r\n" + b"x" * 600 + b"\r\n"
    head = b"POST %s HTTP/1.1\r\nHost: a\r\n" % target.encode() + TE + b"\r\n"
    refused(head + piece * 3, {413}, config=config)


def test_chunked_body_over_the_limit_is_413_without_auth() -> None:
    config = EngineConfig(
        max_body_bytes=1000,
        auth_mode=AuthMode.STATIC,
        static_keys=(StaticKey.from_token("sk-good"),),
    )
    piece = b"258\r\n" + b"x" * 600 + b"\r\n"
    refused(CHAT + TE + b"\r\n" + piece * 3, {413}, config=config)


# --- fatal responses are still proper responses ------------------------------------------


@pytest.mark.parametrize(
    ("raw", "config"),
    [
        pytest.param(b"GET /health HTTP/1.1\nHost: a\n\n", None, id="400-strict-layer"),
        pytest.param(CHAT + TE + b"\r\n3\r\nabcXX0\r\n\r\n", None, id="400-h11"),
        pytest.param(
            CHAT + b"Content-Length: 11\r\n\r\n", EngineConfig(max_body_bytes=10), id="413"
        ),
        pytest.param(b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", None, id="431"),
        pytest.param(b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", None, id="505"),
    ],
)
def test_refusals_carry_x_request_id(raw: bytes, config: EngineConfig | None) -> None:
    # PROTOCOL.md §2: "Every response carries x-request-id".
    peer = refused(raw, {400, 413, 431, 505}, config=config)
    assert peer.replies[0].header("x-request-id")


# --- header injection (reliability.md §2.3, checklist §6 item 27) ------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: a\r\nX-Request-Id: a\rSet-Cookie: x=1\r\n\r\n",
            id="bare-cr",
        ),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: a\r\nX-Request-Id: a\nSet-Cookie: x=1\r\n\r\n",
            id="bare-lf",
        ),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: a\r\nX-Request-Id: a\r\n Set-Cookie: x=1\r\n\r\n",
            id="obs-fold",
        ),
    ],
)
def test_request_id_with_cr_or_lf_cannot_split_the_response(raw: bytes) -> None:
    peer = refused(raw, {400}, method="GET")
    assert b"set-cookie" not in bytes(peer.wire).lower()


def test_request_id_with_encoded_crlf_is_replaced() -> None:
    peer = EnginePeer()
    reply = peer.get("/health", [("X-Request-Id", "a%0d%0aSet-Cookie:%20x=1")])
    assert reply.status == 200
    assert reply.header("set-cookie") is None
    assert (reply.header("x-request-id") or "").startswith("req_")


def test_crlf_in_the_path_stays_in_the_body() -> None:
    peer = EnginePeer()
    peer.request("GET", "/v1/models/a%0d%0aSet-Cookie:%20x=1")
    peer.models(peer.listings[0].stream_id, [])
    reply = peer.last_reply()
    assert reply.status == 404
    assert reply.header("set-cookie") is None
    assert b"\r\nSet-Cookie" not in bytes(peer.wire)


def test_origin_with_odd_bytes_is_not_reflected() -> None:
    config = EngineConfig(cors_origins=("https://app.example",))
    peer = EnginePeer(config)
    raw = b"GET /health HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\xff\r\n\r\n"
    peer.send_raw(raw, target="/health")
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.header("access-control-allow-origin") is None


# --- nothing escapes receive_data ------------------------------------------------------------

FRAGMENTS = [
    b"GET",
    b"POST",
    b"OPTIONS",
    b"HEAD",
    b"get",
    b" ",
    b"/v1/chat/completions",
    b"/v1/models",
    b"/health",
    b"*",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff",
    b":",
    b"Host: a",
    b"Content-Length: 5",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Expect: 100-continue",
    b"Connection: close",
    b"Authorization: Bearer \xe9",
    b"X-Request-Id: ok",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"{}",
    b'{"model":"echo","messages":[{"role":"user","content":"hi"}],"stream":true}',
]
fuzz_settings = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def drive_without_raising(data: bytes, cuts: list[int]) -> bytes:
    """Feed ``data`` cut at ``cuts``, answer any provider work, run the clock; return output."""
    conn = ServerConnection(EngineConfig(max_body_bytes=4096), 0.0)
    out = bytearray()
    now = 1.0
    for piece in split_at(cuts)(data):
        conn.receive_data(piece, now)
        out += conn.data_to_send()
        for effect in conn.effects():
            if isinstance(effect, CallProvider):
                conn.provider_done(effect.stream_id, now)
            elif isinstance(effect, ListModels):
                conn.models_listed(effect.stream_id, [], now)
            out += conn.data_to_send()
        now += 0.5
    for _ in range(4):
        deadline = conn.next_deadline()
        if deadline is None:
            break
        conn.handle_timer(deadline)
        out += conn.data_to_send()
        conn.effects()
    conn.receive_eof(now)
    conn.effects()
    out += conn.data_to_send()
    assert conn.closed
    return bytes(out)


@fuzz_settings
@given(data=st.binary(max_size=1500), cuts=st.lists(st.integers(0, 1500), max_size=6))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    out = drive_without_raising(data, cuts)
    assert out == b"" or out.startswith(b"HTTP/1.1 ")


@fuzz_settings
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_arbitrary_request_like_bytes_never_raise(parts: list[bytes], cuts: list[int]) -> None:
    out = drive_without_raising(b"".join(parts), cuts)
    assert out == b"" or out.startswith(b"HTTP/1.1 ")


@fuzz_settings
@given(
    head=st.sampled_from(
        [
            CHAT + b"Content-Length: 40\r\n\r\n",
            CHAT + TE + b"\r\n",
            b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
            CHAT + b"Expect: 100-continue\r\n" + TE + b"\r\n",
        ]
    ),
    tail=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 700), max_size=6),
)
def test_arbitrary_bytes_after_a_valid_head_never_raise(
    head: bytes, tail: bytes, cuts: list[int]
) -> None:
    out = drive_without_raising(head + tail, cuts)
    assert out.startswith(b"HTTP/1.1 ")


def test_fuzz_helper_sees_a_normal_exchange() -> None:
    out = drive_without_raising(encode_request("GET", "/health"), [3, 9])
    assert out.startswith(b"HTTP/1.1 200 ")
