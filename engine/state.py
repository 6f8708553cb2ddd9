"""The phases of one HTTP connection and the only table that moves between them.

Rule of this module (after h11's ``_state.py``): everything that decides a phase change
lives in ``TRANSITIONS``; ``ServerConnection`` asks ``next_phase`` and never assigns a phase
on its own. A (phase, input) pair not in the table is a bug in the engine:
``LocalProtocolError``.

    IDLE ──bytes──▶ HEAD ──head_accepted──▶ BODY ──body_complete──▶ WORKING
      ▲  └────────head_accepted───────────────┘                    │      │
      │                                           response_started │      │
      │                                                            ▼      │
      └──────────────── response_finished ───────────────── STREAMING ◀───┘
    WORKING ──upgraded──▶ WEBSOCKET (a 101 was sent; HTTP is over on this connection)
    any phase ──close──▶ CLOSED
"""

from __future__ import annotations

from enum import Enum

from .errors import LocalProtocolError


class Phase(Enum):
    IDLE = "idle"  # between requests: waiting for the first byte of a head
    HEAD = "head"  # part of a request head has arrived
    BODY = "body"  # head accepted; h11 is reading the body
    WORKING = "working"  # request complete; waiting for a provider, nothing sent yet
    STREAMING = "streaming"  # response head sent; body being streamed
    WEBSOCKET = "websocket"  # upgraded: the bytes belong to a WebSocket session
    CLOSED = "closed"  # no more bytes in or out


class Input(Enum):
    BYTES = "bytes"
    HEAD_ACCEPTED = "head_accepted"
    BODY_COMPLETE = "body_complete"
    RESPONSE_STARTED = "response_started"
    RESPONSE_FINISHED = "response_finished"
    UPGRADED = "upgraded"
    CLOSE = "close"


TRANSITIONS: dict[tuple[Phase, Input], Phase] = {
    (Phase.IDLE, Input.BYTES): Phase.HEAD,
    (Phase.HEAD, Input.BYTES): Phase.HEAD,
    (Phase.IDLE, Input.HEAD_ACCEPTED): Phase.BODY,
    (Phase.HEAD, Input.HEAD_ACCEPTED): Phase.BODY,
    (Phase.BODY, Input.BODY_COMPLETE): Phase.WORKING,
    (Phase.WORKING, Input.RESPONSE_STARTED): Phase.STREAMING,
    (Phase.WORKING, Input.RESPONSE_FINISHED): Phase.IDLE,
    (Phase.STREAMING, Input.RESPONSE_FINISHED): Phase.IDLE,
    (Phase.WORKING, Input.UPGRADED): Phase.WEBSOCKET,
    **{(phase, Input.CLOSE): Phase.CLOSED for phase in Phase},
}


def next_phase(phase: Phase, event: Input) -> Phase:
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise LocalProtocolError(
            f"input {event.value} is not allowed in phase {phase.value}"
        ) from None


def earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two deadlines, ``None`` meaning none (asked once per token: no lists)."""
    if a is None:
        return b
    if b is None or a <= b:
        return a
    return b
