"""Stateful property tests of whole engine connections (issue 6, item 2).

Three hypothesis ``RuleBasedStateMachine`` s drive a ``ServerConnection`` only through its
public inputs, exactly as the transport does, and read everything it writes with independent
clients: an ``h11`` client (``engine_peer.EnginePeer``) for HTTP and a ``wsproto`` client
(``ws_peer.WsPeer``) for the WebSockets. The machines play the providers, the thread store,
the tools and the job runner by answering the effects the engine asks for, in any order,
late or never.

1. :class:`HttpConnection`: requests (completions plain and streamed, n = 1 or 2, models,
   health, HEAD, OPTIONS, 404, bad JSON, invalid bodies, smuggling-shaped garbage),
   pipelined and cut at arbitrary points, chunked or not, ``Connection: close`` or not;
   provider items, ends and failures for the pending calls; late results for finished and
   cancelled calls; model listings; time passing with or without the timer firing; client
   EOF; shutdown.
2. :class:`ChatSocket`: ``/chat`` turns (JSON and MessagePack), stop, supersession, app
   pings, tool manifests, client tool results, answers to every effect (and late ones),
   provider and store failures, keep-alive pings, timeouts, client close, EOF, shutdown.
3. :class:`PredictSocket`: ``/predict`` commands, malformed and undecodable frames, answers
   to ``JobCommand`` (and late ones), job events, set_mode, close, EOF, shutdown.

Invariants are listed on each machine. Minimal regression tests for what the machines found
are at the end of the file. Longer runs: see ``stateful_support.machine_settings``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from engine_peer import EnginePeer, Reply, check_error_envelope
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from stateful_support import (
    FATAL_STATUSES,
    HTTP_ITEMS,
    PROVIDER_ERRORS,
    REQUEST_KINDS,
    T0,
    RequestSpec,
    RunnerPeer,
    build_request,
    check_sse_stream,
    machine_settings,
)
from wirechat.engine import (
    ChatMessage,
    EngineConfig,
    Finish,
    ModelInfo,
    Phase,
    ProviderError,
    ProviderItem,
    ServerConnection,
    TextDelta,
    ToolCall,
    ToolSpec,
)
from wirechat.engine.chat import WorkflowSpec
from wirechat.engine.events import (
    CallProvider,
    CancelProvider,
    CancelTool,
    CloseTransport,
    ConnectionFailed,
    JobCommand,
    ListModels,
    OpenThread,
    Output,
    RequestCompleted,
    RunTool,
    SaveMessages,
    StartJob,
)
from ws_peer import OP_BINARY, OP_TEXT, Got, frame
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, Pong, TextMessage

# Time steps: below and above every timeout of the default EngineConfig (keep-alive 5, head
# 10, body 30, WebSocket ping 20 + 20, close 10, client tool 60, idle 120, first item 300,
# shutdown grace 30).
TIME_STEPS = (0.25, 0.25, 1.0, 3.0, 6.0, 11.0, 21.0, 31.0, 61.0, 121.0, 301.0)
# Gates drawn by rules that would otherwise crowd out the rest: the rule acts only when it
# draws True (one time in four, or one in eight for the rules that end a connection), so
# most examples get somewhere before the connection ends.
SOMETIMES = (False, False, False, True)
RARELY = (False,) * 7 + (True,)


def _is_close(reply: Reply) -> bool:
    return any("close" in v.lower() for v in reply.header_values("connection"))


# =================================================================================================
# 1. HTTP connection
# =================================================================================================


@dataclass
class _Sent:
    """One request the client has queued, and where its bytes lie in the client's stream."""

    spec: RequestSpec
    start: int
    end: int


