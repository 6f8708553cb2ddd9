"""Shared pieces of the stateful engine tests (``test_engine_stateful.py``).

* :func:`machine_settings`: the hypothesis settings of every machine, short by default (the
  whole file runs in well under 30 s) and longer on request through the environment:

  - ``WIRECHAT_STATEFUL_EXAMPLES=2000``: examples per machine;
  - ``WIRECHAT_STATEFUL_STEPS=80``: rules per example;
  - ``WIRECHAT_STATEFUL_RANDOM=1``: a random seed per run instead of the fixed derandomized
    one (hypothesis prints the ``@seed`` to reproduce a failure).

* :class:`RequestSpec` and :func:`build_request`: the HTTP requests the connection machine
  sends, as raw bytes, with what the oracle needs to parse the reply and the statuses the
  reply may have.
* Provider items and errors the machines play back, and a few SSE checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from engine_peer import HOST, encode_request, sse_events
from hypothesis import HealthCheck, settings
from wirechat.engine import EngineConfig, Finish, ProviderError, TextDelta, ToolCall, Usage
from ws_peer import WsPeer

T0 = 1_700_000_000.0


def machine_settings(examples: int, steps: int) -> settings:
    """Settings of one machine: ``examples`` of ``steps`` rules unless the environment says more."""
    env_examples = os.environ.get("WIRECHAT_STATEFUL_EXAMPLES")
    env_steps = os.environ.get("WIRECHAT_STATEFUL_STEPS")
    return settings(
        max_examples=int(env_examples) if env_examples else examples,
        stateful_step_count=int(env_steps) if env_steps else steps,
        deadline=None,
        derandomize=os.environ.get("WIRECHAT_STATEFUL_RANDOM", "") in ("", "0"),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        print_blob=True,
    )


# --- HTTP requests ----------------------------------------------------------------------------

# Statuses a provider failure before the first byte becomes (errors.request_error_for) for
# the errors in PROVIDER_ERRORS, and the first-item timeout (504).
_PROVIDER_STATUSES = frozenset({400, 404, 429, 502, 504})
# What a request that never completed may be answered with before the connection closes.
FATAL_STATUSES = frozenset({400, 408, 413, 414, 431, 501, 505})

REQUEST_KINDS = (
    "chat",
    "stream",
    "models",
    "model",
    "health",
    "head_health",
    "options",
    "missing",
    "bad_json",
    "invalid",
    "garbage",
)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    kind: str
    method: str  # for the oracle: how to parse the reply
    target: str
    raw: bytes
    close: bool  # the request says Connection: close
    stream: bool
    n: int
    allowed: frozenset[int]  # statuses of a reply to the complete request (besides 503)


def build_request(kind: str, *, chunked: bool, close: bool, n: int) -> RequestSpec:
    headers: list[tuple[str, str]] = [("Connection", "close")] if close else []
    json_headers = [("Content-Type", "application/json"), *headers]
    target = "/v1/chat/completions"
    stream = False
    method = "POST"
    if kind in ("chat", "stream"):
        stream = kind == "stream"
        fields: dict[str, Any] = {
            "model": "echo",
            "messages": [{"role": "user", "content": "hi"}],
            "n": n,
        }
        if stream:
            fields["stream"] = True
            fields["stream_options"] = {"include_usage": n == 1}
        body = json.dumps(fields).encode()
        pieces = [body[: len(body) // 2], body[len(body) // 2 :]] if chunked else [body]
        raw = encode_request(method, target, json_headers, pieces, chunked=chunked)
        allowed = frozenset({200}) | _PROVIDER_STATUSES
    elif kind in ("bad_json", "invalid"):
        body = b'{"model": "echo", "messages": [' if kind == "bad_json" else b'{"model": "echo"}'
        raw = encode_request(method, target, json_headers, [body], chunked=chunked)
        allowed = frozenset({400})
    elif kind == "options":
        method = "OPTIONS"
        raw = encode_request(method, target, headers)
        allowed = frozenset({204})
    elif kind == "garbage":
        method, target = "GET", "/"
        # Two Content-Length fields: refused by the strictness layer (400, then close).
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n"
            b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
        )
        allowed = FATAL_STATUSES
    else:
        method = "HEAD" if kind == "head_health" else "GET"
        target = {
            "models": "/v1/models",
            "model": "/v1/models/echo",
            "health": "/health",
            "head_health": "/health",
            "missing": "/v1/nowhere",
        }[kind]
        raw = encode_request(method, target, headers)
        if kind in ("models", "model"):
            allowed = frozenset({200}) | _PROVIDER_STATUSES
        elif kind == "missing":
            allowed = frozenset({404})
        else:
            allowed = frozenset({200})
    return RequestSpec(kind, method, target, raw, close, stream, n, allowed)


# --- provider playback ------------------------------------------------------------------------

HTTP_ITEMS = (
    TextDelta(text="Hello"),
    TextDelta(text=""),
    TextDelta(text="line\r\nbreak data: [DONE]\n\n\u2028"),
    ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
    Finish(reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=5)),
    Finish(reason="length"),
    Finish(),
)

PROVIDER_ERRORS = (
    ProviderError("rate limited", status=429, retry_after=1.5),
    ProviderError("upstream broke", status=500),
    ProviderError("no such model", status=404, code="model_not_found"),
    ProviderError("bad request upstream", status=400),
    ProviderError("upstream refused our key", status=401),
    ProviderError("upstream timed out", status=504, code="timeout"),
)


# --- SSE ----------------------------------------------------------------------------------------


def check_sse_stream(body: bytes, n: int) -> None:
    """A complete Chat Completions stream: chunks, then one error event or one finish chunk per
    choice (and the usage chunk), then exactly one ``data: [DONE]`` as the last event."""
    events = sse_events(body)
    assert events, "empty stream"
    assert events[-1] == "[DONE]", events[-3:]
    assert events.count("[DONE]") == 1, events
    body_events = events[:-1]
    assert body_events, "a stream with nothing before [DONE]"
    assert all(isinstance(e, dict) for e in body_events), body_events
    errors = [e for e in body_events if "error" in e]
    if errors:
        assert len(errors) == 1 and body_events[-1] is errors[0], body_events[-3:]
        chunks = body_events[:-1]
    else:
        chunks = body_events
    assert len({c["id"] for c in chunks}) <= 1, "chunks of one stream with different ids"
    finishes = [
        c["choices"][0]["index"]
        for c in chunks
        if c["choices"] and c["choices"][0].get("finish_reason") is not None
    ]
    if not errors:
        assert finishes == list(range(n)), (finishes, n)
        last = chunks[-1]
        assert last["choices"] == [] or last["choices"][0]["finish_reason"] is not None, last


# --- a WebSocket peer that also plays the job runner ---------------------------------------------


class RunnerPeer(WsPeer):
    """``WsPeer`` plus the job runner's inputs, pulled like every other input."""

    @classmethod
    def opened_at(cls, config: EngineConfig, target: str) -> RunnerPeer:
        """A peer whose handshake to ``target`` succeeded, its output so far taken."""
        peer = cls(config)
        peer.open(target)
        peer.take()
        peer.take_effects()
        return peer

    def job_event(self, job_id: str, event: dict[str, Any]) -> None:
        self.server.job_event(job_id, event, self.now)
        self._pump()

    def job_command_done(self, op_id: int, value: object) -> None:
        self.server.job_command_done(op_id, value, self.now)
        self._pump()
