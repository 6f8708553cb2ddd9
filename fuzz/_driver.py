"""The engine side of every fuzz target: a ``ServerConnection`` driven the way the transport
drives it, and independent oracles that read what it writes.

Rules of this module:

* :class:`Driver` feeds inputs, and after *every* input pulls ``data_to_send()`` and
  ``effects()``, and answers each effect at once, in order: ``CallProvider`` with text
  deltas and ``provider_done`` (or what the :class:`Script` says), the store, tools, the job
  runner, model listing. It checks the engine's own promises as it goes: no bytes after
  ``CloseTransport`` or after the peer's EOF, no deadline once closed, bounded work.
* The oracles are other people's parsers: an ``h11`` client for HTTP responses, a ``wsproto``
  client for WebSocket frames, ``json`` (NaN refused) and ``msgpack`` for frame payloads.
  Whatever they refuse is a finding.
* Any exception out of here is a finding; ``AssertionError`` names the broken invariant.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import msgpack  # type: ignore[import-untyped]
from _fuzzkit import KNOWN
from wirechat.engine import (
    AuthMode,
    CallProvider,
    CloseTransport,
    ConnectionFailed,
    EngineConfig,
    Finish,
    ModelInfo,
    Output,
    ProviderError,
    ProviderItem,
    RequestCompleted,
    ServerConnection,
    StaticKey,
    Surface,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from wirechat.engine.chat import WorkflowSpec
from wirechat.engine.events import (
    JobCommand,
    ListModels,
    OpenThread,
    RenderMetrics,
    RequestAbandoned,
    RunTool,
    SaveMessages,
    StartJob,
    VerifyToken,
)
from wirechat.engine.limits import KeyLimits
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)

T0 = 1_700_000_000.0
HOST = "fuzz.test"
TOKEN = "sk-fuzz-token"
MAX_ANSWERS = 1_000  # effects answered for one input: past this the engine loops
MAX_TIMER_ROUNDS = 8

WORKFLOWS = (
    WorkflowSpec(id="summarize", name="Summarize", inputs=("message",)),
    WorkflowSpec(id="echo_graph", name="Echo graph", inputs=("message",)),
)
SERVER_TOOLS = (
    ToolSpec(
        name="calculator",
        description="Adds numbers",
        parameters={"type": "object", "properties": {"a": {"type": "number"}}},
    ),
    ToolSpec(name="search", description="Searches"),
)
MODELS = (
    ModelInfo(id="echo", owned_by="wirechat"),
    ModelInfo(id="meta-llama/Llama-3", owned_by="local", created=1),
)

# Close codes the engine itself sends (PROTOCOL.md §4, websocket.py); a close that answers
# the client's own Close echoes the client's code instead.
ENGINE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011})


def _configs() -> tuple[EngineConfig, ...]:
    common: dict[str, Any] = {"server_tools": SERVER_TOOLS, "workflows": WORKFLOWS}
    return (
        # 0: the defaults, everything exposed, CORS for any origin.
        EngineConfig(cors_origins=("*",), **common),
        # 1: tiny limits, so the fuzzer reaches every limit with short inputs.
        EngineConfig(
            max_head_bytes=256,
            max_request_line_bytes=96,
            max_header_count=6,
            max_header_field_bytes=96,
            max_body_bytes=300,
            max_pipelined_bytes=300,  # not below max_head_bytes: a head must fit
            max_ws_message_bytes=120,
            max_depth=4,
            max_tool_rounds=2,
            # Short timeouts, and keep-alive pings rarer than every other deadline, so the
            # clock reaches the provider, tool and client-tool timeouts before a ping's.
            head_timeout=1.0,
            body_timeout=1.0,
            keepalive_timeout=1.0,
            provider_first_item_timeout=3.0,
            provider_idle_timeout=2.0,
            client_tool_timeout=5.0,
            tool_timeout=4.0,
            ws_ping_interval=100.0,
            ws_close_timeout=1.0,
            shutdown_grace=2.0,
            cors_origins=("https://app.test",),
            **common,
        ),
        # 2: supabase auth (the static token passes at once; any other token is judged by
        # the fake auth provider, per the script), a key with small limits, the worker
        # surface (no /chat).
        EngineConfig(
            auth_mode=AuthMode.SUPABASE,
            static_keys=(
                StaticKey.from_token(
                    TOKEN,
                    "fuzzer",
                    KeyLimits(requests_per_minute=3, concurrent_streams=1, models=("echo",)),
                ),
            ),
            surface=Surface.WORKER,
            auth_timeout=2.0,
            **common,
        ),
        # 3: the OpenAI-only surface, auth off, no tools or workflows.
        EngineConfig(surface=Surface.CHAT_SERVER, auth_mode=AuthMode.NONE),
    )


CONFIGS = _configs()


@dataclass(frozen=True, slots=True)
class Script:
    """How the fake outside world answers the engine's effects (the allowed test double).

    ``provider``: 0 text deltas then done; 1 fail before the first item; 2 one delta then
    fail; 3 a call of an offered tool (text when none is offered) then done; 4 nothing then
    done; 5 never answer (the engine's timers must end it); 6 one delta, then never answer;
    7 a call of a tool nobody offered, every time (a model that will not stop calling tools).
    ``world``: 0 store and tools work; 1 the store fails; 2 tools fail; 3 tools never answer.
    """

    provider: int = 0
    texts: tuple[str, ...] = ("Hello", ", fuzz", "!\n\ndata: [DONE]\n\n")
    usage: bool = False
    world: int = 0
    job_answer: int = 0  # which shape of answer JobCommand gets (see Driver._job_value)

    @classmethod
    def from_byte(cls, value: int) -> Script:
        return cls(
            provider=value & 7,
            usage=bool(value & 8),
            world=value >> 4 & 3,
            job_answer=value >> 6,
        )


class Unbounded(AssertionError):
    """The engine kept asking for work: a loop the peer (or a provider) can drive."""


@dataclass(slots=True)
class Driver:
    config: EngineConfig
    script: Script = field(default_factory=Script)
    now: float = T0
    conn: ServerConnection = field(init=False)
    out: bytearray = field(default_factory=bytearray)
    outputs: list[Output] = field(default_factory=list)
    closed_by_server: bool = False  # CloseTransport seen before the peer's EOF
    eof_sent: bool = False
    calls: int = 0  # CallProvider effects seen
    _answers: int = 0
    _queue: deque[Output] = field(default_factory=deque)
    _held: deque[bytes] = field(default_factory=deque)  # not read while reading_paused

    def __post_init__(self) -> None:
        self.conn = ServerConnection(self.config, self.now)

    @property
    def closed(self) -> bool:
        return self.closed_by_server or self.eof_sent

    # --- inputs from the peer -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the peer, held back like a transport does while ``reading_paused``."""
        self._held.append(data)
        self._read()

    def _read(self) -> None:
        while self._held and not self.conn.reading_paused and not self.conn.closed:
            self.now += 0.001
            self.conn.receive_data(self._held.popleft(), self.now)
            self._pump()
        # Reading pauses only behind a request being answered (never on a head in progress).
        paused = self.conn.reading_paused and not self.conn.closed
        # (A WebSocket whose token is still being judged holds its frames: "websocket".)
        assert not paused or self.conn.phase.value in ("working", "streaming", "websocket"), (
            self.conn.phase
        )

    def shutdown(self) -> None:
        """The server begins a graceful shutdown."""
        self.now += 0.001
        self.conn.start_shutdown(self.now)
        self._pump()

    def eof(self) -> None:
        if self.eof_sent:
            return
        self.eof_sent = True
        self.now += 0.001
        self.conn.receive_eof(self.now)
        assert self.conn.data_to_send() == b"", "bytes written after the peer's EOF"
        self._pump()
        assert self.conn.closed, "still open after the peer's EOF"

    def run_timers(self, rounds: int = MAX_TIMER_ROUNDS) -> None:
        """Let the clock run to ``next_deadline()`` up to ``rounds`` times."""
        for _ in range(rounds):
            deadline = self.conn.next_deadline()
            if deadline is None or self.eof_sent:
                return
            assert deadline == deadline and deadline < float("inf"), deadline
            self.now = max(self.now, deadline)
            self.conn.handle_timer(self.now)
            self._pump()
            self._read()
            again = self.conn.next_deadline()
            # A deadline not moved past ``now`` would make the transport's timer spin.
            assert again is None or again > self.now, (again, self.now)

    # --- the outside world ----------------------------------------------------------------

    def _pull(self) -> None:
        data = self.conn.data_to_send()
        if data:
            assert not self.closed_by_server, "bytes written after CloseTransport"
            assert not self.eof_sent, "bytes written after the peer's EOF"
            self.out += data
        for output in self.conn.effects():
            self.outputs.append(output)
            self._queue.append(output)
            if isinstance(output, CloseTransport) and not self.eof_sent:
                self.closed_by_server = True
        if self.conn.closed:
            assert self.conn.next_deadline() is None, "a deadline on a closed connection"

    def _pump(self) -> None:
        self._pull()
        while self._queue:
            self._answers += 1
            if self._answers > MAX_ANSWERS:
                raise Unbounded(f"more than {MAX_ANSWERS} effects for one input")
            self._answer(self._queue.popleft())
            self._pull()

    def _answer(self, effect: Output) -> None:
        conn, now, script = self.conn, self.now, self.script
        if isinstance(effect, CallProvider):
            self.calls += 1
            self._provide(effect)
        elif isinstance(effect, ListModels):
            conn.models_listed(effect.stream_id, MODELS, now)
        elif isinstance(effect, OpenThread):
            if script.world == 1:
                conn.store_failed(effect.op_id, "The thread store is down", now)
            else:
                conn.thread_opened(effect.op_id, list(effect.append), now)
        elif isinstance(effect, SaveMessages):
            if script.world == 1:
                conn.store_failed(effect.op_id, "The thread store is down", now)
            else:
                conn.messages_saved(effect.op_id, now)
        elif isinstance(effect, RunTool):
            if script.world == 2:
                conn.tool_finished(effect.op_id, False, None, "The tool broke", now)
            elif script.world != 3:
                conn.tool_finished(
                    effect.op_id, True, {"value": 42, "args": effect.arguments}, None, now
                )
        elif isinstance(effect, StartJob):
            base = {"job_id": effect.job_id, "workflow_id": effect.workflow_id}
            conn.job_event(effect.job_id, {"type": "job_update", "status": "running", **base}, now)
            self._pull()
            conn.job_event(
                effect.job_id,
                {"type": "node_update", "node_id": "n1", "status": "completed", **base},
                now,
            )
            self._pull()
            final = (
                {"status": "completed", "result": {"output": ["done", 1]}}
                if script.job_answer != 3
                else {"status": "failed", "error": "The graph failed"}
            )
            conn.job_event(effect.job_id, {"type": "job_update", **final, **base}, now)
        elif isinstance(effect, JobCommand):
            conn.job_command_done(effect.op_id, self._job_value(effect), now)
        elif isinstance(effect, VerifyToken):
            # The auth provider: accepts, is unreachable, refuses, or never answers.
            if script.world == 0:
                conn.token_verified(effect.op_id, "supabase-user", now)
            elif script.world == 1:
                conn.token_check_failed(effect.op_id, "the auth provider is down", now)
            elif script.world == 2:
                conn.token_verified(effect.op_id, None, now)
        elif isinstance(effect, RenderMetrics):
            conn.metrics_rendered(effect.stream_id, b"# no metrics\n", "text/plain", now)
        # CancelProvider, CancelTool, CancelJob, CloseTransport and the notices need no answer.

    def _provide(self, call: CallProvider) -> None:
        conn, now, script = self.conn, self.now, self.script
        sid = call.stream_id
        kind = script.provider
        if kind == 1:
            error = ProviderError("upstream down", status=503, retry_after=1.5)
            conn.provider_failed(sid, error, now)
            return
        if kind == 5:
            return  # a provider that hangs: only the engine's timers can end this call
        items: list[ProviderItem] = []
        if kind == 3 and call.request.tools:
            tool = call.request.tools[self.calls % len(call.request.tools)]
            items.append(ToolCall(id=f"call_{self.calls}", name=tool.name, arguments='{"a": 1}'))
        elif kind == 7:
            items.append(ToolCall(id=f"call_{self.calls}", name="hallucinated", arguments="{}"))
        elif kind != 4:
            items += [TextDelta(text=t) for t in script.texts[: 1 if kind in (2, 6) else None]]
        if script.usage:
            items.append(Finish(reason=None, usage=Usage(prompt_tokens=3, completion_tokens=2)))
        for item in items:
            conn.provider_chunk(sid, item, now)
            self._pull()
        if kind == 2:
            conn.provider_failed(sid, ProviderError("lost the upstream", status=502), now)
        elif kind != 6:
            conn.provider_done(sid, now)

    def _job_value(self, command: JobCommand) -> object:
        variant = self.script.job_answer
        job_id = command.data.get("job_id")
        if command.command == "get_status":
            if not job_id:
                return [{"job_id": "j1", "status": "running"}] if variant else []
            return {"job_id": job_id, "status": "running"} if variant != 1 else None
        if command.command == "cancel_job":
            return {"job_id": job_id, "workflow_id": "summarize"} if variant != 1 else None
        if command.command == "reconnect_job":
            if variant == 1:
                return None
            return [{"type": "job_update", "status": "running", "job_id": job_id}]
        return {"workflow_id": "summarize"} if variant != 2 else "The job does not take input"


# --- oracles ---------------------------------------------------------------------------------


class NotJson(AssertionError):
    """The server wrote NaN or Infinity on a JSON frame or body (finding ``nan-json``)."""


def _refuse_constant(name: str) -> Any:
    raise NotJson(f"the server wrote {name}, which is not JSON")


def strict_json(text: str | bytes) -> Any:
    if "nan-json" in KNOWN:
        return json.loads(text)
    return json.loads(text, parse_constant=_refuse_constant)


@dataclass(slots=True)
class HttpReply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""
    method: str = "GET"
    fatal: bool = False  # a reply with no RequestCompleted (ConnectionFailed): comes last


@dataclass(slots=True)
class HttpResult:
    informational: list[int] = field(default_factory=list)
    replies: list[HttpReply] = field(default_factory=list)
    ws_bytes: bytes | None = None  # what followed a 101


def check_error_envelope(payload: Any) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error", "detail"}, payload
    error = payload["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert payload["detail"] == error["message"], payload


def sse_payloads(body: bytes) -> list[str]:
    """The exact framing wirechat promises: ``data: <text>\\n\\n`` events and nothing else."""
    assert b"\r" not in body, "CR in an SSE body"
    if not body:
        return []
    assert body.endswith(b"\n\n"), body[-40:]
    out = []
    for raw in body[:-2].split(b"\n\n"):
        assert raw.startswith(b"data: ") and b"\n" not in raw, raw[:80]
        out.append(raw[6:].decode("ascii"))
    return out


def check_http(driver: Driver) -> HttpResult:
    """Parse everything the server wrote with an ``h11`` client and check each reply.

    The client replays one request per ``RequestCompleted`` notice (same method, an upgrade
    where the status was 101), so HEAD and 101 replies are read as a real client reads them.
    A fatal reply (``ConnectionFailed``) has no notice and comes last. An exchange the client
    left before its answer was complete (``RequestAbandoned``, logged 499) comes last too;
    its reply, if its stream began, carries the status it began with.
    """
    out = bytes(driver.out)
    assert not out or out.startswith(b"HTTP/1.1 "), out[:60]
    # An abandoned exchange has a reply on the wire only if its stream had begun.
    completed = deque(
        o.record if isinstance(o, RequestAbandoned) else o
        for o in driver.outputs
        if isinstance(o, RequestCompleted)
        or (isinstance(o, RequestAbandoned) and o.record.streamed)
    )
    failures = [o for o in driver.outputs if isinstance(o, ConnectionFailed)]
    result = HttpResult()
    client = h11.Connection(h11.CLIENT)
    expected: RequestCompleted | None = None

    def send_request() -> None:
        nonlocal expected
        expected = completed.popleft() if completed else None
        method = expected.method if expected is not None else "GET"
        headers = [("host", HOST)]
        if expected is not None and expected.status == 101:
            headers += [("connection", "Upgrade"), ("upgrade", "websocket")]
        client.send(h11.Request(method=method, target="/", headers=headers))
        client.send(h11.EndOfMessage())

    if out:
        send_request()
    client.receive_data(out)
    if driver.closed_by_server:
        client.receive_data(b"")
    reply: HttpReply | None = None
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        if event is h11.PAUSED:
            if client.their_state is h11.SWITCHED_PROTOCOL:
                result.ws_bytes = client.trailing_data[0]
                break
            assert client.our_state is h11.DONE and client.their_state is h11.DONE
            client.start_next_cycle()
            send_request()
            continue
        if isinstance(event, h11.InformationalResponse):
            result.informational.append(event.status_code)
            if event.status_code == 101:
                assert expected is not None and expected.status == 101
        elif isinstance(event, h11.Response):
            method = expected.method if expected is not None else "GET"
            reply = HttpReply(
                event.status_code, dict(event.headers), method=method, fatal=expected is None
            )
            if expected is not None:
                assert expected.status in (event.status_code, 499), (expected, event.status_code)
            else:
                assert failures, f"a {event.status_code} reply with no notice"
        elif isinstance(event, h11.Data):
            assert reply is not None
            reply.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert reply is not None
            _check_reply(reply)
            result.replies.append(reply)
            reply = None
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
                if client.trailing_data[0]:
                    send_request()
    assert not completed, f"{len(completed)} notices without a reply"
    return result


def _check_reply(reply: HttpReply) -> None:
    headers = reply.headers
    assert b"x-request-id" in headers, reply
    if reply.method == "HEAD" or reply.status in (204, 304):
        return
    kind = headers.get(b"content-type", b"")
    if reply.fatal and not reply.body and headers.get(b"content-length") == b"0":
        return  # a refused HEAD: no body may follow, and a fatal reply has no method to tell
    if kind == b"text/event-stream":
        payloads = sse_payloads(reply.body)
        assert payloads and payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, payloads
        for payload in payloads[:-1]:
            assert isinstance(strict_json(payload), dict), payload
    else:
        assert kind == b"application/json", reply
        if not reply.body and reply.status >= 400:
            return  # a refused HEAD: "content-length: 0", no envelope (RFC 9110 §9.3.2)
        body = strict_json(reply.body)
        if reply.status >= 400:
            check_error_envelope(body)


# --- WebSocket -------------------------------------------------------------------------------


WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: fixed, so every input replays


def upgrade_bytes(target: str, key: str = WS_KEY) -> bytes:
    """A client's upgrade request for ``target`` (what wsproto writes, with a fixed key)."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("latin-1")


@dataclass(slots=True)
class WsResult:
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    pings: int = 0


def check_ws(data: bytes, client_close_codes: Sequence[int] | None = None) -> WsResult:
    """Read the server's frames with a wsproto client: every frame well-formed and unmasked,
    every message a JSON or MessagePack object, nothing after the Close, a valid close code
    (one the engine uses, or the client's own code echoed)."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    result = WsResult()
    parts: list[str | bytes] = []
    for event in client.events():
        assert result.close_code is None, f"{event!r} after the server's Close"
        if isinstance(event, CloseConnection):
            assert client.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED), (
                f"the server wrote a malformed frame: {event.reason}"
            )
            result.close_code = int(event.code)
            if client_close_codes is not None and event.code != 1005:
                allowed = ENGINE_CLOSE_CODES | set(client_close_codes)
                assert event.code in allowed, f"close code {event.code}"
        elif isinstance(event, TextMessage | BytesMessage):
            parts.append(event.data if isinstance(event.data, str) else bytes(event.data))
            if event.message_finished:
                result.messages.append(_decode_message(parts))
                parts = []
        elif isinstance(event, Ping):
            result.pings += 1
        else:
            assert isinstance(event, Pong), event
    assert not parts, "an unfinished message from the server"
    return result


def _decode_message(parts: list[str | bytes]) -> dict[str, Any]:
    if isinstance(parts[0], str):
        value = strict_json("".join(str(p) for p in parts))
    else:
        value = msgpack.unpackb(b"".join(p for p in parts if isinstance(p, bytes)), raw=False)
    assert isinstance(value, dict), value
    return value
