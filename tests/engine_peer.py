"""A test peer for the sans-IO engine: a ``ServerConnection`` driven like the transport drives
it, with an independent ``h11`` client connection as the oracle that parses what it sends.

* Requests are encoded by a throwaway ``h11.Connection(h11.CLIENT)`` (or given as raw bytes)
  and fed to the server whole, one byte at a time, or cut at given split points.
* After every input the peer pulls ``data_to_send()`` and ``effects()``, exactly as the
  transport does; the bytes go into the oracle client, which turns them into
  :class:`Reply` tuples ``(response, body)``. A malformed response makes the oracle raise.
* The test plays the provider: ``CallProvider`` effects come out, and the test answers with
  :meth:`EnginePeer.chunk` / :meth:`done` / :meth:`failed` (the allowed test double).
* Time is a plain float (``peer.now``), passed to every input.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import h11
from wirechat.engine import (
    CallProvider,
    CancelProvider,
    CloseTransport,
    EngineConfig,
    ListModels,
    ModelInfo,
    Output,
    Phase,
    ProviderError,
    ProviderItem,
    RequestCompleted,
    ServerConnection,
)
from wirechat.engine.limits import Admission

Splitter = Callable[[bytes], list[bytes]]
HeaderList = Sequence[tuple[str, str | bytes]]
T = TypeVar("T")

HOST = "wirechat.test"
RANDOM_IDS = re.compile(rb"(chatcmpl-|req_)[0-9a-f]{30}")


# --- splitting ---------------------------------------------------------------------------


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(points: Iterable[int]) -> Splitter:
    """A splitter cutting its input at ``points`` (offsets, clamped, duplicates ignored)."""
    wanted = sorted(set(points))

    def split(data: bytes) -> list[bytes]:
        cuts = [0, *(p for p in wanted if 0 < p < len(data)), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]

    return split


# --- building requests ---------------------------------------------------------------------


def encode_request(
    method: str,
    target: str,
    headers: HeaderList = (),
    body: bytes | Sequence[bytes] = b"",
    *,
    chunked: bool = False,
    host: str | None = HOST,
) -> bytes:
    """The bytes an h11 client writes for this request (``chunked``: one chunk per piece)."""
    pieces = [body] if isinstance(body, bytes) else list(body)
    size = sum(len(p) for p in pieces)
    all_headers: list[tuple[bytes, bytes]] = []
    if host is not None:
        all_headers.append((b"Host", host.encode("ascii")))
    all_headers += [(_as_bytes(k), _as_bytes(v)) for k, v in headers]
    names = {name.lower() for name, _ in all_headers}
    if chunked:
        if b"transfer-encoding" not in names:
            all_headers.append((b"Transfer-Encoding", b"chunked"))
    elif size and b"content-length" not in names:
        all_headers.append((b"Content-Length", str(size).encode("ascii")))
    client = h11.Connection(h11.CLIENT)
    out = client.send(h11.Request(method=method, target=target, headers=all_headers))
    for piece in pieces:
        if piece:
            out += client.send(h11.Data(data=piece)) or b""
    out += client.send(h11.EndOfMessage()) or b""
    return out or b""


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def chat_body(**fields: Any) -> bytes:
    """A chat completion request body (``model`` echo, one user message, unless given)."""
    body: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return json.dumps(body).encode()


# --- parsing responses ---------------------------------------------------------------------


class Reply(NamedTuple):
    """One complete response as the h11 client oracle parsed it."""

    response: h11.Response
    body: bytes

    @property
    def status(self) -> int:
        return self.response.status_code

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower().encode("ascii")
        return [v.decode("latin-1") for k, v in self.response.headers if k == wanted]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (asserting it appears at most once)."""
        values = self.header_values(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def events(self) -> list[Any]:
        return sse_events(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object of an error reply (checking the envelope's shape)."""
        return check_error_envelope(self.json)


def check_error_envelope(payload: Any) -> dict[str, Any]:
    assert isinstance(payload, dict), payload
    assert set(payload) == {"error", "detail"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert payload["detail"] == error["message"]
    return dict(error)


def sse_payloads(body: bytes) -> list[str]:
    """The ``data`` of every event of an SSE body, checking the exact framing we promise:
    every event is one ``data: <text>`` line ended by a blank line, LF only, nothing else."""
    assert b"\r" not in body, "SSE body contains CR"
    if not body:
        return []
    assert body.endswith(b"\n\n"), body[-50:]
    payloads = []
    for raw in body[:-2].split(b"\n\n"):
        assert b"\n" not in raw, f"multi-line event: {raw[:80]!r}"
        assert raw.startswith(b"data: "), f"not a data line: {raw[:80]!r}"
        payloads.append(raw[len(b"data: ") :].decode("ascii"))
    return payloads


def sse_events(body: bytes) -> list[Any]:
    """Every event of an SSE body, JSON-decoded (``"[DONE]"`` stays a string)."""
    return [p if p == "[DONE]" else json.loads(p) for p in sse_payloads(body)]


def stream_chunks(body: bytes) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a stream that ends with exactly one [DONE]."""
    events = sse_events(body)
    assert events and events[-1] == "[DONE]", events[-3:]
    assert events.count("[DONE]") == 1
    chunks = events[:-1]
    assert all(isinstance(c, dict) for c in chunks)
    return chunks


def normalized(data: bytes) -> bytes:
    """``data`` with the random completion and request ids replaced by a fixed text."""
    return RANDOM_IDS.sub(lambda m: m.group(1) + b"x" * 30, data)


# --- the peer --------------------------------------------------------------------------------


class EnginePeer:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        now: float = 1_700_000_000.0,
        split: Splitter = whole,
        admission: Admission | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.now = now
        self.split = split
        self.admission = admission or Admission(self.config.max_inflight_generations)
        self.server = ServerConnection(self.config, now, admission=self.admission)
        self.client = h11.Connection(h11.CLIENT)
        self.wire = bytearray()  # every byte the server wrote, in order
        self.effects: list[Output] = []  # every effect and notice, in order
        self.replies: list[Reply] = []  # complete responses, in order
        self.informational: list[h11.InformationalResponse] = []
        self.closed_without_response = False
        self.client_gone = False  # receive_eof was called: the oracle reads nothing more
        self._fresh: list[Output] = []
        self._expect: list[h11.Request] = []  # requests the oracle still has to "send"
        self._current: h11.Response | None = None
        self._body = bytearray()
        self._eof_sent = False

    # --- sending ---------------------------------------------------------------------------

    def feed(self, data: bytes, *, split: Splitter | None = None, now: float | None = None) -> None:
        """Feed raw bytes to the server, piece by piece, pulling its output after each."""
        if now is not None:
            self.now = now
        for piece in (split or self.split)(data):
            self.server.receive_data(piece, self.now)
            self._pump()

    def expect(self, method: str = "GET", target: str = "/", *, close: bool = False) -> None:
        """Tell the oracle a response to such a request is due (for raw requests)."""
        headers = [("Host", HOST)]
        if close:
            headers.append(("Connection", "close"))
        self._expect.append(h11.Request(method=method, target=target, headers=headers))
        self._drain()

    def send_raw(
        self,
        data: bytes,
        *,
        method: str = "GET",
        target: str = "/",
        close: bool = False,
        split: Splitter | None = None,
    ) -> None:
        self.expect(method, target, close=close)
        self.feed(data, split=split)

    def request(
        self,
        method: str,
        target: str,
        headers: HeaderList = (),
        body: bytes | Sequence[bytes] = b"",
        *,
        chunked: bool = False,
        split: Splitter | None = None,
    ) -> None:
        data = encode_request(method, target, headers, body, chunked=chunked)
        close = any(
            k.lower() == "connection" and b"close" in _as_bytes(v).lower() for k, v in headers
        )
        self.send_raw(data, method=method, target=target, close=close, split=split)

    def get(self, target: str, headers: HeaderList = ()) -> Reply:
        """A GET that completes without a provider (health, errors): its reply."""
        self.request("GET", target, headers)
        return self.last_reply()

    def post_chat(
        self,
        body: bytes,
        headers: HeaderList = (),
        *,
        target: str = "/v1/chat/completions",
        split: Splitter | None = None,
    ) -> CallProvider | None:
        """POST a chat request; return the ``CallProvider`` it caused, if any."""
        before = len(self.of_type(CallProvider))
        hdrs = [("Content-Type", "application/json"), *headers]
        self.request("POST", target, hdrs, body, split=split)
        calls = self.of_type(CallProvider)
        return calls[-1] if len(calls) > before else None

    def chat(self, headers: HeaderList = (), **fields: Any) -> CallProvider:
        call = self.post_chat(chat_body(**fields), headers)
        assert call is not None, self.replies[-1:] or self.effects
        return call

    # --- other inputs ------------------------------------------------------------------------

    def _at(self, now: float | None) -> float:
        if now is not None:
            self.now = now
        return self.now

    def chunk(self, stream_id: int, item: ProviderItem, now: float | None = None) -> None:
        self.server.provider_chunk(stream_id, item, self._at(now))
        self._pump()

    def done(self, stream_id: int, now: float | None = None) -> None:
        self.server.provider_done(stream_id, self._at(now))
        self._pump()

    def answer(self, stream_id: int, *items: ProviderItem, now: float | None = None) -> None:
        """Play a whole provider stream: every item, then its end."""
        for item in items:
            self.chunk(stream_id, item, now)
        self.done(stream_id, now)

    def failed(self, stream_id: int, error: ProviderError, now: float | None = None) -> None:
        self.server.provider_failed(stream_id, error, self._at(now))
        self._pump()

    def models(self, stream_id: int, models: Sequence[ModelInfo], now: float | None = None) -> None:
        self.server.models_listed(stream_id, models, self._at(now))
        self._pump()

    def eof(self, now: float | None = None) -> None:
        """The client closes its side; it reads nothing more after that."""
        self.client_gone = True
        self.server.receive_eof(self._at(now))
        self._pump()

    def timer(self, now: float) -> None:
        self.server.handle_timer(self._at(now))
        self._pump()

    def shutdown(self, now: float | None = None) -> None:
        self.server.start_shutdown(self._at(now))
        self._pump()

    # --- outputs -----------------------------------------------------------------------------

    def take_effects(self) -> list[Output]:
        """Effects and notices since the last call."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.effects if isinstance(e, kind)]

    @property
    def calls(self) -> list[CallProvider]:
        return self.of_type(CallProvider)

    @property
    def cancels(self) -> list[int]:
        return [e.stream_id for e in self.of_type(CancelProvider)]

    @property
    def listings(self) -> list[ListModels]:
        return self.of_type(ListModels)

    @property
    def completed(self) -> list[RequestCompleted]:
        return self.of_type(RequestCompleted)

    # Methods rather than properties, so that type checkers do not narrow them across inputs.
    def transport_closed(self) -> bool:
        """Whether the server has asked for the socket to be closed."""
        return any(isinstance(e, CloseTransport) for e in self.effects)

    def phase(self) -> Phase:
        return self.server.phase

    def reading_paused(self) -> bool:
        return self.server.reading_paused

    def server_closed(self) -> bool:
        return self.server.closed

    def last_reply(self) -> Reply:
        assert self.replies, f"no complete reply; wire={bytes(self.wire)[:300]!r}"
        return self.replies[-1]

    @property
    def current_response(self) -> h11.Response | None:
        """The head of the response being received (``None`` between responses)."""
        return self._current

    @property
    def partial_body(self) -> bytes:
        """The body bytes of the response being received, so far."""
        return bytes(self._body)

    # --- the oracle -------------------------------------------------------------------------

    def _pump(self) -> None:
        data = self.server.data_to_send()
        effects = self.server.effects()
        self.effects += effects
        self._fresh += effects
        if data:
            assert not self._eof_sent, "server wrote after asking for the transport to close"
            self.wire += data
            if not self.client_gone:
                self.client.receive_data(data)
                self._drain()
        closing = [e for e in effects if isinstance(e, CloseTransport)]
        if closing and not self._eof_sent:
            self._eof_sent = True
            if not self.client_gone and not any(e.abort for e in closing):
                self.client.receive_data(b"")
                self._drain()

    def _drain(self) -> None:
        client = self.client
        while True:
            if client.our_state is h11.IDLE and client.their_state is h11.IDLE and self._expect:
                request = self._expect.pop(0)
                client.send(request)
                client.send(h11.EndOfMessage())
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                if self._eof_sent and self._current is None and not self._partial_head():
                    # The server closed without answering the request in flight.
                    self.closed_without_response = True
                    return
                raise
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                self.informational.append(event)
            elif isinstance(event, h11.Response):
                self._current = event
                self._body = bytearray()
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self._current is not None
                self.replies.append(Reply(self._current, bytes(self._body)))
                self._current = None
                self._body = bytearray()
                if client.our_state is h11.DONE and client.their_state is h11.DONE:
                    client.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _partial_head(self) -> bool:
        # Bytes of a response head the oracle could not complete before EOF.
        return bool(self.client.trailing_data[0])
