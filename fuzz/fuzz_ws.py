"""Fuzz target: WebSocket frames after a valid upgrade to ``/chat`` or ``/predict``.

Input: ``[config][script][mode][cut count][cut: 2 bytes]*`` then the frames. ``mode``:
bit 0 chooses ``/predict`` over ``/chat``; bit 1 sends the upgrade and the frames in one read
(the frames arrive as the handshake's trailing bytes); bit 2 makes the rest *structured*: it
is read by ``_wsgen.client_frames`` into masked (mostly) frames with any opcode, flags,
length encoding and a JSON or MessagePack NodeTool message, or a ping, pong, close,
fragment, huge declared length or garbage; otherwise the rest is raw bytes on the wire.
Bit 3 starts a graceful shutdown after the first piece; bit 4 leaves out the token a config
with static keys needs (the handshake succeeds, then a 1008 close).

Invariant: no exception; the server answers the upgrade with 101, then writes only frames a
``wsproto`` client parses (unmasked, no RSV bits, control frames short), every message a
JSON (no NaN) or MessagePack object, nothing after its Close, and a Close code the engine
uses (1000-1003, 1007-1009, 1011) or the client's own code echoed; nothing after
``CloseTransport``; the peer's work is bounded.

Run: ``python fuzz/fuzz_ws.py -max_total_time=600 fuzz/corpus/ws`` (see README.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from _fuzzkit import FuzzInput, instrumented, main, pieces, tolerate_known
from _wsgen import client_frames

with instrumented(__name__ == "__main__"):
    from _driver import CONFIGS, TOKEN, Driver, Script, check_http, check_ws, upgrade_bytes

UPGRADES = {
    (predict, auth): upgrade_bytes(
        ("/predict" if predict else "/chat") + (f"?api_key={TOKEN}" if auth else "")
    )
    for predict in (False, True)
    for auth in (False, True)
}


def run_ws(
    config: int,
    predict: bool,
    frames: bytes,
    *,
    script: Script | None = None,
    together: bool = False,
    cuts: Sequence[int] = (),
    client_codes: Sequence[int] | None = None,
    timers: bool = True,
    shutdown: bool = False,
    anonymous: bool = False,
) -> Driver:
    """Upgrade (with the token the config needs, unless ``anonymous``), feed ``frames`` cut
    at ``cuts`` (a graceful shutdown after the first piece if ``shutdown``), run the clock,
    send EOF; check it all."""
    cfg = CONFIGS[config % len(CONFIGS)]
    upgrade = UPGRADES[(predict, bool(cfg.static_keys) and not anonymous)]
    driver = Driver(cfg, script or Script())
    if together:
        frames = upgrade + frames
    else:
        driver.feed(upgrade)
    for index, piece in enumerate(pieces(frames, cuts)):
        if driver.closed:
            break
        driver.feed(piece)
        if index == 0 and shutdown:
            driver.shutdown()
    if timers:
        driver.run_timers()
    driver.eof()
    result = check_http(driver)
    if result.ws_bytes is None:
        # Only a surface without the endpoint may refuse the upgrade, with a plain 404 (the
        # frames that follow are then read as HTTP, and refused as such), or a shutdown that
        # began before the whole handshake was in, with a 503.
        refused = (404, 503) if shutdown else (404,)
        assert result.replies and result.replies[0].status in refused, result.replies
        return driver
    ws = check_ws(result.ws_bytes, client_codes)
    if not predict:
        assert all(isinstance(m.get("type"), str) for m in ws.messages), ws.messages
    return driver


def encode_seed(
    frames: bytes,
    *,
    config: int = 0,
    script: int = 0,
    predict: bool = False,
    together: bool = False,
    structured: bool = False,
    shutdown: bool = False,
    anonymous: bool = False,
    cuts: Sequence[int] = (),
) -> bytes:
    """The fuzz input for this run (used by make_corpus.py)."""
    mode = int(predict) | int(together) << 1 | int(structured) << 2
    mode |= int(shutdown) << 3 | int(anonymous) << 4
    head = bytes([config, script, mode, len(cuts)])
    return head + b"".join(c.to_bytes(2, "big") for c in cuts) + frames


@tolerate_known
def TestOneInput(data: bytes) -> None:
    source = FuzzInput(data)
    config = source.byte()
    script = Script.from_byte(source.byte())
    mode = source.byte()
    raw_cuts = [source.int_in(0, 0xFFFF) for _ in range(source.byte() % 5)]
    predict = bool(mode & 1)
    codes: list[int] | None = None
    if mode & 4:
        frames, codes = client_frames(source, predict)
    else:
        frames = source.rest()
    cuts = sorted({c % len(frames) for c in raw_cuts}) if frames else []
    run_ws(
        config,
        predict,
        frames,
        script=script,
        together=bool(mode & 2),
        cuts=cuts,
        client_codes=codes,
        shutdown=bool(mode & 8),
        anonymous=bool(mode & 16),
    )


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
