"""Structured WebSocket input for the fuzz targets: client frames built bit by bit, and the
NodeTool application messages (``/chat`` frames, ``/predict`` commands) they carry.

Rules of this module: it reads a :class:`FuzzInput` and returns bytes or plain values; no
wirechat imports. Values are drawn from the protocol's own vocabulary most of the time and
from anything at all the rest, so the fuzzer reaches deep states without a dictionary.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]
from _fuzzkit import FuzzInput

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

CHAT_TYPES: tuple[str | None, ...] = (
    "message",
    "chat_message",
    None,
    "stop",
    "ping",
    "pong",
    "client_tools_manifest",
    "tool_result",
    "message",
    "bogus",
)
PREDICT_COMMANDS = (
    "run_job",
    "set_mode",
    "clear_models",
    "cancel_job",
    "get_status",
    "reconnect_job",
    "stream_input",
    "end_input_stream",
    "run_job",
    "get_status",
    "bogus",
)
WORDS = (
    "",
    "hi",
    "echo",
    "summarize",
    "echo_graph",
    "calculator",
    "search",
    "call_1",
    "call_2",
    "thread_1",
    "binary",
    "text",
    "j1",
    "\u2028",
    "\x00",
    "data: [DONE]\n\n",
    "\ud800",
)
CLOSE_CODES = (
    1000,
    1001,
    1002,
    1003,
    1004,
    1005,
    1006,
    1007,
    1008,
    1009,
    1010,
    1011,
    1015,
    999,
    2999,
    3000,
    4999,
    5000,
    65535,
)


def ws_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x5a\x13\xc4\x7e",
    length_form: int | None = None,
    declared: int | None = None,
) -> bytes:
    """One RFC 6455 frame as a client writes it; ``mask=None`` leaves it unmasked,
    ``length_form`` forces 0/126/127, ``declared`` lies about the payload length."""
    size = len(payload) if declared is None else declared
    form = (
        length_form
        if length_form is not None
        else 0
        if size < 126
        else 126
        if size < 65536
        else 127
    )
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    bit = 0x80 if mask is not None else 0
    if form == 0:
        head = bytes([first, bit | (size & 0x7F)])
    elif form == 126:
        head = bytes([first, bit | 126]) + struct.pack("!H", size & 0xFFFF)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", size & 0xFFFFFFFFFFFFFFFF)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def word(src: FuzzInput) -> str:
    return src.pick(WORDS) if src.byte() < 200 else src.text(24)


def json_value(src: FuzzInput, depth: int = 0) -> Any:
    """Any value JSON or MessagePack can carry (NaN, bytes and huge integers included)."""
    kind = src.int_in(0, 11 if depth < 6 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return src.flag()
    if kind == 2:
        return src.int_in(-(2**31), 2**31)
    if kind == 3:
        return src.pick((0.5, -0.0, 1e308, float("nan"), float("inf"), 2**64, -(2**63) - 1))
    if kind in (4, 5, 6):
        return word(src)
    if kind == 7:
        return src.blob(16)
    if kind in (8, 9):
        return [json_value(src, depth + 1) for _ in range(src.int_in(0, 4))]
    return {_key(src): json_value(src, depth + 1) for _ in range(src.int_in(0, 4))}


def _key(src: FuzzInput) -> Any:
    """A map key: a string, now and then what only MessagePack can carry (bytes, numbers)."""
    kind = src.byte()
    if kind < 240:
        return word(src)
    return src.blob(4) if kind < 250 else src.int_in(-5, 5)


def _content(src: FuzzInput) -> Any:
    kind = src.int_in(0, 5)
    if kind <= 2:
        return word(src)
    if kind == 3:
        parts: list[Any] = []
        for _ in range(src.int_in(0, 3)):
            part_type = src.pick(("text", "image_url", "image", "audio"))
            part: dict[str, Any] = {"type": part_type, "text": word(src)}
            if part_type == "image_url" and src.flag():
                part["image"] = {"uri": word(src)} if src.flag() else word(src)
            parts.append(part if src.byte() < 220 else json_value(src, 4))
        return parts
    return json_value(src, 3)


def chat_frame(src: FuzzInput) -> dict[str, Any]:
    """A ``/chat`` client frame: mostly well-formed, each field sometimes wrong or absent."""
    frame: dict[str, Any] = {}
    kind = src.pick(CHAT_TYPES)
    if kind is not None:
        frame["type"] = kind
    fields = src.byte()
    if kind in (None, "message", "chat_message") or fields & 1:
        frame["content"] = _content(src)
    if fields & 2:
        frame["thread_id"] = word(src)
    if fields & 4:
        frame["model"] = word(src)
    if fields & 8:
        frame["tools"] = [word(src) for _ in range(src.int_in(0, 2))]
    if fields & 16:
        frame["workflow_id"] = word(src) if src.flag() else json_value(src, 5)
    if kind == "client_tools_manifest":
        frame["tools"] = [
            {"name": word(src), "description": word(src), "parameters": json_value(src, 4)}
            for _ in range(src.int_in(0, 2))
        ]
    if kind == "tool_result":
        frame["tool_call_id"] = src.pick(("call_1", "call_2", "call_3", "call_4")) or word(src)
        frame["ok"] = src.pick((True, False, None, 1))
        frame["result"] = json_value(src, 4)
        if src.flag():
            frame["error"] = json_value(src, 5)
    if fields & 32:
        frame[word(src)] = json_value(src, 4)
    return frame


def predict_frame(src: FuzzInput) -> dict[str, Any]:
    """A ``/predict`` command: ``{"command", "data"}`` with fields right, wrong or missing."""
    command = src.pick(PREDICT_COMMANDS)
    frame: dict[str, Any] = {"command": command if src.byte() < 240 else json_value(src, 5)}
    fields = src.byte()
    if fields & 0x80:
        frame["data"] = json_value(src, 3)
        return frame
    data: dict[str, Any] = {}
    if fields & 1 or command == "run_job":
        data["workflow_id"] = word(src) if src.flag() else json_value(src, 5)
    if fields & 2:
        data["params"] = json_value(src, 3) if src.flag() else {"message": word(src)}
    if fields & 4 or command == "set_mode":
        data["mode"] = src.pick(("binary", "text", "json", None))
    if fields & 8 or "job" in command or command == "stream_input":
        data["job_id"] = word(src) if src.flag() else json_value(src, 5)
    if fields & 16:
        data["input"] = word(src) if src.flag() else json_value(src, 5)
    if fields & 32:
        data["user_id"] = word(src)
    if not fields & 64:
        frame["data"] = data
    return frame


def encode_app(value: Any, binary: bool, src: FuzzInput | None = None) -> bytes:
    """``value`` as a JSON text payload or a MessagePack binary payload. Lone surrogates are
    written as escapes (JSON) or as their raw, invalid UTF-8 bytes when ``src`` says so."""
    raw = src is not None and src.chance(8)
    if binary:
        return msgpack.packb(  # type: ignore[no-any-return]
            value,
            use_bin_type=True,
            unicode_errors="surrogatepass" if raw else "strict",
            default=repr,
        )
    text = json.dumps(value, ensure_ascii=not raw, default=repr)
    return text.encode("utf-8", "surrogatepass")


def app_payload(src: FuzzInput, predict: bool) -> tuple[int, bytes]:
    """(opcode, payload) of one application message, or ``None`` on encoding trouble."""
    value: Any = predict_frame(src) if predict else chat_frame(src)
    if src.chance(16):
        value = json_value(src)  # not an object at all
    binary = src.flag()
    try:
        payload = encode_app(value, binary, src)
    except (TypeError, ValueError, UnicodeEncodeError, OverflowError):
        payload = b"{}"
    return (OP_BINARY if binary else OP_TEXT), payload


def client_frames(src: FuzzInput, predict: bool, max_frames: int = 24) -> tuple[bytes, list[int]]:
    """A run of client frames; returns the bytes and the close codes the client sent."""
    out = bytearray()
    codes: list[int] = []
    for _ in range(max_frames):
        if src.remaining == 0:
            break
        kind = src.int_in(0, 15)
        flags = src.byte()
        fin = not (flags & 1 and flags & 2)
        rsv = src.int_in(0, 7) if flags & 4 and flags & 8 else 0
        mask: bytes | None = (
            src.take(4).ljust(4, b"\0") if not (flags & 16 and flags & 32) else None
        )
        form = src.pick((None, None, None, 126, 127)) if flags & 64 else None
        if kind <= 8:
            opcode, payload = app_payload(src, predict)
            if kind == 8 and len(payload) > 1:  # the same message in two fragments
                cut = src.int_in(1, len(payload) - 1)
                out += ws_frame(opcode, payload[:cut], fin=False, mask=mask)
                opcode, payload = OP_CONT, payload[cut:]
        elif kind == 9:
            opcode, payload = src.pick((OP_TEXT, OP_BINARY, OP_CONT)), src.blob(300)
        elif kind == 10:
            opcode, payload = OP_PING, src.blob(130)
        elif kind == 11:
            opcode, payload = OP_PONG, src.blob(8)
        elif kind == 12:
            code = src.pick(CLOSE_CODES)
            codes.append(code)
            reason = src.blob(130) if flags & 128 else b"bye"
            payload = struct.pack("!H", code) + reason if src.byte() else src.blob(1)
            opcode = OP_CLOSE
        elif kind == 13:
            opcode, payload = src.int_in(0, 15), src.blob(40)
        elif kind == 14:  # a huge declared length with a few bytes behind it
            declared = src.pick((126, 65536, 2**31, 2**63 - 1, 2**64 - 1))
            out += ws_frame(
                src.pick((OP_TEXT, OP_BINARY)), src.blob(8), mask=mask, declared=declared
            )
            break
        else:  # bytes that are no frame at all
            out += src.blob(64)
            continue
        out += ws_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, length_form=form)
    return bytes(out), codes
