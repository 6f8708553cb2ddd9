"""Payloads and small helpers shared by the load generators and the peer servers.

Every server in the suite answers the same requests with the same shapes, so these constants
are the single definition of the workloads:

* the user message is 50 words, so the echo reply is 50 words and a stream has 50 content
  chunks (plus the role chunk, the finish chunk and ``[DONE]`` for SSE; plus the done chunk
  and the final ``message`` frame for ``/chat``);
* client WebSocket frames are masked with a fixed key (servers may not rely on the key, and
  precomputing them keeps the load generator cheap).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

WORDS = 50
_VOCAB = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jolly",
]
TEXT = " ".join(_VOCAB[i % len(_VOCAB)] for i in range(WORDS))
assert len(TEXT.split()) == WORDS

MODELS_PATH = "/v1/models"
COMPLETIONS_PATH = "/v1/chat/completions"


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def completion_body(*, stream: bool, model: str = "echo") -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": TEXT}]}
    if stream:
        body["stream"] = True
    return compact(body)


def chat_message(encoding: str) -> bytes:
    """The NodeTool ``/chat`` message of one W4 turn, encoded."""
    message = {"type": "message", "role": "user", "content": TEXT, "model": "echo"}
    if encoding == "json":
        return compact(message)
    import msgpack  # type: ignore[import-untyped, unused-ignore]

    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


PING_JSON = compact({"type": "ping"})


# --- WebSocket framing (RFC 6455), the minimum a client and a trivial server need ---------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MASK = b"\x37\xfa\x21\x3d"


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def ws_handshake(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The upgrade request and the ``Sec-WebSocket-Accept`` value expected back."""
    key = base64.b64encode(os.urandom(16))
    request = (
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    return request, ws_accept(key)


def _header(opcode: int, length: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, bit | length)
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, bit | 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, bit | 127, length)


def mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked (client-to-server) frame."""
    return _header(opcode, len(payload), True) + _MASK + mask(payload, _MASK)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked (server-to-client) frame."""
    return _header(opcode, len(payload), False) + payload


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete frames at the start of ``buf`` (consumed), as (opcode, unmasked payload).

    Fragmented messages come out as their pieces (continuation opcode 0); the servers under
    test never fragment these small frames, and the load generators count that as an error.
    """
    frames: list[tuple[int, bytes]] = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if end - pos < 4:
                break
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            head = 4
        elif length == 127:
            if end - pos < 10:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        key = b""
        if b1 & 0x80:
            key = bytes(buf[pos + head : pos + head + 4])
            head += 4
        if end - pos < head + length:
            break
        payload = bytes(buf[pos + head : pos + head + length])
        if key:
            payload = mask(payload, key)
        opcode = b0 & 0x0F
        if not b0 & 0x80:
            opcode |= 0x40  # not FIN: reported as a fragment
        frames.append((opcode, payload))
        pos += head + length
    if pos:
        del buf[:pos]
    return frames


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its child processes (wirechat --workers forks)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def raise_nofile(limit: int = 65536) -> None:
    """Raise this process's open-file limit (used for the 5,000-connection workload)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
