"""Server-sent events framing for Chat Completions streams.

Rules of this module: every event is exactly ``data: <compact JSON>\\n\\n``. JSON escapes CR,
LF, U+2028 and U+0085 (``ensure_ascii``), so no model text can end an event early or forge
a ``data: [DONE]`` line. No ``event:`` or ``id:`` lines are ever written: older openai
clients mis-handle them (reference/openai-compat.md §4.1).
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": ping\n\n"


# json.dumps with any argument builds a new encoder per call; this one is made once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_JSON_STRING = json.encoder.encode_basestring_ascii


def dumps(payload: Any) -> bytes:
    """Compact, ASCII-only JSON (lone surrogates stay escaped instead of failing to encode)."""
    return _COMPACT.encode(payload).encode("ascii")


def dumps_text(text: str) -> bytes:
    """``dumps`` of a string (a streamed token), without the encoder's dispatch."""
    return _JSON_STRING(text).encode("ascii")


def event(payload: Any) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


def raw_event(json_bytes: bytes) -> bytes:
    """An event around JSON text the caller has already encoded with :func:`dumps`."""
    return b"data: " + json_bytes + b"\n\n"