class HttpConnection(RuleBasedStateMachine):
    """One HTTP/1.1 connection.

    Invariants:

    * The h11 client never sees a protocol error in what we write (``EnginePeer`` raises).
    * Reply *i* answers request *i*: its status is one that request may get (a fatal 4xx
      and a close for a request that never completed; 503 only after shutdown began), and it
      carries ``x-request-id``. Error bodies are OpenAI envelopes; ``200`` completions have
      ``n`` choices; every ``text/event-stream`` reply ends with exactly one ``data: [DONE]``
      after a finish chunk per choice or after one error event, and a proper end of body.
    * When the connection closes, every request that was complete by then has its reply,
      unless the client went away, or an earlier request or reply said ``Connection: close``,
      or shutdown had begun and the request was queued behind the one then in flight. A reply
      whose head is written after shutdown began says ``Connection: close``.
    * Every ``CallProvider`` / ``ListModels`` is answered or cancelled by the time the
      connection closes; ``CancelProvider`` names only a call still pending; a result for a
      call that is over (answered, cancelled, or unknown) causes no output and no effect.
    * ``CloseTransport`` once; after it no bytes and no effects for any input, ``closed`` is
      true and ``next_deadline()`` is ``None``. While open there is always a deadline (nothing
      can hang), and right after ``handle_timer(now)`` the deadline is in the future.
    * ``RequestCompleted`` + ``ConnectionFailed`` notices match the replies the client read.
    * The engine never raises.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peer = EnginePeer(EngineConfig(), now=T0)
        self.stream = bytearray()  # every byte the client has queued, delivered or not
        self.delivered = 0
        self.requests: list[_Sent] = []
        self.told_oracle = 0  # requests whose first byte has been delivered
        self.checked = 0  # replies checked so far
        self.pending: dict[int, str] = {}  # stream id -> "chat" | "models"
        self.over: set[int] = set()  # stream ids answered or cancelled
        self.client_gone = False
        self.closed_checked = False
        self.shutdown_index: int | None = None  # first request unanswered at shutdown
        self.shutdown_heads: int | None = None  # responses started before shutdown

    # --- driving ---------------------------------------------------------------------------

    def _input(self, action: Callable[[], None], *, silent: bool = False) -> list[Output]:
        peer = self.peer
        was_closed = peer.server_closed()
        wire, seen = len(peer.wire), len(peer.effects)
        action()
        fresh = peer.effects[seen:]
        wrote = bytes(peer.wire[wire:])
        if was_closed:
            assert not wrote and not fresh, f"output after close: {wrote[:100]!r} {fresh}"
        if silent:
            assert not wrote, f"a late result caused output: {wrote[:200]!r}"
            assert not fresh, f"a late result caused effects: {fresh}"
        for effect in fresh:
            if isinstance(effect, CallProvider | ListModels):
                assert effect.stream_id not in self.pending and effect.stream_id not in self.over
                self.pending[effect.stream_id] = (
                    "chat" if isinstance(effect, CallProvider) else "models"
                )
            elif isinstance(effect, CancelProvider):
                assert effect.stream_id in self.pending, f"cancel of a call not pending: {effect}"
                del self.pending[effect.stream_id]
                self.over.add(effect.stream_id)
        assert sum(isinstance(e, CloseTransport) for e in peer.effects) <= 1
        self._check_replies()
        if peer.transport_closed() and not self.closed_checked:
            self.closed_checked = True
            self._check_close()
        return fresh

    def _finish(self, stream_id: int) -> None:
        self.pending.pop(stream_id, None)
        self.over.add(stream_id)

    def _check_replies(self) -> None:
        replies = self.peer.replies
        while self.checked < len(replies):
            index = self.checked
            self.checked += 1
            reply = replies[index]
            sent = self.requests[index]
            spec = sent.spec
            assert reply.header("x-request-id"), reply.response
            status = reply.status
            if sent.end > self.delivered:
                assert status in FATAL_STATUSES, (spec.kind, status)
                assert _is_close(reply), reply.response
                continue
            allowed = spec.allowed | (
                {503} if self.shutdown_index is not None and spec.kind != "missing" else set()
            )
            assert status in allowed, (spec.kind, status, reply.body[:300])
            if self.shutdown_heads is not None and index >= self.shutdown_heads:
                assert _is_close(reply), f"reply after shutdown without close: {reply.response}"
            if spec.method == "HEAD" or status == 204:
                assert reply.body == b""
            elif status >= 400:
                check_error_envelope(reply.json)
            elif reply.header("content-type") == "text/event-stream":
                assert spec.stream, spec
                check_sse_stream(reply.body, spec.n)
            elif spec.kind == "chat":
                body = reply.json
                assert body["object"] == "chat.completion"
                assert [c["index"] for c in body["choices"]] == list(range(spec.n))
            elif spec.kind == "stream":
                raise AssertionError(f"a 200 stream reply that is not SSE: {reply.response}")
            elif spec.kind == "health":
                assert reply.json["status"] == "healthy"
            elif spec.kind == "models":
                assert reply.json["object"] == "list"
            elif spec.kind == "model":
                assert reply.json["id"] == "echo"

    def _check_close(self) -> None:
        peer = self.peer
        assert peer.server_closed() and peer.server.next_deadline() is None
        assert not self.pending, f"calls left behind at close: {self.pending}"
        assert peer.admission.inflight == 0, "a generation was never released"
        if self.client_gone:
            return
        assert peer.current_response is None
        replies = peer.replies
        for index in range(len(replies), len(self.requests)):
            sent = self.requests[index]
            if sent.end > self.delivered:
                break  # this one never completed, nor did anything after it
            excused = any(r.spec.close for r in self.requests[:index]) or any(
                _is_close(r) for r in replies[:index]
            )
            if self.shutdown_index is not None and index > self.shutdown_index:
                excused = True
            assert excused, (
                f"request {index} ({sent.spec.kind}) complete but never answered; "
                f"replies={[r.status for r in replies]}"
            )

    # --- the client --------------------------------------------------------------------------

    @initialize(
        kinds=st.lists(st.sampled_from(REQUEST_KINDS), min_size=1, max_size=3),
        chunked=st.booleans(),
        close=st.sampled_from([False, False, False, True]),
        n=st.sampled_from([1, 1, 2]),
    )
    def first_requests(self, kinds: list[str], chunked: bool, close: bool, n: int) -> None:
        self.queue_requests(kinds, chunked, close, n)

    @precondition(lambda self: len(self.requests) < 12)
    @rule(
        kinds=st.lists(st.sampled_from(REQUEST_KINDS), min_size=1, max_size=3),
        chunked=st.booleans(),
        close=st.sampled_from([False, False, False, True]),
        n=st.sampled_from([1, 1, 2]),
    )
    def queue_requests(self, kinds: list[str], chunked: bool, close: bool, n: int) -> None:
        """The client writes requests (pipelined when several); delivery comes later."""
        for kind in kinds:
            spec = build_request(kind, chunked=chunked, close=close, n=n)
            start = len(self.stream)
            self.stream += spec.raw
            self.requests.append(_Sent(spec, start, len(self.stream)))

    def _deliver(self, size: int) -> None:
        end = min(len(self.stream), self.delivered + size)
        for sent in self.requests:
            # A HEAD request line is never cut: the oracle reads every reply to it as bodiless,
            # and the server can only honour that once it has seen the method.
            line_end = sent.start + sent.spec.raw.find(b"\r\n") + 2
            if sent.spec.method == "HEAD" and sent.start < end < line_end:
                end = line_end
        while self.told_oracle < len(self.requests) and self.requests[self.told_oracle].start < end:
            spec = self.requests[self.told_oracle].spec
            self.peer.expect(spec.method, spec.target, close=spec.close)
            self.told_oracle += 1
        data = bytes(self.stream[self.delivered : end])
        self.delivered = end  # before the input: replies are checked against it
        self._input(lambda: self.peer.feed(data))

    def _can_deliver(self) -> bool:
        return (
            self.delivered < len(self.stream)
            and not self.client_gone
            and not self.peer.reading_paused()
        )

    @precondition(_can_deliver)
    @rule(size=st.integers(min_value=1, max_value=700))
    def deliver_some(self, size: int) -> None:
        """A read of ``size`` bytes: may end anywhere in a head, a body or between requests."""
        self._deliver(size)

    @precondition(_can_deliver)
    @rule()
    def deliver_all(self) -> None:
        self._deliver(len(self.stream))

    @precondition(lambda self: not self.client_gone)
    @rule(now=st.sampled_from(RARELY))
    def client_eof(self, now: bool) -> None:
        """The client goes away (mid-request, mid-stream, between requests)."""
        if now:
            self.client_gone = True
            self._input(self.peer.eof)

    # --- the providers -----------------------------------------------------------------------

    def _pick(self, kind: str | None, pick: int) -> int | None:
        ids = sorted(s for s, k in self.pending.items() if kind is None or k == kind)
        return ids[pick % len(ids)] if ids else None

    def _chunk(self, stream_id: int, item: ProviderItem) -> None:
        self._input(lambda: self.peer.chunk(stream_id, item))

    @precondition(lambda self: "chat" in self.pending.values())
    @rule(pick=st.integers(0, 3), item=st.sampled_from(HTTP_ITEMS))
    def provider_chunk(self, pick: int, item: ProviderItem) -> None:
        stream_id = self._pick("chat", pick)
        assert stream_id is not None
        self._chunk(stream_id, item)

    @precondition(lambda self: "chat" in self.pending.values())
    @rule(pick=st.integers(0, 3))
    def provider_done(self, pick: int) -> None:
        stream_id = self._pick("chat", pick)
        assert stream_id is not None
        self._finish(stream_id)
        self._input(lambda: self.peer.done(stream_id))

    @precondition(lambda self: "chat" in self.pending.values())
    @rule(pick=st.integers(0, 3), items=st.lists(st.sampled_from(HTTP_ITEMS), max_size=4))
    def provider_stream(self, pick: int, items: list[ProviderItem]) -> None:
        """A whole provider stream for one call: its items, then its end."""
        stream_id = self._pick("chat", pick)
        assert stream_id is not None
        for item in items:
            self._chunk(stream_id, item)
        self._finish(stream_id)
        self._input(lambda: self.peer.done(stream_id))

    @precondition(lambda self: bool(self.pending))
    @rule(pick=st.integers(0, 3), error=st.sampled_from(PROVIDER_ERRORS))
    def provider_failed(self, pick: int, error: ProviderError) -> None:
        stream_id = self._pick(None, pick)
        assert stream_id is not None
        self._finish(stream_id)
        self._input(lambda: self.peer.failed(stream_id, error))

    @precondition(lambda self: "models" in self.pending.values())
    @rule(pick=st.integers(0, 3), with_echo=st.booleans())
    def models_listed(self, pick: int, with_echo: bool) -> None:
        stream_id = self._pick("models", pick)
        assert stream_id is not None
        models = [ModelInfo(id="other", owned_by="test")]
        if with_echo:
            models.append(ModelInfo(id="echo", owned_by="wirechat", created=1))
        self._finish(stream_id)
        self._input(lambda: self.peer.models(stream_id, models))

    @precondition(lambda self: bool(self.over))
    @rule(
        pick=st.integers(0, 7),
        how=st.sampled_from(["chunk", "done", "failed", "models"]),
        item=st.sampled_from(HTTP_ITEMS),
    )
    def late_result(self, pick: int, how: str, item: ProviderItem) -> None:
        """A result for a call that is over (or never existed): dropped silently."""
        over = [*sorted(self.over), 10_000]
        stream_id = over[pick % len(over)]
        peer = self.peer
        actions: dict[str, Callable[[], None]] = {
            "chunk": lambda: peer.chunk(stream_id, item),
            "done": lambda: peer.done(stream_id),
            "failed": lambda: peer.failed(stream_id, PROVIDER_ERRORS[1]),
            "models": lambda: peer.models(stream_id, [ModelInfo(id="echo", owned_by="x")]),
        }
        self._input(actions[how], silent=True)

    # --- time and the server -------------------------------------------------------------------

    def _timer(self) -> None:
        now = self.peer.now
        self._input(lambda: self.peer.timer(now))
        deadline = self.peer.server.next_deadline()
        assert deadline is None or deadline > now, f"timer due again at once: {deadline} <= {now}"

    @rule(step=st.sampled_from(TIME_STEPS), fire=st.booleans())
    def time_passes(self, step: float, fire: bool) -> None:
        """Time passes; the transport's timer fires then, or an input may come first."""
        self.peer.now += step
        if fire:
            self._timer()

    @precondition(lambda self: self.peer.server.next_deadline() is not None)
    @rule(now=st.sampled_from(SOMETIMES))
    def timer_fires_at_deadline(self, now: bool) -> None:
        if not now:
            return
        deadline = self.peer.server.next_deadline()
        assert deadline is not None
        self.peer.now = max(self.peer.now, deadline)
        self._timer()

    @rule(now=st.sampled_from(SOMETIMES))
    def start_shutdown(self, now: bool) -> None:
        if not now:
            return
        if self.shutdown_index is None and not self.peer.server_closed():
            self.shutdown_index = len(self.peer.replies)
            self.shutdown_heads = self.shutdown_index + (self.peer.current_response is not None)
        self._input(self.peer.shutdown)

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def open_means_a_deadline(self) -> None:
        server = self.peer.server
        if server.closed:
            assert server.next_deadline() is None and server.phase is Phase.CLOSED
            assert self.peer.transport_closed()
        else:
            assert server.next_deadline() is not None, f"nothing will wake {server.phase}"
            assert not self.peer.transport_closed()

    @invariant()
    def at_most_one_generation_in_flight(self) -> None:
        # One connection answers one request at a time; a closed one holds none.
        inflight = self.peer.admission.inflight
        assert inflight <= (0 if self.peer.server.closed else 1), inflight

    @invariant()
    def notices_match_replies(self) -> None:
        peer = self.peer
        if self.client_gone or peer.current_response is not None:
            return
        notices = sum(isinstance(e, RequestCompleted | ConnectionFailed) for e in peer.effects)
        assert notices == len(peer.replies), (notices, [r.status for r in peer.replies])


