"""A trivial WebSocket server on a raw ``asyncio.Protocol`` (uvloop when installed): the
yardstick for the WebSocket load generator's ceiling (W4) and a memory floor (W5).

It answers any path's upgrade, and each message with one ``transport.write`` of a
precomputed turn (50 ``chunk`` frames, the done chunk, the final ``message``) in the
message's encoding; ``{"type": "ping"}`` gets a ``pong``. It decodes nothing else: whatever
turns/s a client reaches against it is the most that client can measure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from typing import cast

import msgpack  # type: ignore[import-untyped, unused-ignore]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import contextlib

from common import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TEXT,
    compact,
    install_uvloop,
    parse_frames,
    raise_nofile,
    server_frame,
    ws_accept,
)

_WORD = re.compile(r"\S+\s*")
_THREAD = "thread_000000000000000000000000"


def _turn_frames() -> list[dict[str, object]]:
    frames: list[dict[str, object]] = [
        {"type": "chunk", "content": w, "content_type": "text", "done": False, "thread_id": _THREAD}
        for w in _WORD.findall(TEXT)
    ]
    frames.append({"type": "chunk", "content": "", "done": True, "thread_id": _THREAD})
    frames.append(
        {"type": "message", "role": "assistant", "content": TEXT, "thread_id": _THREAD,
         "model": "echo", "provider": None, "agent_mode": False}
    )  # fmt: skip
    return frames


TURN = {
    OP_TEXT: b"".join(server_frame(OP_TEXT, compact(f)) for f in _turn_frames()),
    OP_BINARY: b"".join(
        server_frame(OP_BINARY, msgpack.packb(f, use_bin_type=True)) for f in _turn_frames()
    ),
}
PONG = {
    OP_TEXT: server_frame(OP_TEXT, compact({"type": "pong"})),
    OP_BINARY: server_frame(OP_BINARY, msgpack.packb({"type": "pong"})),
}


class RawWS(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            match = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)
            if match is None:
                transport.close()
                return
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(match.group(1))
                + b"\r\n\r\n"
            )  # fmt: skip
            self.open = True
        for opcode, payload in parse_frames(self.buf):
            if opcode in (OP_TEXT, OP_BINARY):
                transport.write(PONG[opcode] if b"ping" in payload else TURN[opcode])
            elif opcode == OP_PING:
                transport.write(server_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                transport.write(server_frame(OP_CLOSE, payload[:2]))
                transport.close()
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    install_uvloop()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(RawWS, args.host, args.port, backlog=4096)
        print(f"raw ws listening on ws://{args.host}:{args.port}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
