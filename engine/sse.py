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


def dumps(payload: Any) -> bytes:
    """Compact, ASCII-only JSON (lone surrogates stay escaped instead of failing to encode)."""
    return json.dumps(payload, separators=(",", ":")).encode("ascii")


def event(payload: Any) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


def raw_event(json_bytes: bytes) -> bytes:
    """An event around JSON text the caller has already encoded with :func:`dumps`."""
    return b"data: " + json_bytes + b"\n\n"