TestHttpConnection = HttpConnection.TestCase
TestHttpConnection.settings = machine_settings(examples=120, steps=40)


# =================================================================================================
# WebSocket helpers
# =================================================================================================


class _SocketMachine(RuleBasedStateMachine):
    """What the /chat and /predict machines share: the wsproto client, time, closing."""

    target = "/chat"
    config = EngineConfig()

    def __init__(self) -> None:
        super().__init__()
        self.peer = RunnerPeer.opened_at(self.config, self.target)
        self.encoding = "msgpack"  # of the client's latest frame (msgpack before any)
        self.pings_answered = 0
        self.closed_checked = False
        self.close_sent_before = False  # our Close frame was out before the current input
        self.auto_pong = True

    # --- driving ---------------------------------------------------------------------------

    def delivered(self) -> bool:
        """Whether an application frame sent now reaches the session."""
        peer = self.peer
        return (
            peer.server_close is None
            and not peer.transport_closed()
            and peer.client.state is ConnectionState.OPEN
        )

    def _wire(self, payload: Any, binary: bool) -> bytes:
        """The bytes of one client message (hand-built once the client may no longer send)."""
        data: str | bytes = (
            msgpack.packb(payload, use_bin_type=True) if binary else json.dumps(payload)
        )
        return self._wire_raw(data)

    def _wire_raw(self, data: str | bytes) -> bytes:
        client = self.peer.client
        if client.state is ConnectionState.OPEN:
            event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
            return client.send(event)
        if isinstance(data, str):
            return frame(OP_TEXT, data.encode())
        return frame(OP_BINARY, data)

    def _io(self, action: Callable[[], None], io: Any = None) -> tuple[list[Got], list[Output]]:
        """Run one input; return the frames and effects it caused, checking what every input
        must respect, and let the subclass's model observe them (``io`` says what the input
        was)."""
        peer = self.peer
        was_closed = peer.transport_closed()
        close_sent = peer.server_close is not None
        self.close_sent_before = close_sent
        wire = len(peer.wire)
        action()
        got = peer.take()
        effects = peer.take_effects()
        if was_closed:
            assert len(peer.wire) == wire, f"bytes after close: {bytes(peer.wire[wire:])[:100]!r}"
            assert not effects, f"effects after close: {effects}"
        if close_sent:
            assert not got, f"frames after our Close: {got}"
        for g in got:
            expected = self.expected_encoding()
            assert g.encoding == expected, (g, expected)
        self.observe(io, got, effects)
        if peer.transport_closed() and not self.closed_checked:
            self.closed_checked = True
            assert peer.server.closed and peer.server.next_deadline() is None
            assert peer.admission.inflight == 0, "a /chat turn's generation was never released"
            self.on_close()
        return got, effects

    def observe(self, io: Any, got: list[Got], effects: list[Output]) -> None:
        """The subclass's model of the session takes in one input's output."""

    def expected_encoding(self) -> str:
        return self.encoding

    def on_close(self) -> None:
        """Called once, when ``CloseTransport`` appears."""

    def _silent(self, action: Callable[[], None], io: Any = None) -> None:
        peer = self.peer
        wire = len(peer.wire)
        got, effects = self._io(action, io)
        assert not got and not effects, (got, effects)
        assert len(peer.wire) == wire, bytes(peer.wire[wire:])[:100]

    def _timer(self) -> None:
        now = self.peer.now
        self._io(lambda: self.peer.timer(now), "timer")
        deadline = self.peer.server.next_deadline()
        assert deadline is None or deadline > now, f"timer due again at once: {deadline} <= {now}"
        if self.auto_pong and self._ping_unanswered():
            self.client_answers_keepalive_ping()

    def _ping_unanswered(self) -> bool:
        return (
            len(self.peer.pings) > self.pings_answered
            and self.peer.client.state is ConnectionState.OPEN
        )

    @initialize(auto_pong=st.sampled_from([True, True, True, False]))
    def client_kind(self, auto_pong: bool) -> None:
        """Most clients answer protocol pings at once (browsers do); some never do."""
        self.auto_pong = auto_pong

    # --- rules common to both sockets ----------------------------------------------------------

    @rule(step=st.sampled_from(TIME_STEPS), fire=st.booleans())
    def time_passes(self, step: float, fire: bool) -> None:
        """Time passes; the transport's timer fires then, or an input may come first."""
        self.peer.now += step
        if fire:
            self._timer()

    @precondition(lambda self: self.peer.server.next_deadline() is not None)
    @rule(now=st.sampled_from(SOMETIMES))
    def timer_fires_at_deadline(self, now: bool) -> None:
        if not now:
            return
        deadline = self.peer.server.next_deadline()
        assert deadline is not None
        self.peer.now = max(self.peer.now, deadline)
        self._timer()

    @precondition(lambda self: self._ping_unanswered())
    @rule()
    def client_answers_keepalive_ping(self) -> None:
        payload = self.peer.pings[self.pings_answered]
        self.pings_answered += 1
        self._silent(lambda: self.peer.send(Pong(payload=payload)), "pong")

    @precondition(lambda self: self.peer.client.state is ConnectionState.OPEN)
    @rule(payload=st.sampled_from([b"", b"are you there"]), now=st.sampled_from(SOMETIMES))
    def client_pings(self, payload: bytes, now: bool) -> None:
        """A protocol ping: answered with a pong (while open), never with a message."""
        if not now:
            return
        before = len(self.peer.pongs)
        open_before = self.delivered()
        got, effects = self._io(lambda: self.peer.ping(payload), "protocol_ping")
        assert not got and not effects
        if open_before:
            assert self.peer.pongs[before:] == [payload]

    @rule(
        how=st.sampled_from(["eof", "close", "close", "shutdown"]),
        code=st.sampled_from([1000, 1001, 4000]),
        now=st.sampled_from(RARELY),
    )
    def connection_ends(self, how: str, code: int, now: bool) -> None:
        """The client closes (Close frame or EOF) or the server starts shutting down."""
        if not now:
            return
        peer = self.peer
        if how == "eof":
            self._io(peer.eof, "eof")
            assert peer.transport_closed()
        elif how == "shutdown":
            self._io(peer.shutdown, "shutdown")
        elif peer.client.state is ConnectionState.OPEN:
            self._io(lambda: peer.close(code), "close")
            if peer.server_close is None:
                assert peer.transport_closed(), "the client's Close was not answered"

    @precondition(lambda self: self.peer.client.state is ConnectionState.REMOTE_CLOSING)
    @rule()
    def client_answers_our_close(self) -> None:
        got, _ = self._io(self.peer.answer_close, "close")
        assert not got
        assert self.peer.transport_closed()

    @invariant()
    def open_means_a_deadline(self) -> None:
        server = self.peer.server
        if server.closed:
            assert server.next_deadline() is None and self.peer.transport_closed()
        else:
            assert server.next_deadline() is not None, "an open socket nothing will wake"
            assert not self.peer.transport_closed()

    @invariant()
    def at_most_one_generation_in_flight(self) -> None:
        # A /chat socket runs one turn at a time (a new message supersedes the running one).
        inflight = self.peer.admission.inflight
        assert inflight <= (0 if self.peer.server.closed else 1), inflight


