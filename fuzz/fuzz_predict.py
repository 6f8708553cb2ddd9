"""Fuzz target: ``/predict`` commands (``PredictSession``) through the whole engine.

Input: ``[config][script][batch]`` then commands, each read by ``_wsgen``: mostly a
``{"command", "data"}`` object with fields right, wrong or missing, sometimes a value that
is no object, MessagePack garbage or text that is no JSON; JSON text or MessagePack binary.
A ``wsproto`` client does the handshake and writes the frames (one read each, or all in one
read when ``batch & 1``); the fake runner answers every ``StartJob`` with job events and
every ``JobCommand`` (see ``_driver.Script``).

Invariant: no exception, the socket stays open, and every command frame gets exactly one
direct reply: one server message without ``type`` (job events carry ``type``), read by the
``wsproto`` client (the oracle) and decoded as JSON (no NaN) or MessagePack.

Run: ``python fuzz/fuzz_predict.py -max_total_time=600 fuzz/corpus/predict``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from _fuzzkit import FuzzInput, instrumented, main, tolerate_known
from _wsgen import json_value, predict_frame, word

with instrumented(__name__ == "__main__"):
    import msgpack  # type: ignore[import-untyped]
    from _driver import CONFIGS, HOST, TOKEN, Driver, Script, strict_json
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection,
        BytesMessage,
        CloseConnection,
        Message,
        Ping,
        Request,
        TextMessage,
    )

Command = tuple[bool, bytes]  # (binary, payload): one client message


def command_payload(value: Any, binary: bool) -> Command:
    """A command as a client library writes it: strict JSON text or MessagePack. A value one
    encoding cannot carry (bytes keys in JSON; a lone surrogate or an integer past 64 bits
    in MessagePack) goes in the other, and ``{}`` when neither can."""
    for use_binary in (binary, not binary):
        try:
            if use_binary:
                return True, msgpack.packb(value, use_bin_type=True, default=repr)
            return False, json.dumps(value, default=repr).encode("ascii")
        except (OverflowError, UnicodeEncodeError, ValueError, TypeError):
            continue
    return False, b"{}"


def run_predict(
    commands: Sequence[Command],
    *,
    config: int = 0,
    script: Script | None = None,
    batch: bool = False,
) -> list[dict[str, Any]]:
    """Send ``commands`` over ``/predict``; return the server's messages (checked)."""
    cfg = CONFIGS[2 if config & 1 else 0]  # the two configs that serve /predict
    target = f"/predict?api_key={TOKEN}" if cfg.static_keys else "/predict"
    client = WSConnection(ConnectionType.CLIENT)
    driver = Driver(cfg, script or Script())
    driver.feed(client.send(Request(host=HOST, target=target)))
    client.receive_data(bytes(driver.out))
    assert any(isinstance(e, AcceptConnection) for e in client.events()), driver.out[:80]
    seen = len(driver.out)
    wire = [
        client.send(BytesMessage(data=payload) if binary else TextMessage(data=payload.decode()))
        for binary, payload in commands
    ]
    for data in [b"".join(wire)] if batch else wire:
        if data:
            driver.feed(data)
    assert not driver.closed, "the server closed /predict"
    client.receive_data(bytes(driver.out[seen:]))
    messages: list[dict[str, Any]] = []
    for event in client.events():
        assert not isinstance(event, CloseConnection), event
        if isinstance(event, Ping):
            continue
        assert isinstance(event, Message) and event.message_finished, event
        if isinstance(event, TextMessage):
            value = strict_json(event.data)
        else:
            value = msgpack.unpackb(bytes(event.data), raw=False)
        assert isinstance(value, dict), value
        messages.append(value)
    replies = [m for m in messages if "type" not in m]
    assert len(replies) == len(commands), (len(replies), len(commands), replies, commands)
    return messages


def read_commands(source: FuzzInput, limit: int = 32) -> list[Command]:
    commands: list[Command] = []
    while source.remaining and len(commands) < limit:
        kind = source.int_in(0, 15)
        if kind <= 11:
            commands.append(command_payload(predict_frame(source), bool(kind & 1)))
        elif kind == 12:
            commands.append(command_payload(json_value(source), source.flag()))
        elif kind == 13:
            commands.append((True, source.blob(40)))
        else:
            commands.append((False, word(source).encode("utf-8", "replace")))
    return commands


@tolerate_known
def TestOneInput(data: bytes) -> None:
    source = FuzzInput(data)
    config = source.byte()
    script = Script.from_byte(source.byte())
    batch = source.flag()
    run_predict(read_commands(source), config=config, script=script, batch=batch)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
