"""A tiny OpenAI-compatible upstream that misbehaves on purpose (127.0.0.1 only).

Point a wirechat gateway at it with ``OPENAI_BASE_URL=<base_url>`` and ask for model
``openai/<behaviour>``; the gateway strips the prefix, so the upstream sees ``<behaviour>``:

=============  ================================================================================
``ok``         streams ``a b c`` (one word per event), ``finish_reason: stop``, then ``[DONE]``
``hang-head``  reads the request and never answers, not even the status line
``hang-first`` sends the 200 head of an SSE stream, then nothing
``hang-mid``   sends one content event, then nothing
``drop-mid``   sends one content event, then closes the TCP connection (no terminating chunk)
``reset-mid``  sends one content event, then resets the connection (RST)
``flood``      streams 16 KiB content events without end, as fast as the gateway takes them
=============  ================================================================================

A hanging answer waits until the *gateway* closes the connection and records when it did
(:meth:`FaultyUpstream.wait_closed`): that is how a test sees the upstream request cancelled.

The server runs its own event loop in a daemon thread, so synchronous tests can use it::

    with FaultyUpstream() as upstream:
        ...  # upstream.base_url, upstream.wait_closed("hang-mid", timeout=2)

``python tests/faulty_upstream.py`` serves until interrupted (prints its base URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

BEHAVIOURS = ("ok", "hang-head", "hang-first", "hang-mid", "drop-mid", "reset-mid", "flood")
FLOOD_WORD = "x" * (16 * 1024 - 1) + " "
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
START_TIMEOUT = 5.0


@dataclass
class _State:
    """What the upstream saw, shared between its loop thread and the test thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter[str] = field(default_factory=Counter)
    closed_by_peer: Counter[str] = field(default_factory=Counter)
    closed_at: dict[str, list[float]] = field(default_factory=dict)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


class FaultyUpstream:
    """The misbehaving upstream; see the module docstring."""

    def __init__(self, *, words: tuple[str, ...] = ("a ", "b ", "c")) -> None:
        self.words = words
        self.state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    # --- lifecycle (called from the test thread) ------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultyUpstream:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._main(ready))
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="faulty-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or failure:
            raise RuntimeError(f"the faulty upstream did not start: {failure!r}")
        return self

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)

    def __enter__(self) -> FaultyUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what it saw (test thread) --------------------------------------------------------

    def requests(self, behaviour: str) -> int:
        with self.state.lock:
            return self.state.requests[behaviour]

    def closed(self, behaviour: str) -> int:
        with self.state.lock:
            return self.state.closed_by_peer[behaviour]

    def wait_closed(self, behaviour: str, *, count: int = 1, timeout: float = 2.0) -> float | None:
        """Wait until the peer has closed ``count`` connections that were answering
        ``behaviour``; the monotonic time of the last such close, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self.state.changed:
            while self.state.closed_by_peer[behaviour] < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.state.changed.wait(remaining)
            return self.state.closed_at[behaviour][count - 1]

    # --- the server (its own loop) --------------------------------------------------------

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, body = request
                if not await self._answer(method, path, body, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(
        self,
        method: str,
        path: str,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False when the connection must end."""
        if method == "GET" and path.endswith("/models"):
            models = [{"id": b, "object": "model", "created": 0, "owned_by": "faulty"}
                      for b in BEHAVIOURS]  # fmt: skip
            _write_json(writer, 200, {"object": "list", "data": models})
            await writer.drain()
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            _write_json(writer, 404, {"error": {"message": "not found", "type": "not_found"}})
            await writer.drain()
            return True
        try:
            model = str(json.loads(body).get("model", ""))
        except (ValueError, AttributeError):
            model = ""
        behaviour = model if model in BEHAVIOURS else "ok"
        with self.state.lock:
            self.state.requests[behaviour] += 1
        if behaviour == "hang-head":
            await self._hang(behaviour, reader)
            return False
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        if behaviour == "hang-first":
            await self._hang(behaviour, reader)
            return False
        if behaviour == "flood":
            await self._flood(model, writer)
            return False
        words = self.words if behaviour == "ok" else self.words[:1]
        for word in words:
            _write_event(writer, _chunk(model, {"content": word}, None))
            await writer.drain()
        if behaviour == "hang-mid":
            await self._hang(behaviour, reader)
            return False
        if behaviour == "drop-mid":
            await asyncio.sleep(0.05)  # the event leaves before the FIN
            writer.close()
            return False
        if behaviour == "reset-mid":
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        _write_event(writer, _chunk(model, {}, "stop"))
        _write_event(writer, b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _flood(self, model: str, writer: asyncio.StreamWriter) -> None:
        """Content events until the peer goes away (then recorded like a hang's end)."""
        event = _chunk(model, {"content": FLOOD_WORD}, None)
        try:
            while True:
                _write_event(writer, event)
                await writer.drain()
        except ConnectionError:
            pass
        self._record_close("flood")

    def _record_close(self, behaviour: str) -> None:
        with self.state.changed:
            self.state.closed_by_peer[behaviour] += 1
            self.state.closed_at.setdefault(behaviour, []).append(time.monotonic())
            self.state.changed.notify_all()

    async def _hang(self, behaviour: str, reader: asyncio.StreamReader) -> None:
        """Say nothing more until the peer closes the connection; record when it did."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self._record_close(behaviour)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    """One request (method, path, body); None at a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    except asyncio.LimitOverrunError as exc:
        raise ValueError("request head too large") from exc
    if len(head) > MAX_HEAD:
        raise ValueError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            raise ValueError("chunked request bodies are not supported here")
    if length > MAX_BODY:
        raise ValueError("request body too large")
    body = await reader.readexactly(length) if length else b""
    return method, path, body


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    payload = {
        "id": "chatcmpl-faulty",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _write_event(writer: asyncio.StreamWriter, data: bytes) -> None:
    event = b"data: " + data + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(event), event))


def _write_json(writer: asyncio.StreamWriter, status: int, value: object) -> None:
    body = json.dumps(value).encode()
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


if __name__ == "__main__":
    with FaultyUpstream() as upstream:
        print(f"faulty upstream on {upstream.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