# =================================================================================================
# 2. /chat
# =================================================================================================

CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluate an arithmetic expression",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}},
)
CLIENT_TOOL: dict[str, Any] = {"name": "get_selection", "description": "The selection"}
TOOL_NAMES = ("calculator", "get_selection", "no_such_tool")
CHAT_TEXT = (TextDelta(text="Hel"), TextDelta(text="lo"), TextDelta(text=""))
CHAT_FINISH = (Finish(reason="stop"), Finish(reason="tool_calls"))
# Which answer methods fit which pending work (anything else is ignored by the session).
_FITS = {
    "open": ("opened", "store_failed"),
    "provider": ("chunk", "done", "failed"),
    "tool": ("tool_finished",),
    "save": ("saved", "store_failed"),
}
_ANSWERS = ("opened", "store_failed", "chunk", "done", "failed", "tool_finished", "saved")
_TURN_FRAMES = ("chunk", "tool_call", "tool_result", "message")


@dataclass
class _Turn:
    thread_id: str
    done_chunks: int = 0
    save_op: int | None = None
    ended: str | None = None


@dataclass
class _ChatIO:
    """Which input produced an output, for the checks that depend on it."""

    kind: str
    op: int | None = None  # the id the input answered
    answers: bool = False  # the input answered the work the turn waits for


@dataclass
class _Work:
    kind: str  # open | provider | tool | save | client_tool
    key: int | str  # the op id (client_tool: the tool_call_id)
    name: str = ""


