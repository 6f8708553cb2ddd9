#!/usr/bin/env python3
"""What one request costs inside one process, without sockets: the floors under W1-W4.

``python bench/floors.py`` (run.py runs it pinned to the server core and puts its table in the
results) prints CPU microseconds (``time.process_time``, best of 5 rounds) for:

* ``h11 cycle``: h11 alone parsing W1's request and writing a response with wirechat's
  headers and body (``next_event`` x2, ``send`` x3, ``start_next_cycle``): what any server
  built on h11 pays per request before doing anything of its own;
* ``engine W1`` / ``engine W3``: wirechat's whole ``ServerConnection`` answering W1 (the
  50-word answer as one provider item, as echo gives a non-streamed request) and
  ``GET /v1/models``, with the provider answered in-process;
* ``engine /chat token``: one ``chunk`` frame of a W4 turn (JSON and MessagePack).

Divide a million by a figure for the most requests per CPU-second a server could do if that
were all it did; run.py sets them beside the targets.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import h11
import msgpack  # type: ignore[import-untyped]
from wirechat.engine import (
    CallProvider,
    EngineConfig,
    Finish,
    ListModels,
    ModelInfo,
    ServerConnection,
    TextDelta,
    Usage,
)
from wirechat.engine.events import OpenThread, SaveMessages
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, Request, TextMessage

WORDS = [f"word{i} " for i in range(50)]
REPLY = "".join(WORDS).strip()
BODY = json.dumps(
    {"model": "echo", "messages": [{"role": "user", "content": "".join(WORDS).strip()}]}
).encode()
W1 = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY
W3 = b"GET /v1/models HTTP/1.1\r\nHost: bench\r\n\r\n"
MODELS = [ModelInfo(id="echo", owned_by="wirechat", created=1)]
CONFIG = EngineConfig(ws_ping_interval=1e9)


def best_us(run: Callable[[int], None], n: int, rounds: int = 5) -> float:
    run(max(1, n // 10))  # warm-up
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        run(n)
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def h11_cycle(n: int) -> None:
    body = b'{"id":"chatcmpl-x","object":"chat.completion","choices":[]}' * 8
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"req_0123456789abcdef0123456789abcd"),
        (b"openai-version", b"2020-10-01"),
        (b"openai-processing-ms", b"0"),
        (b"server", b"wirechat"),
        (b"content-length", b"%d" % len(body)),
    ]
    conn = h11.Connection(h11.SERVER)
    for _ in range(n):
        conn.receive_data(W1)
        conn.next_event()
        conn.next_event()
        conn.next_event()
        conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
        conn.send(h11.Data(data=body))
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()


def engine_http(request: bytes) -> Callable[[int], None]:
    def run(n: int) -> None:
        conn = ServerConnection(CONFIG, time.time())
        usage = Usage(prompt_tokens=50, completion_tokens=50)
        for _ in range(n):
            now = time.time()
            conn.receive_data(request, now)
            conn.data_to_send()
            for effect in conn.effects():
                if isinstance(effect, ListModels):
                    conn.models_listed(effect.stream_id, MODELS, now)
                elif isinstance(effect, CallProvider):
                    # Non-streamed, echo answers in one piece (ChatRequest.stream is False).
                    conn.provider_chunk(effect.stream_id, TextDelta(text=REPLY), now)
                    conn.provider_chunk(effect.stream_id, Finish(reason="stop", usage=usage), now)
                    conn.provider_done(effect.stream_id, now)
            conn.data_to_send()
            conn.effects()

    return run


def engine_chat(binary: bool) -> Callable[[int], None]:
    client = WSConnection(ConnectionType.CLIENT)
    conn = ServerConnection(CONFIG, time.time())
    conn.receive_data(client.send(Request(host="bench", target="/chat")), time.time())
    client.receive_data(conn.data_to_send())
    list(client.events())
    message = {"type": "message", "content": "".join(WORDS), "model": "echo", "thread_id": "t"}
    frame = client.send(
        BytesMessage(data=msgpack.packb(message))
        if binary
        else TextMessage(data=json.dumps(message))
    )

    def turns(n: int) -> None:
        for _ in range(max(1, n // len(WORDS))):
            now = time.time()
            conn.receive_data(frame, now)
            pending = conn.effects()
            while pending:
                effect = pending.pop(0)
                if isinstance(effect, OpenThread):
                    conn.thread_opened(effect.op_id, list(effect.append), now)
                elif isinstance(effect, SaveMessages):
                    conn.messages_saved(effect.op_id, now)
                elif isinstance(effect, CallProvider):
                    for word in WORDS:
                        conn.provider_chunk(effect.stream_id, TextDelta(text=word), now)
                        conn.data_to_send()
                    conn.provider_done(effect.stream_id, now)
                pending += conn.effects()
            conn.data_to_send()

    return turns


def measure() -> dict[str, float]:
    return {
        "h11 cycle": best_us(h11_cycle, 2000),
        "engine W1": best_us(engine_http(W1), 1000),
        "engine W3": best_us(engine_http(W3), 2000),
        # per token: a turn of 50 tokens plus its other frames, divided by 50
        "engine /chat token (JSON)": best_us(engine_chat(False), 10_000),
        "engine /chat token (MessagePack)": best_us(engine_chat(True), 10_000),
    }


def main() -> int:
    results = measure()
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        for name, micros in results.items():
            print(f"{name:34} {micros:8.1f} us   {1e6 / micros:10,.0f} /CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
