"""A NodeTool WebSocket endpoint after the upgrade: framing + codec + an app session.

Rules of this module: glue only. Messages from ``WebSocketSession`` are decoded by
``codec`` (text → JSON, binary → MessagePack) and handed to the session (``ChatSession`` for
``/chat``, ``PredictSession`` for ``/predict``); its frames are encoded in the encoding of
the client's most recent frame (MessagePack before the client has sent any, as NodeTool
does) unless the session has fixed one (``/predict``'s ``set_mode``). A frame that fails to
decode is answered with an ``error`` frame; the socket stays open (PROTOCOL.md §4, §5).
"""

from __future__ import annotations

from collections.abc import Callable

from .chat_session import ChatSession, Frame
from .codec import ChunkEncoder, Encoding, FrameDecodeError, decode_frame, encode_frame
from .config import EngineConfig, StaticKey
from .events import Output
from .limits import Admission
from .predict_session import PredictSession
from .state import earliest
from .websocket import WebSocketSession


class AppSocket:
    def __init__(
        self,
        config: EngineConfig,
        now: float,
        user_id: str,
        *,
        predict: bool,
        emit: Callable[[Output], None],
        new_id: Callable[[], int],
        admission: Admission | None = None,
        key: StaticKey | None = None,
    ) -> None:
        self.config = config
        self.opened = now
        self.endpoint = "predict" if predict else "chat"
        self.ws = WebSocketSession(config, now)
        self._encoding: Encoding = "msgpack"
        self._chunks: ChunkEncoder | None = None  # made at the first token: idle sockets are many
        self.session: ChatSession | PredictSession
        if predict:
            self.session = PredictSession(
                config, user_id, send=self._send_frame, emit=emit, new_id=new_id, key=key
            )
        else:
            self.session = ChatSession(
                config,
                user_id,
                send=self._send_frame,
                send_chunk=self._send_chunk,
                emit=emit,
                new_id=new_id,
                admission=admission,
                key=key,
            )

    def receive_data(self, data: bytes, now: float) -> None:
        for message in self.ws.receive_data(data, now):
            self._encoding = "json" if isinstance(message, str) else "msgpack"
            try:
                frame = decode_frame(message, max_depth=self.config.max_depth)
            except FrameDecodeError as exc:
                if isinstance(self.session, PredictSession):
                    self.session.reject(str(exc))
                else:
                    self._send_frame({"type": "error", "message": str(exc)})
                continue
            self.session.handle_frame(frame, now)
            if not self.ws.open:
                break

    def next_deadline(self) -> float | None:
        return earliest(self.ws.next_deadline(), self.session.next_deadline())

    def handle_timer(self, now: float) -> None:
        self.ws.handle_timer(now)
        self.session.handle_timer(now)

    def close(self, code: int, reason: str, now: float) -> None:
        self.session.close()
        self.ws.close(code, reason, now)

    def _send_frame(self, frame: Frame) -> None:
        encoding = self.session.fixed_encoding or self._encoding
        self.ws.send_message(encode_frame(frame, encoding))

    def _send_chunk(self, text: str, thread_id: str | None) -> None:
        encoding = self.session.fixed_encoding or self._encoding
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = ChunkEncoder()
        self.ws.send_message(chunks.encode(text, thread_id, encoding))