class ChatSocket(_SocketMachine):
    """One ``/chat`` WebSocket.

    Invariants (besides the WsPeer oracle's: valid frames, nothing after our Close):

    * Every server frame is in the encoding of the client's latest frame.
    * At most one turn runs; the model knows which from the output alone. Every frame with a
      ``thread_id`` belongs to the turn running when the input came, and every ``chunk``,
      ``tool_call``, ``tool_result`` and ``message`` frame has one.
    * A turn that ends with its final assistant ``message`` has sent exactly one done chunk
      before it, and the final message comes only from ``messages_saved`` for that turn's
      ``SaveMessages`` (itself asked for with the done chunk). No turn sends two done chunks.
    * Every ``stop`` gets exactly one ``generation_stopped`` (with the running turn's
      ``thread_id``, or none when idle); every chat message sent while a turn runs gets
      exactly one for that turn, before anything else.
    * A running turn always waits for exactly one thing (a store op, a provider call, a tool,
      a client tool result): answering it ends the turn or asks for the next thing; nothing
      asks for two things at once. Results for anything else cause no output and no effect.
    * When the socket closes, every ``CallProvider`` and ``RunTool`` has been answered or
      cancelled. No new work (``CallProvider``, ``RunTool``, ``OpenThread``) is asked for
      after our Close frame; no bytes and no effects after ``CloseTransport``.
    * An app ``ping`` gets one ``pong``; the engine never raises.
    """

    config = EngineConfig(server_tools=(CALCULATOR,))

    def __init__(self) -> None:
        super().__init__()
        self.turn: _Turn | None = None
        self.turns: list[_Turn] = []
        self.waiting: _Work | None = None
        self.manifest: set[str] = set()
        self.ids: list[int] = []  # every op id the session asked for
        self.calls_open: set[int] = set()  # CallProvider / RunTool not answered or cancelled
        self.next_call = 0
        self.next_thread = 0
        self.turn_unobservable = False  # our Close is out: the turn's frames are dropped

    # --- the model -----------------------------------------------------------------------------

    def _apply(self, io: _ChatIO, got: list[Got], effects: list[Output]) -> None:
        if self.close_sent_before or self.turn_unobservable:
            # Our Close is out: frames no longer reach the client, so the turn can no longer
            # be followed. Only effects are checked from here on.
            self._effects_while_closing(effects, new_work_allowed=not self.close_sent_before)
            return
        turn = self.turn
        running_before = turn is not None
        stopped = 0
        for g in got:
            f = g.frame
            kind = f.get("type")
            if "thread_id" in f:
                assert turn is not None and turn.ended is None, f"frame of no running turn: {f}"
                assert f["thread_id"] == turn.thread_id, (f, turn)
            elif kind in _TURN_FRAMES:
                raise AssertionError(f"a turn frame without thread_id: {f}")
            if kind == "generation_stopped":
                stopped += 1
                assert io.kind in ("stop", "message"), f"generation_stopped on {io.kind}"
                if turn is not None and turn.ended is None:
                    assert "thread_id" in f
                    turn.ended = "stopped"
                else:
                    assert "thread_id" not in f
            elif kind == "chunk" and f.get("done"):
                assert turn is not None
                turn.done_chunks += 1
                assert turn.done_chunks == 1, "two done chunks in one turn"
            elif kind == "message" and f.get("role") == "assistant" and "tool_calls" not in f:
                assert turn is not None
                assert turn.done_chunks == 1, f"final message after {turn.done_chunks} done chunks"
                assert io.kind == "saved" and io.op == turn.save_op, (io, turn)
                turn.ended = "final"
            elif kind == "error" and "thread_id" in f:
                assert turn is not None
                turn.ended = "error"
            elif kind == "pong":
                assert io.kind == "ping"
        if io.kind == "stop":
            assert stopped == 1, f"stop gave {stopped} generation_stopped"
        if io.kind == "message":
            assert stopped == (1 if running_before else 0), stopped
            if running_before:
                assert got and got[0].type == "generation_stopped", got[:1]
        if io.kind == "ping":
            assert [g.type for g in got] == ["pong"], got
        # Did our Close (or the end of the socket) come in this very input? Then frames after
        # it were dropped, and effects cannot be ordered against it.
        closing_now = self.peer.server_close is not None or self.peer.transport_closed()
        if closing_now:
            self._effects_while_closing(effects, new_work_allowed=True)
            self.turn_unobservable = True
            self.turn = None
            self.waiting = None
            return

        new_work: list[_Work] = []
        new_turn: _Turn | None = None
        cancelled: set[int] = set()
        for e in effects:
            if isinstance(e, OpenThread):
                assert io.kind == "message", f"OpenThread on {io.kind}"
                assert new_turn is None
                new_turn = _Turn(thread_id=e.thread_id)
                new_work.append(_Work("open", e.op_id))
            elif isinstance(e, CallProvider):
                new_work.append(_Work("provider", e.stream_id))
            elif isinstance(e, RunTool):
                new_work.append(_Work("tool", e.op_id, e.name))
            elif isinstance(e, SaveMessages):
                assert turn is not None and turn.done_chunks == 1, "a save before the done chunk"
                assert turn.save_op is None
                turn.save_op = e.op_id
                assert e.thread_id == turn.thread_id
                new_work.append(_Work("save", e.op_id))
            elif isinstance(e, CancelProvider | CancelTool):
                cancelled.add(e.stream_id if isinstance(e, CancelProvider) else e.op_id)
            self._track(e)
        # A client tool the turn now waits for: a tool_call with no tool_result after it, and
        # no server tool run for it.
        calls = [g.frame for g in got if g.type == "tool_call"]
        results = {g.frame.get("tool_call_id") for g in got if g.type == "tool_result"}
        runs = [e for e in effects if isinstance(e, RunTool)]
        if calls and calls[-1]["tool_call_id"] not in results and not runs:
            call = calls[-1]
            assert call["name"] in self.manifest, f"waits for a tool nobody runs: {call}"
            new_work.append(_Work("client_tool", call["tool_call_id"], call["name"]))
        if new_turn is not None:
            assert len(new_work) == 1 and not got[1 if running_before else 0 :], (
                "a new turn sends nothing before its thread is open",
                got,
            )

        if turn is not None and turn.ended is not None:
            self.turn = None
            self.waiting = None
            new_work = [w for w in new_work if w.kind == "open"]  # only a new turn's
        assert len(new_work) <= 1, f"a turn asked for two things at once: {new_work}"
        if new_turn is not None:
            self.turn = new_turn
            self.turns.append(new_turn)
        if new_work:
            self.waiting = new_work[0]
        elif self.turn is not None and self.turn.ended is None:
            waiting = self.waiting
            consumed = io.answers or (
                waiting is not None and isinstance(waiting.key, int) and waiting.key in cancelled
            )
            if consumed:
                raise AssertionError(f"turn stuck: {waiting} ended and nothing else asked for")
        if self.turn is None:
            self.waiting = None

    def _track(self, effect: Output) -> None:
        """Book-keeping of ids and of the provider calls and tool runs still going."""
        if isinstance(effect, CancelProvider | CancelTool):
            key = effect.stream_id if isinstance(effect, CancelProvider) else effect.op_id
            assert key in self.calls_open, f"cancel of nothing running: {effect}"
            self.calls_open.discard(key)
        elif isinstance(effect, OpenThread | CallProvider | RunTool | SaveMessages):
            key = effect.stream_id if isinstance(effect, CallProvider) else effect.op_id
            assert key not in self.ids
            self.ids.append(key)
            if isinstance(effect, CallProvider | RunTool):
                self.calls_open.add(key)

    def _effects_while_closing(self, effects: list[Output], *, new_work_allowed: bool) -> None:
        for e in effects:
            new_work = isinstance(e, OpenThread | CallProvider | RunTool)
            if new_work and not new_work_allowed:
                raise AssertionError(f"new work after our Close frame: {e}")
            self._track(e)

    def _chat_io(self, io: _ChatIO, action: Callable[[], None]) -> None:
        self._io(action, io)

    def observe(self, io: Any, got: list[Got], effects: list[Output]) -> None:
        self._apply(io if isinstance(io, _ChatIO) else _ChatIO(str(io)), got, effects)

    def on_close(self) -> None:
        assert not self.calls_open, f"provider calls or tools left behind: {self.calls_open}"
        if self.turn is not None:
            self.turn.ended = "closed"
            self.turn = None
            self.waiting = None

    def _send(self, io: _ChatIO, payload: Any, binary: bool) -> None:
        delivered = self.delivered()
        data = self._wire(payload, binary)
        if not delivered:
            self._silent(lambda: self.peer.feed(data))
            return
        self.encoding = "msgpack" if binary else "json"
        self._chat_io(io, lambda: self.peer.feed(data))

    # --- the client ----------------------------------------------------------------------------

    @initialize(manifest=st.booleans())
    def client_declares_tools(self, manifest: bool) -> None:
        """Half the clients declare a client-side tool up front (as NodeTool's UI does)."""
        if manifest:
            payload = {"type": "client_tools_manifest", "tools": [CLIENT_TOOL]}
            self._send(_ChatIO("control"), payload, binary=False)
            self.manifest = {CLIENT_TOOL["name"]}

    @rule(
        binary=st.booleans(),
        content=st.sampled_from(["hi", "hi", None, [{"type": "text", "text": "parts"}]]),
        thread=st.booleans(),
        tools=st.sampled_from([[], ["calculator"], ["calculator"], ["no_such_tool"]]),
        supersede=st.sampled_from(SOMETIMES),
    )
    def client_sends_message(
        self, binary: bool, content: Any, thread: bool, tools: list[str], supersede: bool
    ) -> None:
        """A chat message: starts a turn (superseding the running one, now and then)."""
        if self.turn is not None and not supersede:
            return
        payload: dict[str, Any] = {"type": "message", "role": "user", "tools": tools}
        if content is not None:
            payload["content"] = content
        if thread:
            self.next_thread += 1
            payload["thread_id"] = f"thread-{self.next_thread}"
        delivered = self.delivered()
        self._send(_ChatIO("message"), payload, binary)
        valid = content is not None and "no_such_tool" not in tools
        if delivered:
            if valid:
                assert self.turn is not None and self.turn is self.turns[-1]
                if thread:
                    assert self.turn.thread_id == payload["thread_id"]
            else:
                assert self.turn is None, "an invalid message started a turn"

    @rule(
        kind=st.sampled_from(
            [
                "stop",
                "stop",
                "ping",
                "pong",
                "unknown_type",
                "bad_manifest",
                "manifest",
                "empty_manifest",
                "stray_tool_result",
                "undecodable",
            ]
        ),
        binary=st.booleans(),
        pick=st.integers(0, 4),
    )
    def client_sends_control(self, kind: str, binary: bool, pick: int) -> None:
        """Every frame but a chat message: stop and ping act; the others must not touch the
        turn (ignored, or answered with one error frame)."""
        if kind == "stop":
            self._send(_ChatIO("stop"), {"type": "stop"}, binary)
            return
        if kind == "ping":
            self._send(_ChatIO("ping"), {"type": "ping"}, binary)
            return
        turn, waiting, delivered = self.turn, self.waiting, self.delivered()
        if kind == "undecodable":
            data = ("{", "[1, 2]", "NaN", b"\xc1", b"\x93\x01\x02\x03")[pick]
            wire = self._wire_raw(data)
            if not delivered:
                self._silent(lambda: self.peer.feed(wire))
                return
            self.encoding = "json" if isinstance(data, str) else "msgpack"
            self._chat_io(_ChatIO("undecodable"), lambda: self.peer.feed(wire))
        else:
            payloads: dict[str, dict[str, Any]] = {
                "pong": {"type": "pong"},
                "unknown_type": {"type": "no_such_type"},
                "bad_manifest": {"type": "client_tools_manifest"},
                "manifest": {"type": "client_tools_manifest", "tools": [CLIENT_TOOL]},
                "empty_manifest": {"type": "client_tools_manifest", "tools": []},
                "stray_tool_result": {"type": "tool_result", "tool_call_id": "nope", "ok": True},
            }
            payload = payloads[kind]
            self._send(_ChatIO("control"), payload, binary)
            if delivered and kind in ("manifest", "empty_manifest"):
                self.manifest = {t["name"] for t in payload["tools"]}
        assert self.turn is turn and self.waiting is waiting

    # --- the store, the providers, the tools, the client's tools -----------------------------

    def _answer(self, how: str, op: int, action: Callable[[], None]) -> None:
        waiting = self.waiting
        fits = (
            waiting is not None
            and waiting.key == op
            and waiting.kind in _FITS
            and how in _FITS[waiting.kind]
        )
        if self.turn_unobservable and not self.peer.transport_closed():
            # Our Close is out; the session may still be running a turn we cannot follow.
            if how in ("done", "failed", "tool_finished"):
                self.calls_open.discard(op)
            self._chat_io(_ChatIO(how, op), action)
            return
        if not fits or self.peer.transport_closed():
            self._silent(action)
            return
        if how in ("done", "failed", "tool_finished"):
            self.calls_open.discard(op)
        self._chat_io(_ChatIO(how, op, answers=how != "chunk"), action)

    def _client_tool_result(self, call_id: str, ok: bool) -> None:
        payload: dict[str, Any] = {"type": "tool_result", "tool_call_id": call_id, "ok": ok}
        if ok:
            payload["result"] = {"nodes": [1, 2]}
        else:
            payload["error"] = "it broke"
        if not self.delivered():
            self._send(_ChatIO("control"), payload, binary=False)
            return
        self._send(_ChatIO("client_tool_result", answers=True), payload, binary=False)

    @precondition(lambda self: self.waiting is not None)
    @rule(
        tools=st.lists(st.sampled_from([None, *TOOL_NAMES, "calculator"]), min_size=1, max_size=6),
    )
    def work_succeeds(self, tools: list[str | None]) -> None:
        """What the turn waits for succeeds, then what it waits for next, and so on, once per
        entry of ``tools``: the tool a provider call asks for (None: plain text)."""
        for tool in tools:
            if self.waiting is None:
                return
            self._succeed(self.waiting, tool)

    def _succeed(self, waiting: _Work, tool: str | None) -> None:
        peer = self.peer
        if waiting.kind == "client_tool":
            self._client_tool_result(str(waiting.key), ok=True)
            return
        op = int(waiting.key)
        if waiting.kind == "open":
            history = [ChatMessage(role="user", content="hi")]
            self._answer("opened", op, lambda: peer.opened(op, history))
        elif waiting.kind == "tool":
            self._answer("tool_finished", op, lambda: peer.tool_done(op, True, 3, None))
        elif waiting.kind == "save":
            self._answer("saved", op, lambda: peer.saved(op))
        else:
            self._answer("chunk", op, lambda: peer.chunk(op, TextDelta(text="Hello")))
            if tool is not None and self.waiting is waiting:
                self.next_call += 1
                call = ToolCall(id=f"call_{self.next_call}", name=tool, arguments="{}")
                self._answer("chunk", op, lambda: peer.chunk(op, call))
            if self.waiting is waiting:
                self._answer("done", op, lambda: peer.done(op))

    @precondition(lambda self: self.waiting is not None)
    @rule(error=st.sampled_from(PROVIDER_ERRORS), now=st.sampled_from(SOMETIMES))
    def work_fails(self, error: ProviderError, now: bool) -> None:
        """What the turn waits for fails: the store, the provider, a tool, a client tool."""
        waiting = self.waiting
        assert waiting is not None
        if not now:
            return
        peer = self.peer
        if waiting.kind == "client_tool":
            self._client_tool_result(str(waiting.key), ok=False)
            return
        op = int(waiting.key)
        if waiting.kind in ("open", "save"):
            self._answer("store_failed", op, lambda: peer.store_failed(op, "disk full"))
        elif waiting.kind == "tool":
            self._answer("tool_finished", op, lambda: peer.tool_done(op, False, None, "crash"))
        else:
            self._answer("failed", op, lambda: peer.failed(op, error))

    @precondition(lambda self: self.waiting is not None and self.waiting.kind == "provider")
    @rule(
        kind=st.sampled_from(["text", "finish", *TOOL_NAMES, "bad_args", "done"]),
        pick=st.integers(0, 5),
    )
    def provider_item(self, kind: str, pick: int) -> None:
        """One item (or the end) of the running provider stream, item by item."""
        assert self.waiting is not None
        op = int(self.waiting.key)
        if kind == "done":
            self._answer("done", op, lambda: self.peer.done(op))
            return
        item: ProviderItem
        if kind == "text":
            item = CHAT_TEXT[pick % len(CHAT_TEXT)]
        elif kind == "finish":
            item = CHAT_FINISH[pick % len(CHAT_FINISH)]
        else:
            self.next_call += 1
            name = "calculator" if kind == "bad_args" else kind
            args = "{not json" if kind == "bad_args" else '{"expression": "1+2"}'
            item = ToolCall(id=f"call_{self.next_call}", name=name, arguments=args)
        self._answer("chunk", op, lambda: self.peer.chunk(op, item))

    @precondition(lambda self: bool(self.ids))
    @rule(pick=st.integers(0, 15), how=st.sampled_from([*_ANSWERS, "fitting", "fitting"]))
    def late_answer(self, pick: int, how: str) -> None:
        """Any answer for any id: dropped unless it is what the turn waits for. ("fitting":
        the kind of answer the turn waits for, for another id.)"""
        ids = [*self.ids, 10_000]
        op = ids[pick % len(ids)]
        peer = self.peer
        if how == "fitting":
            waiting = self.waiting
            kind = waiting.kind if waiting is not None else "save"
            fits = _FITS.get(kind, _FITS["save"])
            how = fits[pick % len(fits)]
            if waiting is not None and waiting.key == op:
                op = 10_000
        actions: dict[str, Callable[[], None]] = {
            "opened": lambda: peer.opened(op, [ChatMessage(role="user", content="late")]),
            "store_failed": lambda: peer.store_failed(op, "late failure"),
            "chunk": lambda: peer.chunk(op, TextDelta(text="late")),
            "done": lambda: peer.done(op),
            "failed": lambda: peer.failed(op, PROVIDER_ERRORS[1]),
            "tool_finished": lambda: peer.tool_done(op, True, 1),
            "saved": lambda: peer.saved(op),
        }
        self._answer(how, op, actions[how])


