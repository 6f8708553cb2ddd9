"""Hypothesis-driven fuzzers: the invariants of the atheris targets, with structured inputs.

Where the atheris targets mutate bytes under coverage feedback, these build their input from
the protocol's grammar (requests with any method, target, header, framing and line ending;
OpenAI bodies field by field; frames with any opcode, flag and NodeTool message; texts with
lone surrogates, CR, NUL, U+2028) and run them through the very same checks: each test ends
in a target's ``run_*`` function or its ``TestOneInput``.

Not collected by a plain ``pytest`` run (its name does not start with ``test_``);
``tests/test_fuzz_properties.py`` runs them with a few examples each in CI. Long runs:

    WIRECHAT_FUZZ_EXAMPLES=20000 python -m pytest fuzz/hypothesis_fuzz.py -q -x

With ``WIRECHAT_FUZZ_EXAMPLES`` unset the examples are few and derandomized (CI is
deterministic); set, they are random and hypothesis keeps what it finds in ``.hypothesis/``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

import fuzz_codec
import fuzz_http
import fuzz_openai_parse
import fuzz_predict
import fuzz_sse
import fuzz_ws
import msgpack  # type: ignore[import-untyped]
from _driver import TOKEN, Script
from _wsgen import (
    CHAT_TYPES,
    CLOSE_CODES,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PREDICT_COMMANDS,
    WORDS,
    ws_frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirechat.engine import RequestError
from wirechat.engine.codec import FrameDecodeError, decode_frame
from wirechat.engine.openai import parse_chat_request

_LONG_RUN = "WIRECHAT_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("WIRECHAT_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not _LONG_RUN,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- values ----------------------------------------------------------------------------------

tricky_chars = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),  # lone surrogates: never produced by default
    st.sampled_from(["\r", "\n", "\u2028", "\u2029", "\x85", "\x00", "\ufeff", ":"]),
)
tricky_text = st.text(tricky_chars, max_size=40) | st.sampled_from(WORDS)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | tricky_text
    | st.binary(max_size=12)
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text
)


def _containers(children: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    return st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)


any_values = st.recursive(
    scalars, lambda c: _containers(c, tricky_text | st.binary(max_size=4)), max_leaves=12
)
json_values = st.recursive(json_scalars, lambda c: _containers(c, tricky_text), max_leaves=12)
anything = json_values | any_values


# How the fake outside world answers (``_driver.Script``), each field drawn on its own so
# every provider behaviour is tried often, the rare ones included.
scripts = st.builds(
    Script,
    provider=st.integers(0, 7),
    usage=st.booleans(),
    world=st.integers(0, 3),
    job_answer=st.integers(0, 3),
)
script_bytes = st.builds(
    lambda p, u, w, j: p | u << 3 | w << 4 | j << 6,
    st.integers(0, 7),
    st.integers(0, 1),
    st.integers(0, 3),
    st.integers(0, 3),
)


# --- HTTP ------------------------------------------------------------------------------------

METHODS = ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "CONNECT", "get", "PRI", "X" * 21]
TARGETS = [
    "/v1/chat/completions", "/chat/completions/", "/v1/models", "/v1/models/echo",
    "/v1/models/meta-llama%2FLlama-3", "/health", "/ping", "/chat", "/predict?api_key=" + TOKEN,
    "/workflows", "/workflows/summarize/run", "/workflows/summarize/run/stream", "*",
    "/v1/chat/completions?x=1#f", "http://a/health",
]  # fmt: skip
HEADER_NAMES = [
    "Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "Authorization",
    "Origin", "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "X-Request-Id",
    "Access-Control-Request-Headers", "Content-Type", "content-length", "X",
]  # fmt: skip
HEADER_VALUES = [
    "a", "0", "5", "-1", "1, 1", "chunked", "gzip, chunked", "close", "keep-alive",
    "Upgrade", "websocket", "13", "dGhlIHNhbXBsZSBub25jZQ==", "100-continue",
    f"Bearer {TOKEN}", "Bearer wrong", "https://app.test", "application/json", "a\tb", "é",
]  # fmt: skip


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """One request, right or wrong in any part: line, headers, framing, body, line endings."""
    eol = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n"]))
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS) | st.text(max_size=20).map(lambda t: "/" + t))
    version = draw(st.sampled_from(["HTTP/1.1"] * 4 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.10", ""]))
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(HEADER_NAMES) | st.text(max_size=8),
                st.sampled_from(HEADER_VALUES) | st.text(max_size=12),
            ),
            max_size=6,
        )
    )
    body = draw(
        st.just(b"")
        | openai_bodies().map(lambda b: json.dumps(b).encode())
        | st.binary(max_size=64)
    )
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "both", "lie"]))
    lines = [f"{method} {target} {version}".encode("utf-8", "surrogatepass")]
    if draw(st.booleans()):
        lines.append(b"Host: fuzz.test")
    lines += [f"{k}: {v}".encode("utf-8", "surrogatepass") for k, v in headers]
    payload = body
    if framing in ("length", "both") and body:
        lines.append(b"Content-Length: %d" % len(body))
    if framing == "lie":
        lines.append(b"Content-Length: %d" % draw(st.integers(0, 2**64)))
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: chunked")
        ext = draw(st.sampled_from([b"", b";a=b", b";" + b"x" * 300, b" ;a"]))
        payload = (b"%x%s\r\n%s\r\n" % (len(body), ext, body) if body else b"") + b"0\r\n\r\n"
    return eol.join(lines) + eol + eol + payload


@FUZZ
@given(
    requests=st.lists(http_requests(), min_size=1, max_size=4),
    config=st.integers(0, 3),
    script=script_bytes,
    timers=st.booleans(),
    cuts=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4),
)
def test_http_requests(
    requests: list[bytes], config: int, script: int, timers: bool, cuts: list[int]
) -> None:
    """Requests, pipelined and read in pieces: replies an h11 client parses, no exception."""
    data = fuzz_http.encode_seed(
        b"".join(requests), config=config, script=script, timers=timers, cuts=cuts
    )
    fuzz_http.TestOneInput(data)


# --- OpenAI bodies ---------------------------------------------------------------------------

ROLES = ["system", "developer", "user", "assistant", "tool", "function"]


@st.composite
def openai_messages(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": draw(st.sampled_from(ROLES) | json_scalars)}
    parts = st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "input_audio", "refusal", "x"])},
            optional={"text": tricky_text | json_scalars, "image_url": json_values},
        ),
        max_size=3,
    )
    if draw(st.integers(0, 9)):
        message["content"] = draw(tricky_text | parts | json_values)
    if draw(st.booleans()):
        call = st.fixed_dictionaries(
            {
                "id": st.sampled_from(["call_1", "c"]) | json_scalars,
                "function": st.fixed_dictionaries(
                    {"name": st.sampled_from(["f"]) | json_scalars},
                    optional={"arguments": st.just("{}") | json_values},
                )
                | json_values,
            }
        )
        message["tool_calls"] = draw(st.lists(call, max_size=2) | json_values)
    if draw(st.booleans()):
        message["tool_call_id"] = draw(st.just("call_1") | json_scalars)
    if draw(st.booleans()):
        message["name"] = draw(tricky_text | json_scalars)
    return message


def openai_bodies() -> st.SearchStrategy[dict[str, Any]]:
    tool = st.fixed_dictionaries(
        {
            "type": st.just("function") | json_scalars,
            "function": st.fixed_dictionaries(
                {"name": st.sampled_from(["get_weather", "a" * 65, "bad name"]) | json_scalars},
                optional={"description": json_scalars, "parameters": json_values},
            ),
        }
    )
    return st.fixed_dictionaries(
        {
            "model": st.just("echo") | json_scalars,
            "messages": st.lists(openai_messages(), max_size=3) | json_values,
        },
        optional={
            "stream": st.booleans() | json_scalars,
            "stream_options": st.fixed_dictionaries({"include_usage": json_scalars}),
            "n": st.integers(-1, 200) | json_scalars,
            "tools": st.lists(tool, max_size=2) | json_values,
            "tool_choice": st.sampled_from(["auto", "none", "required"])
            | st.just({"type": "function", "function": {"name": "get_weather"}})
            | json_values,
            "stop": st.lists(tricky_text, max_size=5) | json_scalars,
            "temperature": st.floats() | json_scalars,
            "top_p": st.floats(-1, 2) | json_scalars,
            "max_tokens": st.integers(-2, 10) | json_scalars,
            "max_completion_tokens": st.integers(-2, 10) | json_scalars,
            "logprobs": json_scalars,
            "top_logprobs": st.integers(-1, 25) | json_scalars,
            "seed": st.integers(-(2**64), 2**64) | json_scalars,
            "response_format": st.fixed_dictionaries({"type": json_scalars}) | json_values,
            "user": json_scalars,
            "extra": json_values,
        },
    )


@FUZZ
@given(body=openai_bodies(), tiny=st.booleans())
def test_openai_parse(body: dict[str, Any], tiny: bool) -> None:
    """Any body: a ParsedChatRequest or RequestError, nothing else (NaN allowed in)."""
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    fuzz_openai_parse.TestOneInput((b" " if tiny else b"") + raw)


valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "developer"]), "content": st.text()}
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(
    messages=valid_messages,
    stream=st.booleans(),
    n=st.integers(1, 128),
    temperature=st.floats(0, 2),
    stop=st.lists(st.text(min_size=1), max_size=4),
)
def test_valid_openai_bodies_parse(
    messages: list[dict[str, str]], stream: bool, n: int, temperature: float, stop: list[str]
) -> None:
    """The converse: every valid body parses, keeping what it said."""
    body = {
        "model": "echo",
        "messages": messages,
        "stream": stream,
        "n": n,
        "temperature": temperature,
        "stop": stop,
    }
    parsed = parse_chat_request(json.dumps(body).encode("utf-8", "surrogatepass"))
    assert parsed.stream is stream and parsed.n == n
    assert [m.content for m in parsed.request.messages] == [m["content"] for m in messages]
    assert parsed.request.stop == tuple(stop)


@FUZZ
@given(body=st.binary(max_size=200))
def test_openai_parse_bytes(body: bytes) -> None:
    with contextlib.suppress(RequestError):
        parse_chat_request(body)


# --- codec -----------------------------------------------------------------------------------


@FUZZ
@given(value=any_values, binary=st.booleans())
def test_codec_any_value(value: Any, binary: bool) -> None:
    """Whatever a client packs: decoded to plain values within limits, or FrameDecodeError."""
    try:
        data = (
            msgpack.packb(value, use_bin_type=True)
            if binary
            else json.dumps(value).encode("utf-8", "surrogatepass")
        )
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return
    fuzz_codec.TestOneInput(data)


@FUZZ
@given(value=st.dictionaries(st.text(), json_values, max_size=5))
def test_codec_round_trip(value: dict[str, Any]) -> None:
    """A JSON object (no NaN) decodes to itself from JSON text and from MessagePack."""
    text = json.dumps(value)
    assert decode_frame(text, max_depth=64) == json.loads(text)
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, UnicodeEncodeError):
        return  # an integer past 64 bits or a lone surrogate has no MessagePack form
    assert decode_frame(packed, max_depth=64) == msgpack.unpackb(packed, raw=False)


@FUZZ
@given(data=st.binary(max_size=300))
def test_codec_bytes(data: bytes) -> None:
    for message in (data, data.decode("latin-1")):
        with contextlib.suppress(FrameDecodeError):
            assert isinstance(decode_frame(message, max_depth=8), dict)


# --- WebSocket -------------------------------------------------------------------------------

wild_chat_frames = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([t for t in CHAT_TYPES if t is not None]) | json_scalars,
        "content": tricky_text
        | st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url"])},
                optional={"text": tricky_text, "image": anything, "image_url": anything},
            ),
            max_size=3,
        )
        | anything,
        "thread_id": st.sampled_from(["t1", ""]) | anything,
        "model": st.sampled_from(["echo", ""]) | anything,
        "provider": anything,
        "tools": st.lists(st.sampled_from(["calculator", "search", "nope"]), max_size=2)
        | st.lists(st.fixed_dictionaries({"name": tricky_text, "parameters": anything}))
        | anything,
        "workflow_id": st.sampled_from(["summarize", "nope"]) | anything,
        "tool_call_id": st.sampled_from(["call_1", "call_2"]) | anything,
        "ok": anything,
        "result": anything,
        "error": anything,
    },
)
wild_predict_frames = st.fixed_dictionaries(
    {"command": st.sampled_from(PREDICT_COMMANDS) | anything},
    optional={
        "data": st.fixed_dictionaries(
            {},
            optional={
                "workflow_id": st.sampled_from(["summarize", "nope", ""]) | anything,
                "params": st.dictionaries(tricky_text, anything, max_size=3) | anything,
                "mode": st.sampled_from(["binary", "text", "x"]) | anything,
                "job_id": st.sampled_from(["j1", ""]) | anything,
                "input": tricky_text | anything,
                "user_id": anything,
            },
        )
        | anything
    },
)


# Well-formed frames half the time, so turns and jobs really start and run to their end
# (a wild frame is mostly refused at once).
chat_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "chat_message"]), "content": tricky_text},
    optional={
        "thread_id": st.just("t1"),
        "model": st.just("echo"),
        "tools": st.lists(st.sampled_from(["calculator", "search"]), max_size=2),
    },
)
valid_chat_frames = st.one_of(
    chat_messages,  # three times: the frame that starts a turn is the one that matters most
    chat_messages,
    chat_messages,
    chat_messages.map(lambda m: {**m, "workflow_id": "summarize"}),
    st.fixed_dictionaries(
        {
            "type": st.just("client_tools_manifest"),
            "tools": st.lists(
                st.fixed_dictionaries({"name": st.sampled_from(["browser", "calculator"])}),
                min_size=1,
                max_size=2,
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("tool_result"),
            "tool_call_id": st.sampled_from(["call_1", "call_2", "call_3"]),
            "ok": st.booleans(),
            "result": anything,
        }
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["stop", "ping", "pong"])}),
)
valid_predict_frames = st.one_of(
    st.fixed_dictionaries(
        {
            "command": st.just("run_job"),
            "data": st.fixed_dictionaries(
                {"workflow_id": st.sampled_from(["summarize", "echo_graph"])},
                optional={"params": st.dictionaries(tricky_text, anything, max_size=2)},
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "command": st.just("set_mode"),
            "data": st.fixed_dictionaries({"mode": st.sampled_from(["binary", "text"])}),
        }
    ),
    st.fixed_dictionaries(
        {
            "command": st.sampled_from(
                ["get_status", "cancel_job", "reconnect_job", "stream_input", "end_input_stream"]
            ),
            "data": st.fixed_dictionaries(
                {"job_id": st.sampled_from(["j1", ""]) | anything},
                optional={"input": tricky_text},
            ),
        }
    ),
)
chat_frames = valid_chat_frames | wild_chat_frames
predict_frames = valid_predict_frames | wild_predict_frames


def _payload(value: Any, binary: bool) -> tuple[int, bytes]:
    try:
        if binary:
            return OP_BINARY, msgpack.packb(value, use_bin_type=True, default=repr)
        return OP_TEXT, json.dumps(value, default=repr).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return OP_TEXT, b"{}"


@st.composite
def client_frames(draw: st.DrawFn, app: st.SearchStrategy[Any]) -> tuple[bytes, int | None]:
    """One frame a client writes (and the close code it sends, if it is a Close)."""
    # Mostly well-framed messages: one bad frame ends the socket, and what follows is lost.
    kind = draw(
        st.sampled_from(["app"] * 12 + ["fragments"] * 2 + ["control"] * 2 + ["close", "odd"])
    )
    masked = kind != "odd" or draw(st.booleans())
    mask = draw(st.binary(min_size=4, max_size=4)) if masked else None
    if kind == "app":
        opcode, payload = _payload(draw(app), draw(st.booleans()))
        return ws_frame(opcode, payload, mask=mask), None
    if kind == "fragments":
        opcode, payload = _payload(draw(app), draw(st.booleans()))
        cut = draw(st.integers(0, len(payload)))
        first = ws_frame(opcode, payload[:cut], fin=False, mask=mask)
        middle = ws_frame(OP_PING, b"mid", mask=mask) if draw(st.booleans()) else b""
        return first + middle + ws_frame(OP_CONT, payload[cut:], mask=mask), None
    if kind == "control":
        opcode = draw(st.sampled_from([OP_PING, OP_PONG]))
        return ws_frame(opcode, draw(st.binary(max_size=130)), mask=mask), None
    if kind == "close":
        code = draw(st.sampled_from(CLOSE_CODES) | st.integers(0, 65535))
        reason = draw(st.binary(max_size=130) | st.just(b"bye"))
        return ws_frame(OP_CLOSE, struct.pack("!H", code) + reason, mask=mask), code
    frame = ws_frame(
        draw(st.integers(0, 15)),
        draw(st.binary(max_size=40)),
        fin=draw(st.booleans()),
        rsv=draw(st.integers(0, 7)),
        mask=mask,
        length_form=draw(st.sampled_from([None, 0, 126, 127])),
    )
    return frame, None


def _run_ws(
    predict: bool,
    frames: list[tuple[bytes, int | None]],
    config: int,
    script: Script,
    together: bool,
    cuts: list[int],
) -> None:
    data = b"".join(f for f, _ in frames)
    codes = [c for _, c in frames if c is not None]
    fuzz_ws.run_ws(
        config,
        predict,
        data,
        script=script,
        together=together,
        cuts=sorted({c % len(data) for c in cuts}) if data else [],
        client_codes=codes,
    )


@FUZZ
@given(
    frames=st.lists(client_frames(chat_frames), max_size=8),
    config=st.sampled_from([0, 0, 1, 1, 2, 3]),  # 2 and 3 do not serve /chat: a 404
    script=scripts,
    together=st.booleans(),
    cuts=st.lists(st.integers(0, 0xFFFF), max_size=4),
)
def test_chat_frames(
    frames: list[tuple[bytes, int | None]],
    config: int,
    script: Script,
    together: bool,
    cuts: list[int],
) -> None:
    """/chat: any run of frames and messages; well-formed replies and valid close codes."""
    _run_ws(False, frames, config, script, together, cuts)


@FUZZ
@given(
    frames=st.lists(client_frames(predict_frames), max_size=8),
    config=st.integers(0, 3),
    script=scripts,
    together=st.booleans(),
    cuts=st.lists(st.integers(0, 0xFFFF), max_size=4),
)
def test_predict_frames(
    frames: list[tuple[bytes, int | None]],
    config: int,
    script: Script,
    together: bool,
    cuts: list[int],
) -> None:
    _run_ws(True, frames, config, script, together, cuts)


@FUZZ
@given(
    commands=st.lists(st.tuples(predict_frames | anything, st.booleans()), max_size=10),
    config=st.integers(0, 1),
    script=scripts,
    batch=st.booleans(),
)
def test_predict_one_reply_per_command(
    commands: list[tuple[Any, bool]], config: int, script: Script, batch: bool
) -> None:
    """/predict: exactly one direct reply per command, whatever the command holds."""
    payloads = [fuzz_predict.command_payload(value, binary) for value, binary in commands]
    fuzz_predict.run_predict(payloads, config=config, script=script, batch=batch)


# --- SSE -------------------------------------------------------------------------------------


@FUZZ
@given(
    deltas=st.lists(
        tricky_text | st.sampled_from(["\n\ndata: [DONE]\n\n", "data: x\n", "\r\n\r\n"]),
        max_size=8,
    ),
    usage=st.booleans(),
    n=st.integers(1, 3),
    read_cuts=st.lists(st.integers(0, 0xFFFF), max_size=6),
    stream=st.booleans(),
)
def test_sse_round_trip(
    deltas: list[str], usage: bool, n: int, read_cuts: list[int], stream: bool
) -> None:
    """What a provider streams is what an openai client reads, exactly, ending in one [DONE]."""
    fuzz_sse.run_sse(deltas, usage=usage, n=n, read_cuts=read_cuts, stream=stream)
