"""The server side of the RFC 6455 opening handshake, on top of an h11 request.

Rules of this module: pure functions of the request headers. A request that is not a valid
WebSocket upgrade gets a clear 4xx (never a hang): 426 with ``Upgrade: websocket`` when it
is no upgrade at all or asks for another version (with ``Sec-WebSocket-Version: 13``, RFC
6455 §4.2.2), 400 for a missing or malformed key. Extensions are never negotiated:
wsproto's permessage-deflate inflates without a bound (reliability §2.6).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from .errors import RequestError

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _tokens(value: bytes | None) -> set[bytes]:
    return {t.strip().lower() for t in (value or b"").split(b",")}


def handshake_key(headers: dict[bytes, bytes]) -> bytes:
    """The client's ``Sec-WebSocket-Key`` of a valid upgrade, or :class:`RequestError`."""
    if b"websocket" not in _tokens(headers.get(b"upgrade")) or b"upgrade" not in _tokens(
        headers.get(b"connection")
    ):
        raise RequestError(
            "This endpoint is a WebSocket: connect with a WebSocket client (Upgrade: websocket).",
            status=426,
            code="upgrade_required",
            headers=(("upgrade", "websocket"), ("connection", "Upgrade")),
        )
    if headers.get(b"sec-websocket-version") != b"13":
        raise RequestError(
            "Unsupported WebSocket version: only version 13 is supported.",
            status=426,
            code="upgrade_required",
            headers=(("sec-websocket-version", "13"),),
        )
    key = headers.get(b"sec-websocket-key", b"")
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise RequestError("Missing or invalid Sec-WebSocket-Key.", status=400)
    return key


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client key (RFC 6455 §4.2.2 step 5.4)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())