TestChatSocket = ChatSocket.TestCase
TestChatSocket.settings = machine_settings(examples=100, steps=50)


# =================================================================================================
# 3. /predict
# =================================================================================================

WORKFLOW = WorkflowSpec(id="wf", name="Workflow", inputs=("text",))
_COMMANDS = (
    "run_job",
    "run_job_unknown",
    "run_job_bad_params",
    "get_status",
    "get_status_all",
    "cancel_job",
    "reconnect_job",
    "stream_input",
    "end_input_stream",
    "no_job_id",
    "no_input",
    "set_mode_binary",
    "set_mode_text",
    "set_mode_bad",
    "clear_models",
    "unknown_command",
    "no_command",
    "data_not_object",
)
_UNDECODABLE: tuple[str | bytes, ...] = ("{", "[1]", "NaN", b"\xc1", b"\x93\x01\x02\x03")


def _job_value(kind: str, job_id: str) -> Any:
    """What the job runner answers a ``JobCommand`` with, by kind."""
    update = {"type": "job_update", "job_id": job_id, "workflow_id": "wf", "status": "running"}
    return {
        "status": {"job_id": job_id, "workflow_id": "wf", "status": "running"},
        "events": [update, {**update, "type": "node_update", "node_id": "n1"}],
        "no_events": [],
        "none": None,
        "error_text": "input not accepted",
        "junk": 42,
    }[kind]


