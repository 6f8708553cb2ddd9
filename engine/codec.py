"""JSON and MessagePack frames for the NodeTool WebSockets, decoded under limits.

Rules of this module:

* A text frame is JSON, a binary frame MessagePack (PROTOCOL.md §4). Both decode to plain
  dicts, lists, strings, numbers, booleans, ``None`` (and ``bytes`` for MessagePack ``bin``).
  Anything else (MessagePack extension types, timestamps, non-string map keys, NaN or
  Infinity in JSON, trailing data) is refused.
* Nesting is refused past ``max_depth`` *before* a deep structure can exhaust the stack:
  MessagePack's own parser stops at 1024 levels, and JSON's at the recursion limit; both
  errors are caught here.
* Failures raise :class:`FrameDecodeError`, answered with an ``error`` frame by the caller.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import msgpack  # type: ignore[import-untyped]

# What json.dumps does to a str (ensure_ascii), without its per-call set-up.
_json_string = json.encoder.encode_basestring_ascii

Encoding = Literal["json", "msgpack"]


class FrameDecodeError(ValueError):
    """A frame that is not a well-formed JSON or MessagePack object within the limits."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"MessagePack extension type {code} is not accepted")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is valid JSON that decodes to infinity
        raise ValueError("numbers must be finite")
    return value


# json.loads with any argument builds a new decoder per call; this one is made once.
_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def loads_json(text: str, max_depth: int) -> Any:
    """Strict JSON: NaN, Infinity and numbers that overflow to them are refused, and so is
    nesting past ``max_depth`` (``ValueError`` or ``RecursionError``)."""
    value = _JSON_DECODER.decode(text)
    # Nesting needs a bracket per level: a text with no more brackets than the limit (in
    # strings or not) cannot exceed it, and most bodies and frames skip the walk.
    if text.count("{") + text.count("[") > max_depth:
        check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int) -> None:
    """Iterative walk (no recursion of our own) over containers, refusing odd types."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                # MessagePack allows bytes keys; no JSON client could be answered with them.
                raise FrameDecodeError("object keys must be strings")
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        elif isinstance(item, float):
            if not math.isfinite(item):  # MessagePack can carry NaN and Infinity; JSON cannot
                raise FrameDecodeError("numbers must be finite")
            continue
        elif item is None or isinstance(item, str | int | bytes):
            continue
        else:
            raise FrameDecodeError(f"unsupported value of type {type(item).__name__}")
        if depth > max_depth:
            raise FrameDecodeError(f"nesting deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def decode_frame(data: str | bytes, *, max_depth: int) -> dict[str, Any]:
    """Decode one WebSocket message (text: JSON, bytes: MessagePack) into an object."""
    try:
        if isinstance(data, str):
            value = loads_json(data, max_depth)
        else:
            value = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                ext_hook=_refuse_ext,
                timestamp=0,
                use_list=True,
            )
    except (ValueError, RecursionError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, TypeError) as exc:  # fmt: skip
        raise FrameDecodeError(f"could not decode frame: {exc}") from None
    if not isinstance(value, dict):
        raise FrameDecodeError("a frame must be an object")
    if not isinstance(data, str):  # loads_json made its own checks
        check_depth(value, max_depth)
    return value


def encode_frame(payload: dict[str, Any], encoding: Encoding) -> str | bytes:
    """Encode a server frame as JSON text or MessagePack bytes."""
    if encoding == "json":
        try:
            return json.dumps(
                payload, separators=(",", ":"), default=_json_fallback, allow_nan=False
            )
        except ValueError:  # a non-finite number from a tool or workflow: strict JSON only
            return json.dumps(_finite(payload), separators=(",", ":"), default=_json_fallback)
    # A lone surrogate from a JSON client cannot be UTF-8: replace it rather than fail.
    return msgpack.packb(  # type: ignore[no-any-return]
        payload, use_bin_type=True, default=_msgpack_fallback, unicode_errors="replace"
    )


class ChunkEncoder:
    """Text ``chunk`` frames, the frame every streamed token becomes, encoded fast.

    ``{"type": "chunk", "content": TEXT, "content_type": "text", "done": false,
    "thread_id": ID}`` differs from one token to the next only in TEXT, so everything around
    it is encoded once per (encoding, thread id) by :func:`encode_frame` itself and only the
    text is encoded per token. The bytes are exactly what ``encode_frame`` gives for the
    whole dict (a test holds the two equal).
    """

    # Split at its first occurrence: "content" comes before "thread_id" in the frame, so a
    # thread id that happens to hold this text cannot move the split.
    _MARK = "\ue000wirechat-chunk\ue000"

    def __init__(self) -> None:
        self._parts: dict[tuple[Encoding, str | None], tuple[Any, Any]] = {}
        # A small buffer (it grows when needed): msgpack's default of 256 KiB costs an idle
        # socket resident pages.
        self._packer = msgpack.Packer(use_bin_type=True, unicode_errors="replace", buf_size=512)

    def encode(self, text: str, thread_id: str | None, encoding: Encoding) -> str | bytes:
        parts = self._parts.get((encoding, thread_id))
        if parts is None:
            parts = self._split(thread_id, encoding)
        head, tail = parts
        if encoding == "json":
            return head + _json_string(text) + tail  # type: ignore[no-any-return]
        return head + self._packer.pack(text) + tail  # type: ignore[no-any-return]

    def _split(self, thread_id: str | None, encoding: Encoding) -> tuple[Any, Any]:
        frame = chunk_frame(self._MARK, thread_id)
        whole = encode_frame(frame, encoding)
        mark = _json_string(self._MARK) if encoding == "json" else self._packer.pack(self._MARK)
        head, found, tail = whole.partition(mark)  # type: ignore[arg-type]
        assert found, "the chunk frame lost its text"
        if len(self._parts) >= 16:  # a socket names few threads; never let this grow
            self._parts.clear()
        self._parts[(encoding, thread_id)] = (head, tail)
        return head, tail


def chunk_frame(text: str, thread_id: str | None) -> dict[str, Any]:
    """The ``chunk`` frame of one piece of streamed text (what ``ChunkEncoder`` encodes)."""
    return {
        "type": "chunk",
        "content": text,
        "content_type": "text",
        "done": False,
        "thread_id": thread_id,
    }


def _json_fallback(value: Any) -> Any:
    # Bytes from a MessagePack client cannot be JSON: say so instead of dropping the frame.
    if isinstance(value, bytes | bytearray):
        return {"type": "bytes", "length": len(value)}
    return str(value)


def _msgpack_fallback(value: Any) -> Any:
    return str(value)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
