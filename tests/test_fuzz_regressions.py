"""What the fuzzers of ``fuzz/`` found, as regression tests, and a short run of every target.

* ``test_target_runs_its_corpus``: each fuzz target's ``TestOneInput`` runs its seed corpus
  plus deterministic mutations of it (a few hundred inputs a target), so CI exercises every
  target and its oracles without atheris. A failure names the input (base64) to replay.
* One test per finding, each the minimal reproduction through the engine's own inputs, read
  back by independent parsers (a ``wsproto`` client, ``json`` with NaN refused,
  ``msgpack``). Finding names match the table in ``fuzz/README.md``.

Specs: DESIGN.md ("bad bytes from a peer never raise out of ``receive_data``"), PROTOCOL.md
§4 and §5 (frames are JSON text or MessagePack, replies mirror the client's encoding).
"""

from __future__ import annotations

import base64
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import msgpack  # type: ignore[import-untyped]
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import fuzz_codec
import fuzz_http
import fuzz_openai_parse
import fuzz_predict
import fuzz_sse
import fuzz_ws
from _driver import CONFIGS, Driver, Script, check_http, check_ws, strict_json, upgrade_bytes
from _fuzzkit import corpus_files
from _wsgen import OP_BINARY, OP_TEXT, ws_frame
from wirechat.engine.codec import FrameDecodeError, decode_frame, encode_frame

TARGETS: dict[str, ModuleType] = {
    "http": fuzz_http,
    "openai_parse": fuzz_openai_parse,
    "codec": fuzz_codec,
    "ws": fuzz_ws,
    "predict": fuzz_predict,
    "sse": fuzz_sse,
}
INPUTS_PER_TARGET = 300


# --- every target, on its corpus -------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One libFuzzer-like mutation: flip, replace, insert, erase, copy, truncate or splice."""
    buf = bytearray(data)
    kind = rng.randrange(7)
    at = rng.randrange(len(buf) + 1)
    if kind == 0 and buf:
        buf[at % len(buf)] ^= 1 << rng.randrange(8)
    elif kind == 1 and buf:
        buf[at % len(buf)] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x0D, 0x0A, rng.randrange(256)])
    elif kind == 2:
        buf[at:at] = rng.randbytes(rng.randrange(1, 9))
    elif kind == 3:
        del buf[at : at + rng.randrange(1, 17)]
    elif kind == 4 and buf:
        start = rng.randrange(len(buf))
        buf[at:at] = buf[start : start + rng.randrange(1, 33)]
    elif kind == 5:
        del buf[at:]
    else:
        buf = buf[:at] + other[rng.randrange(len(other) + 1) :]
    return bytes(buf)


def _inputs(target: str) -> list[bytes]:
    seeds = [p.read_bytes() for p in corpus_files(target)]
    assert seeds, f"fuzz/corpus/{target} is empty: run python fuzz/make_corpus.py"
    rng = random.Random(target)
    inputs = list(seeds)
    while len(inputs) < INPUTS_PER_TARGET:
        data = rng.choice(seeds)
        for _ in range(rng.randrange(1, 4)):
            data = _mutate(rng, data, rng.choice(seeds))
        inputs.append(data)
    return inputs


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_runs_its_corpus(target: str) -> None:
    # Strictly: the undecorated target, whatever WIRECHAT_FUZZ_KNOWN says.
    test_one_input: Callable[[bytes], None] = TARGETS[target].TestOneInput.__wrapped__
    for data in _inputs(target):
        try:
            test_one_input(data)
        except Exception as exc:
            replay = base64.b64encode(data).decode()
            raise AssertionError(f"fuzz_{target} failed on base64 input {replay}") from exc


# --- finding "bytes-key": a MessagePack map with a bin key ------------------------------------
#
# decode_frame passes ``strict_map_key=True``, which admits str *and bytes* keys. A bytes key
# cannot be written as JSON, so echoing such a value raises TypeError out of the engine.


def test_bytes_key_decoded_frame_can_be_written_back() -> None:
    """What decode_frame accepts, encode_frame can write in both encodings (or it refuses)."""
    packed = msgpack.packb({"type": "tool_result", "result": {b"k": 1}}, use_bin_type=True)
    try:
        frame = decode_frame(packed, max_depth=64)
    except FrameDecodeError:
        return  # refusing bytes keys is a fix too
    json.loads(encode_frame(frame, "json"))
    msgpack.unpackb(encode_frame(frame, "msgpack"), raw=False)


