"""The Python floor for W1-W3 (and the fast upstream of W6): a minimal HTTP/1.1 server on a
raw ``asyncio.Protocol`` (uvloop when installed).

It does the least work any Python server must do for these endpoints: find the head, read
``Content-Length``, ``json.loads`` the body, take the last user message, build and
``json.dumps`` the answer. It checks nothing else (no header validation, no pipelining, no
limits): that is what makes it a floor, not a server to run.

Streaming (``"stream": true``) sends the same events as wirechat (role chunk, one chunk per
word, finish chunk, an optional usage chunk, ``[DONE]``), chunked, one ``transport.write`` per
event, and yields to the event loop between words as a real token stream does. The constant
parts of each event are encoded once per request; only the word is JSON-encoded per chunk.

``--static`` answers every request with one precomputed response: the load generator's
ceiling, not a floor.
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
from typing import Any, cast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import contextlib

from common import install_uvloop

_WORD = re.compile(r"\S+\s*")
_MODELS = {
    "object": "list",
    "data": [{"id": "echo", "object": "model", "created": 1735689600, "owned_by": "wirechat"}],
}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _head(status: bytes, ctype: bytes, length: int | None) -> bytes:
    if length is None:
        return (
            b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype
            + b"\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )  # fmt: skip
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype
        + b"\r\ncontent-length: " + str(length).encode() + b"\r\n\r\n"
    )  # fmt: skip


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class FloorProtocol(asyncio.Protocol):
    static: bytes | None = None

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            method, _, rest = lines[0].partition(b" ")
            path = rest.partition(b" ")[0]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            if not self._handle(method, path, body):
                return  # a stream runs; it calls _process again when done

    def _handle(self, method: bytes, path: bytes, body: bytes) -> bool:
        transport = self.transport
        if transport is None:
            return False
        if self.static is not None:
            transport.write(self.static)
            return True
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            payload = _dumps(_MODELS)
            transport.write(_head(b"200 OK", b"application/json", len(payload)) + payload)
            return True
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/chat/completions"):
            transport.write(_head(b"404 Not Found", b"text/plain", 0))
            return True
        request = json.loads(body)
        messages = request["messages"]
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        model = request.get("model", "echo")
        cid = "chatcmpl-" + secrets.token_hex(15)
        created = int(time.time())
        if request.get("stream"):
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            self.busy = True
            asyncio.get_running_loop().create_task(
                self._stream(text, model, cid, created, usage, len(text.split()))
            )
            return False
        words = len(text.split())
        payload = _dumps(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": words,
                    "completion_tokens": words,
                    "total_tokens": 2 * words,
                },
            }
        )
        transport.write(_head(b"200 OK", b"application/json", len(payload)) + payload)
        return True

    async def _stream(
        self, text: str, model: str, cid: str, created: int, usage: bool, words: int
    ) -> None:
        transport = self.transport
        assert transport is not None
        prefix = (
            b"data: "
            + _dumps(
                {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            )[:-1]
        )
        role = prefix + (
            b',"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )
        word_head = prefix + b',"choices":[{"index":0,"delta":{"content":'
        word_tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        transport.write(_head(b"200 OK", b"text/event-stream", None) + _chunk(role))
        for index, word in enumerate(_WORD.findall(text)):
            if index:
                await asyncio.sleep(0)
            if transport.is_closing():
                return
            transport.write(_chunk(word_head + _dumps(word) + word_tail))
        tail = prefix + (
            b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        )
        if usage:
            tail += prefix + b',"choices":[],"usage":' + _dumps(
                {"prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words}
            ) + b"}\n\n"  # fmt: skip
        transport.write(_chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.busy = False
        if self.buf:
            self._process()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--static", action="store_true", help="one precomputed answer")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop:
        install_uvloop()
    if args.static:
        payload = _dumps(_MODELS)
        FloorProtocol.static = _head(b"200 OK", b"application/json", len(payload)) + payload

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(FloorProtocol, args.host, args.port, backlog=4096)
        print(f"raw floor listening on http://{args.host}:{args.port}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
