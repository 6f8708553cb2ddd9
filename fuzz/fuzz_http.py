"""Fuzz target: raw bytes from an HTTP client into ``ServerConnection``.

Input: ``[config][script][flags][cut count - 1][cut: 2 bytes]+ payload``. The payload is fed in
pieces cut at the given offsets (modulo its length), every effect is answered at once
(``CallProvider``: text deltas and ``provider_done``, or what the script byte says: failures,
tool calls, a provider that never answers), the server starts a graceful shutdown after the
first piece (``flags & 2``) or after the last (``flags & 4``), the clock is run to
``next_deadline()`` (``flags & 1``), then the client sends EOF.

Invariant: no exception; the server writes nothing or HTTP/1.1 replies an ``h11`` client
parses, one per ``RequestCompleted`` notice (plus at most one fatal reply), error bodies in
the OpenAI envelope, streams that end with exactly one ``[DONE]``; after a 101, WebSocket
frames a ``wsproto`` client parses; nothing written after ``CloseTransport`` or EOF.

Run: ``python fuzz/fuzz_http.py -max_total_time=600 fuzz/corpus/http`` (see README.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _fuzzkit import FuzzInput, instrumented, main, pieces, tolerate_known

with instrumented(__name__ == "__main__"):
    from _driver import CONFIGS, Driver, Script, check_http, check_ws


def encode_seed(
    payload: bytes,
    *,
    config: int = 0,
    script: int = 0,
    timers: bool = True,
    shutdown: int = 0,
    cuts: Sequence[int] | None = None,
) -> bytes:
    """The fuzz input that feeds ``payload`` this way (used by make_corpus.py)."""
    cuts = [len(payload) // 2] if cuts is None else list(cuts) or [0]
    head = bytes([config, script, int(timers) | (shutdown & 3) << 1, len(cuts) - 1])
    return head + b"".join(c.to_bytes(2, "big") for c in cuts) + payload


@tolerate_known
def TestOneInput(data: bytes) -> None:
    source = FuzzInput(data)
    config = CONFIGS[source.byte() % len(CONFIGS)]
    script = Script.from_byte(source.byte())
    flags = source.byte()
    raw_cuts = [source.int_in(0, 0xFFFF) for _ in range(1 + source.byte() % 4)]
    payload = source.rest()
    cuts = sorted({c % len(payload) for c in raw_cuts}) if payload else []

    driver = Driver(config, script)
    for index, piece in enumerate(pieces(payload, cuts)):
        if driver.closed:
            break
        driver.feed(piece)
        if index == 0 and flags & 2:
            driver.shutdown()
    if flags & 4:
        driver.shutdown()
    if flags & 1:
        driver.run_timers()
    driver.eof()
    result = check_http(driver)
    if result.ws_bytes is not None:
        check_ws(result.ws_bytes)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
