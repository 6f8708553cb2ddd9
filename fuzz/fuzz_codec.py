"""Fuzz target: WebSocket message payloads into ``wirechat.engine.codec.decode_frame``.

Input: one message payload, decoded as MessagePack (bytes) and, when it is UTF-8, as JSON
(text); a first byte below 0x20 selects the tiny nesting limit (4) instead of 64.

Invariant: ``decode_frame`` returns a dict of plain values no deeper than the limit, or
raises ``FrameDecodeError``; nothing else escapes. Memory stays bounded: a declared length
(MessagePack ``array32``/``map32``/``str32``/``bin32``) is never allocated before its bytes
are there (run with ``-rss_limit_mb``; the regression tests measure it with tracemalloc).
Whatever decodes also re-encodes (``encode_frame``) in both encodings.

Run: ``python fuzz/fuzz_codec.py -max_total_time=600 -rss_limit_mb=512 fuzz/corpus/codec``.
"""

from __future__ import annotations

import sys
from typing import Any

from _fuzzkit import instrumented, main, tolerate_known

with instrumented(__name__ == "__main__"):
    from wirechat.engine.codec import FrameDecodeError, check_depth, decode_frame, encode_frame


def _check(value: dict[str, Any], max_depth: int) -> None:
    assert isinstance(value, dict)
    check_depth(value, max_depth)  # raises FrameDecodeError if the decoder let too much in
    for encoding in ("json", "msgpack"):
        encoded = encode_frame(value, encoding)  # type: ignore[arg-type]
        assert isinstance(encoded, str if encoding == "json" else bytes)


@tolerate_known
def TestOneInput(data: bytes) -> None:
    max_depth = 4 if data[:1] and data[0] < 0x20 else 64
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    for message in (data, text):
        if message is None:
            continue
        try:
            value = decode_frame(message, max_depth=max_depth)
        except FrameDecodeError:
            continue
        _check(value, max_depth)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