def test_bytes_key_in_a_client_tool_result_does_not_raise() -> None:
    """/chat: a MessagePack tool_result whose result has a bin key must not raise out of
    receive_data (the tool message text is made with json.dumps)."""
    driver = Driver(CONFIGS[0], Script(provider=3))  # the model calls the client's tool
    driver.feed(upgrade_bytes("/chat"))
    manifest = {"type": "client_tools_manifest", "tools": [{"name": "browser"}]}
    driver.feed(ws_frame(OP_TEXT, json.dumps(manifest).encode()))
    driver.feed(ws_frame(OP_TEXT, json.dumps({"type": "message", "content": "hi"}).encode()))
    result = {"type": "tool_result", "tool_call_id": "call_1", "ok": True, "result": {b"k": 1}}
    driver.feed(ws_frame(OP_BINARY, msgpack.packb(result, use_bin_type=True)))  # raised here
    driver.eof()
    replies = check_http(driver)
    assert replies.ws_bytes is not None
    frames = check_ws(replies.ws_bytes).messages
    # Fixed either way: the result is echoed (and the turn goes on), or the frame is refused.
    assert any(f.get("type") in ("tool_result", "error") for f in frames[-3:]), frames


def test_bytes_key_echoed_by_predict_in_text_mode_does_not_raise() -> None:
    """/predict after ``set_mode text``: get_status echoes a job_id with a bin key as JSON."""
    set_text = fuzz_predict.command_payload(
        {"command": "set_mode", "data": {"mode": "text"}}, False
    )
    status = {"command": "get_status", "data": {"job_id": {b"k": 1}}}
    messages = fuzz_predict.run_predict(
        [set_text, (True, msgpack.packb(status, use_bin_type=True))],
        script=Script(job_answer=1),  # the runner does not know the job: the engine echoes it
    )
    assert len(messages) == 2


# --- finding "nan-json": NaN and Infinity written on a JSON text frame ------------------------
#
# MessagePack carries NaN and ±Infinity; the JSON encoder of encode_frame writes them as the
# bare words NaN / Infinity, which no JSON parser accepts (JSON.parse in a browser throws).


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_from_msgpack_is_never_written_as_json(value: float) -> None:
    set_text = fuzz_predict.command_payload(
        {"command": "set_mode", "data": {"mode": "text"}}, False
    )
    status = {"command": "get_status", "data": {"job_id": value}}
    fuzz_predict.run_predict(  # its wsproto client decodes every text frame with NaN refused
        [set_text, (True, msgpack.packb(status, use_bin_type=True))],
        script=Script(job_answer=1),
    )


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_encode_frame_json_is_strict_json(value: float) -> None:
    strict_json(encode_frame({"x": value, "y": [value]}, "json"))


# --- finding "tool-loop": a model that keeps calling tools keeps the turn going forever ---
#
# After max_tool_rounds rounds the engine offers no tools, but a model that calls one anyway
# (here: a tool nobody offered) gets "Tool ... not found" and is called again, round after
# round: one /chat message buys an unbounded number of provider calls.


def test_a_model_that_keeps_calling_tools_cannot_loop_a_turn_forever() -> None:
    config = CONFIGS[0]
    driver = Driver(config, Script(provider=7))  # every answer: a call of an unknown tool
    driver.feed(upgrade_bytes("/chat"))
    driver.feed(ws_frame(OP_TEXT, json.dumps({"type": "message", "content": "hi"}).encode()))
    assert driver.calls <= config.max_tool_rounds + 1, driver.calls
    driver.eof()
    replies = check_http(driver)
    assert replies.ws_bytes is not None
    frames = check_ws(replies.ws_bytes).messages
    done = [f for f in frames if f.get("type") == "chunk" and f.get("done")]
    assert len(done) == 1, frames[-3:]


# --- the oracles themselves ---------------------------------------------------------------


def test_sse_oracle_reads_tricky_text_back() -> None:
    """The SSE round trip on the texts that break naive encoders (a sanity check of the
    target: it must pass on a correct engine, and it does)."""
    deltas = ["a\n\ndata: [DONE]\n\nb", "\r", "\u2028\x85", "\x00", "\ud800", "x\udc80", ""]
    fuzz_sse.run_sse(deltas, usage=True, n=2, read_cuts=[1, 7, 300])
    fuzz_sse.run_sse(deltas, stream=False)
