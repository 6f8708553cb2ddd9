"""The ``websockets`` library peer for W4 and W5: NodeTool's ``/chat`` turn on
``websockets.asyncio.server`` (uvloop when installed), the same frames as the FastAPI peer.

Compression is off, as it is for every server here (the load generator offers none, and
wirechat does not implement permessage-deflate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import time
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import contextlib

from common import install_uvloop, raise_nofile

_WORD = re.compile(r"\S+\s*")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def handler(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            binary = isinstance(message, bytes)
            frame = msgpack.unpackb(message) if binary else json.loads(message)

            async def send(payload: dict[str, Any], binary: bool = binary) -> None:
                if binary:
                    await ws.send(msgpack.packb(payload, use_bin_type=True))
                else:
                    await ws.send(_dumps(payload))

            if frame.get("type") == "ping":
                await send({"type": "pong", "ts": time.time()})
                continue
            text = str(frame.get("content") or "")
            thread_id = frame.get("thread_id") or "thread_" + secrets.token_hex(12)
            for index, word in enumerate(_WORD.findall(text)):
                if index:
                    await asyncio.sleep(0)
                await send(
                    {
                        "type": "chunk",
                        "content": word,
                        "content_type": "text",
                        "done": False,
                        "thread_id": thread_id,
                    }
                )
            await send({"type": "chunk", "content": "", "done": True, "thread_id": thread_id})
            await send(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": text,
                    "thread_id": thread_id,
                    "model": frame.get("model") or "echo",
                    "provider": None,
                    "agent_mode": False,
                }
            )
    except ConnectionClosed:
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    install_uvloop()

    async def run() -> None:
        async with serve(handler, args.host, args.port, compression=None, backlog=4096) as srv:
            print(f"websockets listening on ws://{args.host}:{args.port}", flush=True)
            await srv.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
