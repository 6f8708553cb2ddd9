"""A test peer for the engine's ``/chat`` WebSocket: a ``ServerConnection`` driven the way the
transport drives it, with an independent ``wsproto`` client as the oracle.

* The handshake request is written by ``wsproto.WSConnection(ConnectionType.CLIENT)``, which
  also checks the 101 (``Sec-WebSocket-Accept`` included) and then parses every frame the
  server writes: a malformed server frame makes the oracle fail the test.
* Frames out of the oracle are decoded independently of the engine's codec: text with
  ``json.loads``, binary with ``msgpack.unpackb``; each becomes a :class:`Got`.
* Frames in are built by the oracle (``send_json``, ``send_msgpack``, ``ping`` ...) or by hand
  with :func:`frame` for the violations no client library will write.
* The test plays the store, the tools and the providers by answering the effects the engine
  asks for (``opened``, ``saved``, ``tool_done``, ``chunk``, ``done`` ...): the allowed double.
* Time is a plain float (``peer.now``), passed to every input.
* Requests that must not upgrade are sent raw and read back with an ``h11`` client
  (:func:`http_exchange`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import h11
import msgpack  # type: ignore[import-untyped]
from wirechat.engine import (
    ChatMessage,
    CloseTransport,
    EngineConfig,
    Output,
    ProviderError,
    ProviderItem,
    ServerConnection,
)
from wirechat.engine.limits import Admission
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

T = TypeVar("T")
Splitter = Callable[[bytes], list[bytes]]

T0 = 1_700_000_000.0
HOST = "wirechat.test"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# --- splitting ---------------------------------------------------------------------------


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


def pieces_of(size: int) -> Splitter:
    def split(data: bytes) -> list[bytes]:
        return [data[i : i + size] for i in range(0, len(data), size)]

    return split


# --- hand-built frames --------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    mask: bytes = b"\x5a\x13\xc4\x7e",
    length_form: int | None = None,
) -> bytes:
    """One RFC 6455 frame as a client writes it (``rsv``: the three RSV bits, 0-7;
    ``length_form``: force the 7-bit, 16-bit (126) or 64-bit (127) length encoding)."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0xF
    size = len(payload)
    form = (
        length_form
        if length_form is not None
        else (0 if size < 126 else 126 if size < 65536 else 127)
    )
    mask_bit = 0x80 if masked else 0
    if form == 0:
        head = bytes([first, mask_bit | size])
    elif form == 126:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def accept_for(key: bytes) -> bytes:
    """RFC 6455 §4.2.2: base64(SHA-1(key + GUID)), computed here, not by the engine."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def upgrade_request(
    target: str = "/chat",
    headers: Sequence[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    key: str = "dGhlIHNhbXBsZSBub25jZQ==",
) -> bytes:
    """A raw handshake request (``headers`` replaces the default upgrade headers)."""
    if headers is None:
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ]
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpReply(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    effects: list[Output]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        assert len(values) <= 1, values
        return values[0] if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def http_exchange(config: EngineConfig, raw: bytes, *, now: float = T0) -> HttpReply:
    """Feed one raw request to a fresh engine; read the response with an h11 client."""
    server = ServerConnection(config, now)
    server.receive_data(raw, now)
    data = server.data_to_send()
    effects = server.effects()
    client = h11.Connection(h11.CLIENT)
    method = raw.split(b" ", 1)[0]
    client.send(h11.Request(method=method, target="/chat", headers=[("Host", HOST)]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"incomplete response: {data!r}")
    assert response is not None
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
    return HttpReply(response.status_code, headers, bytes(body), effects)


# --- what the oracle received ----------------------------------------------------------------


class Got(NamedTuple):
    """One complete server message: how it was encoded and what it decoded to."""

    encoding: str  # "json" (text frame) or "msgpack" (binary frame)
    frame: dict[str, Any]

    @property
    def type(self) -> Any:
        return self.frame.get("type")


def _decode(message: str | bytes) -> Got:
    if isinstance(message, str):
        value = json.loads(message)
        encoding = "json"
    else:
        value = msgpack.unpackb(message, raw=False)
        encoding = "msgpack"
    assert isinstance(value, dict), f"a server frame must be an object: {value!r}"
    return Got(encoding, value)


# --- the peer --------------------------------------------------------------------------------


class WsPeer:
    """A ``ServerConnection`` plus a wsproto client oracle reading everything it writes."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        now: float = T0,
        admission: Admission | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.now = now
        self.admission = admission or Admission(self.config.max_inflight_generations)
        self.server = ServerConnection(self.config, now, admission=self.admission)
        self.client = WSConnection(ConnectionType.CLIENT)
        self.wire = bytearray()  # every byte the server wrote
        self.effects: list[Output] = []  # every effect and notice, in order
        self.got: list[Got] = []  # every complete server message, decoded
        self.events: list[Event] = []  # every oracle event, in order (messages reassembled)
        self.accepted: AcceptConnection | None = None
        self.rejected: RejectConnection | None = None
        self.reject_body = bytearray()
        self.server_close: CloseConnection | None = None  # the server's Close frame
        self.pings: list[bytes] = []  # payloads of the server's protocol pings
        self.pongs: list[bytes] = []  # payloads of the server's pongs
        self.sent_request = b""
        self._fresh_effects: list[Output] = []
        self._fresh_got: list[Got] = []
        self._partial: list[str | bytes] = []
        self._transport_closed = False

    # --- connecting --------------------------------------------------------------------------

    def connect(
        self,
        target: str = "/chat",
        headers: Sequence[tuple[str, str]] = (),
        *,
        extra: bytes = b"",
        extensions: Sequence[Any] = (),
    ) -> WsPeer:
        """Send the oracle's handshake (plus ``extra`` bytes in the same packet)."""
        request = self.client.send(
            Request(
                host=HOST,
                target=target,
                extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                extensions=list(extensions),
            )
        )
        self.sent_request = request
        self.feed(request + extra)
        return self

    def open(self, target: str = "/chat", headers: Sequence[tuple[str, str]] = ()) -> WsPeer:
        """Connect and assert the upgrade succeeded."""
        self.connect(target, headers)
        assert self.accepted is not None, (self.rejected, bytes(self.wire[:300]))
        return self

    # --- sending -------------------------------------------------------------------------------

    def feed(self, data: bytes, *, split: Splitter = whole, now: float | None = None) -> None:
        """Raw bytes to the server, piece by piece, pulling its output after each."""
        at = self._at(now)
        for piece in split(data):
            self.server.receive_data(piece, at)
            self._pump()

    def send(self, event: Event, *, split: Splitter = whole) -> None:
        self.feed(self.client.send(event), split=split)

    def send_text(self, text: str, *, split: Splitter = whole) -> None:
        self.send(TextMessage(data=text), split=split)

    def send_bytes(self, data: bytes, *, split: Splitter = whole) -> None:
        self.send(BytesMessage(data=data), split=split)

    def send_json(self, payload: Any) -> None:
        self.send_text(json.dumps(payload))

    def send_msgpack(self, payload: Any) -> None:
        self.send_bytes(msgpack.packb(payload, use_bin_type=True))

    def ping(self, payload: bytes = b"") -> None:
        self.send(Ping(payload=payload))

    def pong(self, payload: bytes = b"") -> None:
        self.send(Pong(payload=payload))

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.send(CloseConnection(code=code, reason=reason))

    def answer_close(self) -> None:
        """Answer the server's Close, as a well-behaved client does."""
        assert self.server_close is not None
        self.send(self.server_close.response())

    # --- other inputs -------------------------------------------------------------------------

    def _at(self, now: float | None) -> float:
        if now is not None:
            self.now = now
        return self.now

    def opened(self, op_id: int, history: Sequence[ChatMessage], now: float | None = None) -> None:
        self.server.thread_opened(op_id, history, self._at(now))
        self._pump()

    def saved(self, op_id: int, now: float | None = None) -> None:
        self.server.messages_saved(op_id, self._at(now))
        self._pump()

    def store_failed(self, op_id: int, message: str, now: float | None = None) -> None:
        self.server.store_failed(op_id, message, self._at(now))
        self._pump()

    def tool_done(
        self,
        op_id: int,
        ok: bool,
        result: object = None,
        error: str | None = None,
        now: float | None = None,
    ) -> None:
        self.server.tool_finished(op_id, ok, result, error, self._at(now))
        self._pump()

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

    def timer(self, now: float) -> None:
        self.server.handle_timer(self._at(now))
        self._pump()

    def eof(self, now: float | None = None) -> None:
        self.server.receive_eof(self._at(now))
        self._pump()

    def shutdown(self, now: float | None = None) -> None:
        self.server.start_shutdown(self._at(now))
        self._pump()

    # --- outputs -------------------------------------------------------------------------------

    def take_effects(self) -> list[Output]:
        """Effects and notices since the last call."""
        fresh, self._fresh_effects = self._fresh_effects, []
        return fresh

    def take(self) -> list[Got]:
        """Server messages since the last call."""
        fresh, self._fresh_got = self._fresh_got, []
        return fresh

    def take_frames(self) -> list[dict[str, Any]]:
        return [g.frame for g in self.take()]

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.effects if isinstance(e, kind)]

    def last(self, kind: type[T]) -> T:
        found = self.of_type(kind)
        assert found, f"no {kind.__name__} in {self.effects}"
        return found[-1]

    def transport_closed(self) -> bool:
        return self._transport_closed

    def close_code(self) -> int | None:
        return None if self.server_close is None else int(self.server_close.code)

    def deadline(self) -> float | None:
        return self.server.next_deadline()

    # --- the oracle ----------------------------------------------------------------------------

    def _pump(self) -> None:
        data = self.server.data_to_send()
        effects = self.server.effects()
        self.effects += effects
        self._fresh_effects += effects
        if data:
            assert not self._transport_closed, "server wrote after asking for CloseTransport"
            self.wire += data
            if self.sent_request:  # the oracle only reads what answers its own handshake
                self.client.receive_data(data)
                self._drain()
        if any(isinstance(e, CloseTransport) for e in effects):
            assert not self._transport_closed, "CloseTransport twice"
            self._transport_closed = True

    def _drain(self) -> None:
        for event in self.client.events():
            if isinstance(event, AcceptConnection):
                self.accepted = event
            elif isinstance(event, RejectConnection):
                self.rejected = event
            elif isinstance(event, RejectData):
                self.reject_body += event.data
            elif isinstance(event, Message):
                assert self.server_close is None, "server sent a message after its Close"
                self._on_message(event)
                continue
            elif isinstance(event, Ping):
                assert self.server_close is None, "server sent a ping after its Close"
                self.pings.append(bytes(event.payload))
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                # A genuine Close moves the oracle out of OPEN; a malformed server frame is
                # reported by wsproto as a CloseConnection with the state left OPEN.
                assert self.client.state in (
                    ConnectionState.REMOTE_CLOSING,
                    ConnectionState.CLOSED,
                ), f"server sent an invalid frame: {event}"
                assert self.server_close is None, "two Close frames"
                self.server_close = event
            self.events.append(event)

    def _on_message(self, event: Message[Any]) -> None:
        data = event.data if isinstance(event, TextMessage) else bytes(event.data)
        self._partial.append(data)
        if not event.message_finished:
            return
        parts, self._partial = self._partial, []
        message: str | bytes
        if isinstance(data, str):
            message = "".join(p for p in parts if isinstance(p, str))
        else:
            message = b"".join(p for p in parts if isinstance(p, bytes))
        got = _decode(message)
        self.got.append(got)
        self._fresh_got.append(got)
        self.events.append(
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )


# --- small helpers for chat tests ------------------------------------------------------------


def only(items: Iterable[T]) -> T:
    found = list(items)
    assert len(found) == 1, found
    return found[0]