@dataclass
class _Command:
    """A command frame that reached the session, waiting for its direct reply."""

    kind: str
    op: int | None = None  # its JobCommand, when it asked the runner
    answer: Any = None
    answered: bool = False
    starts: bool = False  # a run_job that must start a job (a StartJob, now or with its reply)
    job_id: str | None = None  # ... the job it started


class PredictSocket(_SocketMachine):
    """One ``/predict`` WebSocket.

    Invariants (besides the WsPeer oracle's and those of every socket input):

    * Every command frame that reaches the session gets exactly one direct reply (a frame
      without ``type``), in command order: at once, or when the ``JobCommand`` it asked for
      is answered, but never ahead of an earlier command's reply and never held back once
      every earlier command is answered. A second answer, or one for an unknown op, causes
      nothing. A command asks the runner at most once; ``run_job`` for a known workflow
      asks ``StartJob`` once, and its reply names that job.
    * A ``reconnect_job`` answer with a snapshot sends the reply, then the snapshot's events.
    * A job event becomes exactly one frame equal to it, and nothing else: at once, or held
      in line behind replies not yet written (and then written in order once they are). An
      event of a job started here never comes before its ``run_job`` reply.
    * Replies use the encoding of the client's latest frame until ``set_mode`` fixes one.
    * No bytes and no effects after ``CloseTransport`` (whatever the input: a job event
      included); no frames after our Close.
    """

    target = "/predict"
    config = EngineConfig(workflows=(WORKFLOW,))

    def __init__(self) -> None:
        super().__init__()
        self.fixed: str | None = None  # set_mode
        self.line: list[_Command] = []  # commands without their reply yet, in order
        self.pending: dict[int, _Command] = {}  # JobCommand op id -> its command
        self.answered: list[int] = []
        self.jobs: list[str] = []  # jobs started by run_job on this socket
        self.announced: set[str] = set()  # ... whose run_job reply has gone out
        self.held: list[dict[str, Any]] = []  # events the session may still owe, in order

    def expected_encoding(self) -> str:
        return self.fixed or self.encoding

    def _job(self, pick: int) -> str:
        jobs = [*self.jobs, "job-unknown"]
        return jobs[pick % len(jobs)]

    def _frame_for(self, kind: str, pick: int) -> Any:
        job = self._job(pick)
        commands: dict[str, Any] = {
            "run_job": ("run_job", {"workflow_id": "wf", "params": {"text": "hi"}}),
            "run_job_unknown": ("run_job", {"workflow_id": "nope"}),
            "run_job_bad_params": ("run_job", {"workflow_id": "wf", "params": [1]}),
            "get_status": ("get_status", {"job_id": job}),
            "get_status_all": ("get_status", {}),
            "cancel_job": ("cancel_job", {"job_id": job}),
            "reconnect_job": ("reconnect_job", {"job_id": job}),
            "stream_input": ("stream_input", {"job_id": job, "input": "text", "value": "x"}),
            "end_input_stream": ("end_input_stream", {"job_id": job, "input": "text"}),
            "no_job_id": ("cancel_job", {}),
            "no_input": ("stream_input", {"job_id": job}),
            "set_mode_binary": ("set_mode", {"mode": "binary"}),
            "set_mode_text": ("set_mode", {"mode": "text"}),
            "set_mode_bad": ("set_mode", {"mode": "loud"}),
            "clear_models": ("clear_models", {}),
            "unknown_command": ("no_such_command", {}),
        }
        if kind == "no_command":
            return {"data": {"job_id": job}}
        if kind == "data_not_object":
            return {"command": "get_status", "data": [job]}
        command, data = commands[kind]
        return {"command": command, "data": data, "user_id": "someone-else"}

    def _take_replies(self, got: list[Got]) -> None:
        """Match the direct replies (and snapshot events, and job events held back until
        their job's reply) in ``got`` to the line of commands."""
        frames = [g.frame for g in got]
        while frames:
            reply = frames.pop(0)
            if "type" in reply:
                assert self.held and reply == self.held[0], (
                    f"an event where a reply was due: {reply}"
                )
                job_id = reply["job_id"]
                assert job_id not in self.jobs or job_id in self.announced, (
                    f"an event before its job's reply: {reply}"
                )
                self.held.pop(0)
                continue
            assert self.line, f"a reply to no command: {reply}"
            command = self.line.pop(0)
            assert command.op is None or command.answered, f"reply before the runner: {command}"
            if command.starts:
                assert command.job_id is not None, "run_job replied without starting its job"
                assert reply.get("job_id") == command.job_id, (reply, command)
                self.announced.add(command.job_id)
            if command.kind == "reconnect_job" and isinstance(command.answer, list):
                events, frames = frames[: len(command.answer)], frames[len(command.answer) :]
                assert events == command.answer, (events, command.answer)
        # Nothing ready may be held back.
        assert not self.line or (self.line[0].op is not None and not self.line[0].answered), (
            f"a reply held back: {self.line[0]}"
        )
        assert self.line or not self.held, f"events held back with nothing before them: {self.held}"

    def _started(self, effects: list[Output]) -> None:
        """Each ``StartJob`` belongs to the oldest ``run_job`` that has not started its job."""
        for start in (e for e in effects if isinstance(e, StartJob)):
            waiting = [c for c in self.line if c.starts and c.job_id is None]
            assert waiting, f"a job started by no run_job: {start}"
            waiting[0].job_id = start.job_id
            self.jobs.append(start.job_id)

    def _match(self, got: list[Got]) -> None:
        if self.peer.transport_closed() or self.peer.server_close is not None:
            self.line.clear()  # replies can no longer come: nothing is owed any more
            self.pending.clear()
            self.held.clear()
        else:
            self._take_replies(got)

    @rule(
        kind=st.sampled_from(_COMMANDS),
        binary=st.booleans(),
        pick=st.integers(0, 7),
        undecodable=st.sampled_from([None, None, None, None, None, None, *_UNDECODABLE]),
    )
    def client_sends_command(
        self, kind: str, binary: bool, pick: int, undecodable: str | bytes | None
    ) -> None:
        delivered = self.delivered()
        frame_ = None if undecodable is not None else self._frame_for(kind, pick)
        if undecodable is not None:
            wire = self._wire_raw(undecodable)
            binary = isinstance(undecodable, bytes)
        else:
            wire = self._wire(frame_, binary)
        if not delivered:
            self._silent(lambda: self.peer.feed(wire))
            return
        self.encoding = "msgpack" if binary else "json"
        if undecodable is None and kind in ("set_mode_binary", "set_mode_text"):
            self.fixed = "msgpack" if kind == "set_mode_binary" else "json"
        command = _Command(kind="undecodable" if frame_ is None else str(frame_.get("command")))
        self.line.append(command)
        command.starts = kind == "run_job" and undecodable is None
        got, effects = self._io(lambda: self.peer.feed(wire))
        asks = [e for e in effects if isinstance(e, JobCommand)]
        assert all(isinstance(e, JobCommand | StartJob) for e in effects), effects
        assert len(asks) <= 1, effects
        if asks:
            command.op = asks[0].op_id
            assert command.op not in self.pending and command.op not in self.answered
            self.pending[command.op] = command
        self._started(effects)
        self._match(got)

    @precondition(lambda self: bool(self.pending))
    @rule(
        pick=st.integers(0, 7),
        value=st.sampled_from(["status", "events", "no_events", "none", "error_text", "junk"]),
    )
    def runner_answers(self, pick: int, value: str) -> None:
        ops = sorted(self.pending)
        op = ops[pick % len(ops)]
        command = self.pending.pop(op)
        self.answered.append(op)
        command.answered = True
        command.answer = _job_value(value, self._job(pick))
        got, effects = self._io(lambda: self.peer.job_command_done(op, command.answer))
        assert all(isinstance(e, StartJob) for e in effects), effects
        self._started(effects)
        self._match(got)

    @precondition(lambda self: bool(self.answered) or bool(self.pending))
    @rule(pick=st.integers(0, 7), unknown=st.booleans())
    def runner_answers_again(self, pick: int, unknown: bool) -> None:
        """A second answer for an op, or one for an op never asked: nothing happens."""
        ops = [10_000] if unknown or not self.answered else self.answered
        op = ops[pick % len(ops)]
        self._silent(lambda: self.peer.job_command_done(op, {"x": 1}))

    @rule(pick=st.integers(0, 7), kind=st.sampled_from(["job_update", "node_update", "done"]))
    def runner_sends_event(self, pick: int, kind: str) -> None:
        """An event of a job: forwarded at once, or held in line behind replies not yet
        written; always held while its job's ``run_job`` reply has not gone out."""
        job_id = self._job(pick)
        event: dict[str, Any] = {"type": kind, "job_id": job_id, "workflow_id": "wf"}
        if kind == "done":
            event.update(type="job_update", status="completed", result={"out": ["x"]})
        open_before = self.delivered()
        got, effects = self._io(lambda: self.peer.job_event(job_id, event))
        assert not effects, effects
        if not open_before:
            return
        unannounced = job_id in self.jobs and job_id not in self.announced
        if unannounced:
            assert got == [], f"an event overtook its job's run_job reply: {got}"
        if got:
            assert [g.frame for g in got] == [event], got
        else:
            self.held.append(event)  # in line behind replies not yet written
            assert self.line, f"an event held back with nothing before it: {event}"


