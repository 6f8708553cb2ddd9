"""One WebSocket after the upgrade: wsproto plus the limits and timers wsproto lacks.

Rules of this module:

* Owns a wsproto ``Connection`` seeded with the bytes that followed the handshake. It
  answers pings, completes the close handshake and reassembles fragmented messages under
  ``max_ws_message_bytes`` (wsproto has no limit: past it we close with 1009). Protocol
  violations close with the code wsproto found (1002, 1007).
* It hands complete application messages (``str`` for text, ``bytes`` for binary) to its
  caller and never interprets them.
* Keep-alive: a protocol ping after ``ws_ping_interval`` seconds without one, and a close
  with 1011 when its pong does not come within ``ws_ping_timeout``. After we send a Close,
  the peer has ``ws_close_timeout`` seconds to answer before the socket is dropped.
* No permessage-deflate is negotiated: wsproto inflates without bound (reliability §2.6).
"""

from __future__ import annotations

import struct

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)

from .config import EngineConfig
from .state import earliest

_MAX_FRAGMENTS = 4096  # many empty fragments cost memory without counting as bytes
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_FIN = 0x80


def _frame_header(opcode: int, length: int) -> bytes:
    """RFC 6455 §5.2 for a final, unmasked frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((_FIN | opcode, length))
    if length < 1 << 16:
        return struct.pack("!BBH", _FIN | opcode, 126, length)
    return struct.pack("!BBQ", _FIN | opcode, 127, length)


class WebSocketSession:
    def __init__(self, config: EngineConfig, now: float) -> None:
        self.config = config
        self._ws = Connection(ConnectionType.SERVER)
        self._out = bytearray()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._frames = 0  # frames of the message being reassembled
        self._ping_at: float | None = now + config.ws_ping_interval
        self._pong_by: float | None = None
        self._close_by: float | None = None
        self.transport_done = False  # the socket should now be closed
        self.close_code = 1006  # the first close code sent or received (1006: none yet)

    # --- outputs ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN and not self.transport_done

    def next_deadline(self) -> float | None:
        if self.transport_done:
            return None
        return earliest(earliest(self._ping_at, self._pong_by), self._close_by)

    # --- inputs ----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[str | bytes]:
        """Feed bytes; return the complete messages they finished, in order."""
        if self.transport_done or not data:
            return []
        self._ws.receive_data(data)
        messages: list[str | bytes] = []
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if self._close_by is not None:
                    continue  # after our Close, messages are read but no longer delivered
                done = self._collect(event)
                if done is not None:
                    messages.append(done)
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:
                    self._out += self._ws.send(event.response())
            elif isinstance(event, Pong):
                self._pong_by = None
                self._ping_at = now + self.config.ws_ping_interval
            elif isinstance(event, CloseConnection):
                self._on_close(event)
            if self._finished():
                break
        return messages

    def _finished(self) -> bool:
        # A method, not the attribute: handlers above change it behind mypy's narrowing.
        return self.transport_done

    def receive_eof(self) -> None:
        self.transport_done = True

    def _note_close(self, code: int | None) -> None:
        if self.close_code == 1006 and code is not None:
            self.close_code = code

    def send_message(self, payload: str | bytes) -> None:
        """Queue one application message (no-op once closing, or once the socket is gone).

        Framed here, not by wsproto: a server's data frame is a 2-10 byte header and the
        payload (unmasked, one frame, no extension), and wsproto's per-frame state machine
        was a third of the cost of a streamed token. wsproto keeps everything with state:
        reading, control frames and the closing handshake (a test checks the bytes are
        wsproto's own).
        """
        if self._ws.state is ConnectionState.OPEN and not self.transport_done:
            if isinstance(payload, str):
                data = payload.encode("utf-8")
                self._out += _frame_header(_OP_TEXT, len(data))
            else:
                data = payload
                self._out += _frame_header(_OP_BINARY, len(data))
            self._out += data

    def close(self, code: int, reason: str, now: float) -> None:
        """Start the closing handshake (the peer gets ``ws_close_timeout`` to answer)."""
        if self._ws.state is ConnectionState.OPEN:
            self._note_close(code)
            self._out += self._ws.send(CloseConnection(code=code, reason=reason))
            self._close_by = now + self.config.ws_close_timeout
            self._ping_at = self._pong_by = None
        elif self._ws.state is not ConnectionState.LOCAL_CLOSING:
            self.transport_done = True

    def handle_timer(self, now: float) -> None:
        if self.transport_done:
            return
        if self._close_by is not None and now >= self._close_by:
            self.transport_done = True
        elif self._pong_by is not None and now >= self._pong_by:
            self.close(1011, "keepalive ping timeout", now)
        elif self._ping_at is not None and now >= self._ping_at:
            self._out += self._ws.send(Ping(payload=b"wirechat"))
            self._pong_by = now + self.config.ws_ping_timeout
            self._ping_at = None

    # --- internals -------------------------------------------------------------------

    def _collect(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        data: str | bytes = event.data if isinstance(event.data, str) else bytes(event.data)
        size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
        self._size += size
        # wsproto yields a frame's payload in as many pieces as it arrived in reads: count
        # whole frames, so a legal message read in many small pieces is not refused.
        self._frames += event.frame_finished
        if self._size > self.config.max_ws_message_bytes or self._frames > _MAX_FRAGMENTS:
            self._reset()
            self._fail(1009, "message too big")
            return None
        if not event.message_finished:
            self._parts.append(data)
            return None
        if not self._parts:
            self._reset()
            return data
        parts = [*self._parts, data]
        self._reset()
        if isinstance(data, str):
            return "".join(p for p in parts if isinstance(p, str))
        return b"".join(p for p in parts if isinstance(p, bytes))

    def _reset(self) -> None:
        self._parts = []
        self._size = 0
        self._frames = 0

    def _on_close(self, event: CloseConnection) -> None:
        self._note_close(event.code)
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            # The peer closed: answer with the same code and let the socket go.
            self._out += self._ws.send(event.response())
            self.transport_done = True
        elif self._ws.state is ConnectionState.CLOSED:
            self.transport_done = True  # the answer to our own Close
        else:
            # wsproto reports a protocol violation as a close it did not send yet.
            self._fail(event.code, event.reason or "protocol error")

    def _fail(self, code: int, reason: str) -> None:
        """Close at once for a violation: the peer is not owed a handshake."""
        self._note_close(code)
        if self._ws.state is ConnectionState.OPEN:
            self._out += self._ws.send(CloseConnection(code=code, reason=reason))
        self.transport_done = True
