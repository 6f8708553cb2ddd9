"""wirechat's engine served over plain blocking sockets: no asyncio, no wirechat transport.

This shows that ``wirechat.engine.ServerConnection`` is truly I/O-free: any I/O layer can
drive it. One connection at a time, one thread, a synchronous stand-in for a model. Run it
and point any OpenAI client at the printed URL (``/v1`` appended)::

    python examples/blocking_server.py --port 8765
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time

from wirechat.engine import (
    CallProvider,
    CancelProvider,
    CloseTransport,
    EngineConfig,
    Finish,
    ListModels,
    ModelInfo,
    ServerConnection,
    TextDelta,
    Usage,
)


def reply_words(text: str) -> list[str]:
    """A model in three lines: it echoes the text, one word per delta."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def serve_connection(sock: socket.socket, config: EngineConfig) -> None:
    conn = ServerConnection(config, time.time())
    sock.settimeout(0.5)  # wake up now and then for the engine's timers
    while not conn.closed:
        for effect in conn.effects():
            if isinstance(effect, CallProvider):
                last = effect.request.messages[-1].text
                for piece in reply_words(last):
                    conn.provider_chunk(effect.stream_id, TextDelta(text=piece), time.time())
                    sock.sendall(conn.data_to_send())
                words = len(last.split())
                usage = Usage(prompt_tokens=words, completion_tokens=words)
                conn.provider_chunk(effect.stream_id, Finish(usage=usage), time.time())
                conn.provider_done(effect.stream_id, time.time())
            elif isinstance(effect, ListModels):
                models = [ModelInfo(id="echo", owned_by="blocking-example")]
                conn.models_listed(effect.stream_id, models, time.time())
            elif isinstance(effect, CloseTransport | CancelProvider):
                pass  # the loop ends when the engine says it is closed
        sock.sendall(conn.data_to_send())
        if conn.closed:
            break
        deadline = conn.next_deadline()
        if deadline is not None and time.time() >= deadline:
            conn.handle_timer(time.time())
            continue
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if data:
            conn.receive_data(data, time.time())
        else:
            conn.receive_eof(time.time())
    sock.sendall(conn.data_to_send())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--requests", type=int, default=0, help="stop after N connections")
    args = parser.parse_args()
    config = EngineConfig()
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        print(
            f"blocking wirechat engine on http://127.0.0.1:{listener.getsockname()[1]}", flush=True
        )
        served = 0
        while not args.requests or served < args.requests:
            client, _ = listener.accept()
            with client, contextlib.suppress(OSError):  # OSError: the client went away
                serve_connection(client, config)
            served += 1


if __name__ == "__main__":
    main()