TestPredictSocket = PredictSocket.TestCase
TestPredictSocket.settings = machine_settings(examples=80, steps=40)


# =================================================================================================
# Regressions: what the machines found, shrunk to the smallest deterministic case
# =================================================================================================


def test_regression_1_no_output_after_eof_when_a_job_event_arrives() -> None:
    """PredictSocket, first run: a job event after the client's EOF wrote a frame after
    ``CloseTransport`` (fixed in a34b50d while this file was being written)."""
    peer = RunnerPeer.opened_at(EngineConfig(workflows=(WORKFLOW,)), "/predict")
    peer.eof()
    assert peer.transport_closed()
    wire = len(peer.wire)
    peer.job_event("job-1", {"type": "job_update", "job_id": "job-1", "status": "running"})
    assert len(peer.wire) == wire
    assert peer.take() == []


def test_regression_2_chat_turn_asks_for_no_work_after_our_close() -> None:
    """ChatSocket: once our keep-alive ping went unanswered and we sent Close 1011, the turn
    kept running: the thread store's answer started a provider call (a client tool's timeout
    did too, and a provider answer would start a tool run) for a socket that could no longer
    hear anything, until the peer answered the Close or ``ws_close_timeout`` passed. A
    shutdown's 1001 stopped the session first; this Close did not."""
    peer = RunnerPeer.opened_at(EngineConfig(), "/chat")
    peer.timer(T0 + 20)  # the keep-alive ping goes out
    assert peer.pings
    peer.send_json({"type": "message", "role": "user", "content": "hi"})
    opening = [e for e in peer.take_effects() if isinstance(e, OpenThread)]
    assert len(opening) == 1
    peer.timer(T0 + 40)  # no pong: Close 1011
    assert peer.close_code() == 1011
    peer.take_effects()
    peer.opened(opening[0].op_id, list(opening[0].append))
    work = [e for e in peer.take_effects() if isinstance(e, CallProvider | RunTool | OpenThread)]
    assert work == []


def test_regression_3_predict_decode_error_does_not_overtake_a_waiting_reply() -> None:
    """PredictSocket: replies go out in command order (a reply never overtakes one still
    waiting for the job runner), but the error reply to a frame that failed to decode was
    written at once, ahead of the reply to an earlier ``get_status``: a client that pairs
    replies with its frames in order took the decode error for the status."""
    peer = RunnerPeer.opened_at(EngineConfig(workflows=(WORKFLOW,)), "/predict")
    peer.send_json({"command": "get_status", "data": {"job_id": "job-1"}})
    asks = [e for e in peer.take_effects() if isinstance(e, JobCommand)]
    assert len(asks) == 1 and peer.take() == []
    peer.send_text("{")  # not JSON
    assert peer.take() == [], "the decode error overtook the get_status reply"
    status = {"job_id": "job-1", "workflow_id": "wf", "status": "running"}
    peer.job_command_done(asks[0].op_id, status)
    frames = peer.take_frames()
    assert frames[0] == status
    assert frames[1]["error"] == "invalid_message"


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD /health HTTP/1.1\r\nHost: wirechat.test\r\n",  # then the head timeout: 408
        b"HEAD /health HTTP/1.1\r\nHost: wirechat.test\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\n",  # refused at once: 400
    ],
    ids=["408", "400"],
)
def test_regression_4_fatal_reply_to_a_head_request_has_no_body(head: bytes) -> None:
    """HttpConnection (a 2000-example run): the replies written without h11 when a request
    is refused (408 for a slow head, 400/413/431 for a bad one) carried a body even when the
    request line already said HEAD. A client reads no body after a HEAD (RFC 9110 §9.3.2),
    so those bytes were junk on the wire to it: the h11 client oracle failed with "Got data
    when expecting EOF". (Before the request line is complete, the server cannot know.)"""
    server = ServerConnection(EngineConfig(), T0)
    server.receive_data(head, T0)
    server.handle_timer(T0 + 11)
    data = server.data_to_send()
    assert data.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 400 ")), data[:40]
    assert data.endswith(b"\r\n\r\n"), f"a body after the head: {data[data.find(b'{') :][:60]!r}"


def test_regression_5_a_job_event_does_not_overtake_its_run_job_reply() -> None:
    """PredictSocket: ``run_job``'s reply waits behind an earlier command still waiting for
    the runner, but its ``StartJob`` went out at once and the job's first events were
    written before "Job started": the client saw events of a job it had not been told of
    (against the rule in ``PredictSession._run_job``: the reply goes first)."""
    peer = RunnerPeer.opened_at(EngineConfig(workflows=(WORKFLOW,)), "/predict")
    peer.send_json({"command": "get_status", "data": {"job_id": "other"}})
    asks = [e for e in peer.take_effects() if isinstance(e, JobCommand)]
    peer.send_json({"command": "run_job", "data": {"workflow_id": "wf"}})
    starts = [e for e in peer.take_effects() if isinstance(e, StartJob)]
    if starts:  # the job may also start only once its reply is out
        job_id = starts[0].job_id
        peer.job_event(job_id, {"type": "job_update", "job_id": job_id, "status": "running"})
    peer.job_command_done(asks[0].op_id, None)
    starts += [e for e in peer.take_effects() if isinstance(e, StartJob)]
    assert len(starts) == 1
    frames = peer.take_frames()
    started = [i for i, f in enumerate(frames) if f.get("message") == "Job started"]
    events = [i for i, f in enumerate(frames) if f.get("type") == "job_update"]
    assert len(started) == 1
    assert all(i > started[0] for i in events), frames
