"""``ServerConnection``: one client socket's worth of protocol, with no I/O at all.

Rules of this module:

* Inputs are method calls, each taking ``now`` (Unix seconds, from the caller's clock):
  ``receive_data``, ``receive_eof``, ``provider_chunk``, ``provider_done``,
  ``provider_failed``, ``models_listed``, ``handle_timer``, ``start_shutdown``.
  After *every* input the caller pulls ``data_to_send()`` (write it), ``effects()`` (carry
  them out, in order) and ``next_deadline()`` (re-arm its one timer), and honours
  ``reading_paused``.
* Bad bytes from the peer never raise out of an input: they become a 4xx reply and a
  ``CloseTransport`` effect. Any other exception is a bug in the engine.
* One request is handled at a time (HTTP/1.1 pipelining is answered in order). The bytes of
  each request head are checked by ``http_head`` *before* h11 sees them, so a fresh
  ``h11.Connection`` reads each request and pipelined bytes wait in ``_inbuf``. Responses
  are written by ``http_response`` (the 100 and 101 interim answers still by h11).
* The response head of a completion goes out only with the provider's first item, so every
  failure before the first token is a plain HTTP error (reference/openai-compat.md §4.1).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import h11

from . import openai, sse
from .app_socket import AppSocket
from .auth import LOCAL_USER, authenticate, bearer_token, query_token
from .chat import ChatMessage, ModelInfo, ProviderError, ProviderItem
from .chat_session import ChatSession
from .completion import CompletionRun
from .config import EngineConfig, MetricsAccess, StaticKey
from .errors import RemoteProtocolError, RequestError, request_error_for
from .events import (
    CallProvider,
    CancelJob,
    CancelProvider,
    CloseTransport,
    ConnectionFailed,
    FirstTokenSent,
    ListModels,
    Output,
    ProviderFailed,
    RenderMetrics,
    RequestAbandoned,
    RequestCompleted,
    StartJob,
    UsageReported,
    VerifyToken,
    WebSocketClosed,
)
from .exchange import (
    REQUEST_ID,
    Exchange,
    access_record,
    answer_headers,
    auth_error,
    auth_unavailable,
    fatal_response,
    model_not_found,
    new_id,
    preflight_headers,
)
from .http_head import ChunkedBodyCheck, check_request_head
from .http_response import LAST_CHUNK, keeps_alive, response_head
from .limits import Admission, Ticket
from .openapi import OPENAPI_JSON
from .predict_session import PredictSession
from .routing import Endpoint, route, split_target
from .state import Input, Phase, earliest, next_phase
from .ws_handshake import accept_token, handshake_key

# Endpoints whose request body we read (every other body is counted and dropped).
_BODY_ENDPOINTS = (Endpoint.CHAT_COMPLETIONS, Endpoint.WORKFLOW_RUN, Endpoint.WORKFLOW_STREAM)
_JOB_DONE = ("completed", "failed", "cancelled")
_WS_ENDPOINTS = (Endpoint.CHAT_WS, Endpoint.PREDICT_WS)


@dataclass(slots=True)
class _AuthWait:
    """A token the auth provider is judging: ``VerifyToken(op_id)`` is out."""

    op_id: int
    deadline: float  # past it, the provider counts as unavailable (503 / close 1011)
    predict: bool | None = None  # set once a WebSocket's 101 is out: which socket waits


class ServerConnection:
    def __init__(
        self, config: EngineConfig, now: float, *, admission: Admission | None = None
    ) -> None:
        """``admission``: the rate-limit and in-flight bookkeeping shared by every connection
        of the server (``limits.Admission``); without one, this connection keeps its own."""
        self.config = config
        self._admission = admission or Admission(config.max_inflight_generations)
        self._phase = Phase.IDLE
        self._inbuf = bytearray()  # bytes of requests h11 has not been given yet
        self._out = bytearray()
        self._outputs: list[Output] = []
        self._h11: h11.Connection | None = None
        self._ex: Exchange | None = None
        self._next_stream_id = 1
        self._socket: AppSocket | None = None  # after a /chat or /predict upgrade
        self._chunk_check: ChunkedBodyCheck | None = None
        # A new connection must send a head within the head timeout, like one kept alive.
        self._deadline: float | None = now + config.head_timeout
        self._shutdown_deadline: float | None = None
        self._auth: _AuthWait | None = None  # supabase: the verdict the request waits for

    # --- outputs ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket, in order. Empties the buffer."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def effects(self) -> list[Output]:
        """Effects to carry out and notices to log, in the order they arose. Empties them."""
        outputs = self._outputs.copy()
        self._outputs.clear()  # in place: the /chat session holds its bound append
        return outputs

    @property
    def has_output(self) -> bool:
        """Whether ``data_to_send()`` or ``effects()`` holds anything: lets a transport skip
        its whole output pass after an input that produced nothing (a token of a
        non-streamed answer), which is most inputs. The deadline may have moved *later*
        meanwhile; a timer that fires before it is harmless (``handle_timer``)."""
        return bool(self._out) or bool(self._outputs)

    @property
    def has_only_data(self) -> bool:
        """Whether the last input produced bytes and nothing else (no effect, no notice):
        a streamed token, nearly always. The transport may then write ``data_to_send()``
        and skip the rest of its pass, as after an input with no output at all: such an
        input moves no deadline earlier and changes nothing about reading. Never during a
        shutdown, when a token's input may also start a close (and its close timer)."""
        return not self._outputs and bool(self._out) and self._shutdown_deadline is None

    def next_deadline(self) -> float | None:
        """When to call ``handle_timer`` next (same clock as ``now``), or ``None``."""
        if self._phase is Phase.CLOSED:
            return None
        deadline = self._socket.next_deadline() if self._socket is not None else self._deadline
        return earliest(deadline, self._shutdown_deadline)

    @property
    def reading_paused(self) -> bool:
        """True while the peer has pipelined more than we are willing to hold."""
        return len(self._inbuf) > self.config.max_pipelined_bytes

    @property
    def closed(self) -> bool:
        return self._phase is Phase.CLOSED

    @property
    def phase(self) -> Phase:
        return self._phase

    # --- what is in progress, for a metrics scrape (read-only) ---------------------------

    @property
    def websocket(self) -> str | None:
        """``"chat"`` or ``"predict"`` while a WebSocket session is open, else ``None``."""
        socket = self._socket
        return socket.endpoint if socket is not None and not self.closed else None

    @property
    def streams(self) -> int:
        """Answers streaming right now: an SSE response under way, or a ``/chat`` turn."""
        if self._phase is Phase.STREAMING:
            return 1
        socket = self._socket
        return int(socket is not None and not self.closed and socket.session.busy)

    # --- inputs from the socket -----------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the peer (``b""`` is ignored; EOF is ``receive_eof``)."""
        if not data or self._phase is Phase.CLOSED:
            return
        if self._socket is not None:
            self._socket.receive_data(data, now)
            self._flush_socket(now)
            return
        try:
            if self._phase is Phase.BODY:
                assert self._h11 is not None
                self._deadline = now + self.config.body_timeout
                if self._chunk_check is not None:
                    self._chunk_check.feed(data)
                self._h11.receive_data(data)
                self._read_request(now)
            else:
                self._inbuf += data
            self._advance(now)
        except (RemoteProtocolError, h11.RemoteProtocolError) as exc:
            self._fail(exc, now)

    def receive_eof(self, now: float) -> None:
        """The peer closed its side: whatever is in progress is abandoned."""
        if self._phase is Phase.CLOSED:
            return
        if self._socket is not None:
            self._socket.session.close()
        ex = self._ex
        if ex is not None and self._phase in (Phase.WORKING, Phase.STREAMING):
            # A request read whole, its answer not complete: still one access-log line.
            streamed = self._phase is Phase.STREAMING
            self._outputs.append(
                RequestAbandoned(record=access_record(ex, 499, now, streamed=streamed))
            )
        self._cancel_work()
        self._close_socket(now)

    # --- inputs from providers ------------------------------------------------------

    def provider_chunk(self, stream_id: int, item: ProviderItem, now: float) -> None:
        """One item of the provider stream ``stream_id`` (ignored if that call is over)."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.provider_chunk(stream_id, item, now)
            self._flush_socket(now)
            return
        ex = self._ex  # _active(), inlined: this runs once per token
        if ex is None or ex.stream_id != stream_id or ex.run is None or self._phase is Phase.CLOSED:
            return
        self._deadline = now + self.config.provider_idle_timeout
        out = ex.run.item(item)
        if out:
            self._stream(ex, out, now)

    def provider_done(self, stream_id: int, now: float) -> None:
        """The provider stream ``stream_id`` ended normally."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.provider_done(stream_id, now)
            self._flush_socket(now)
            return
        ex = self._active(stream_id)
        if ex is None or ex.run is None:
            return
        run = ex.run
        out = run.choice_done()
        if run.stream:
            self._stream(ex, out, now)
        if run.has_more_choices:
            run.next_choice()
            self._call_provider(ex, now)
            return
        ex.stream_id = None
        self._release(ex)  # before the head: its x-ratelimit-* count this request's tokens
        if run.usage.total_tokens:
            self._outputs.append(
                UsageReported(
                    route=Endpoint.CHAT_COMPLETIONS.value,
                    model=run.parsed.request.model,
                    prompt_tokens=run.usage.prompt_tokens,
                    completion_tokens=run.usage.completion_tokens,
                )
            )
        if run.stream:
            self._stream(ex, run.stream_end(), now)
            self._end_stream(ex, now)
        else:
            self._respond(ex, 200, run.completion_body(), now)
        self._advance(now)

    def provider_failed(self, stream_id: int, error: ProviderError, now: float) -> None:
        """The provider call (or model listing) ``stream_id`` failed with ``error``."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.provider_failed(stream_id, error, now)
            self._flush_socket(now)
            return
        ex = self._active(stream_id)
        if ex is None:
            return
        ex.stream_id = None
        self._outputs.append(
            ProviderFailed(
                route=ex.route.endpoint.value if ex.route is not None else "unknown",
                model=ex.run.parsed.request.model if ex.run is not None else "",
                status=error.status,
            )
        )
        if self._phase is Phase.STREAMING and ex.run is not None:
            # The 200 is out: the failure travels in the stream (reference §4.4).
            self._stream(ex, ex.run.error_events(error), now)
            self._end_stream(ex, now)
        else:
            self._respond_error(ex, request_error_for(error), now)
        self._advance(now)

    def models_listed(self, stream_id: int, models: Sequence[ModelInfo], now: float) -> None:
        """The answer to ``ListModels(stream_id)``."""
        ex = self._active(stream_id)
        if ex is None or ex.route is None:
            return
        ex.stream_id = None
        limits = ex.key.limits if ex.key is not None else None
        if limits is not None and limits.models:  # a key sees only the models it may use
            models = [m for m in models if limits.allows_model(m.id)]
        if ex.route.endpoint is Endpoint.MODEL:
            wanted = ex.route.model_id
            match = next((m for m in models if m.id == wanted), None)
            if match is None:
                self._respond_error(ex, model_not_found(wanted), now)
            else:
                self._respond(ex, 200, sse.dumps(openai.model_body(match)), now)
        else:
            self._respond(ex, 200, sse.dumps(openai.model_list_body(list(models))), now)
        self._advance(now)

    def metrics_rendered(self, stream_id: int, body: bytes, content_type: str, now: float) -> None:
        """The answer to ``RenderMetrics(stream_id)``: the exposition and its media type."""
        ex = self._active(stream_id)
        if ex is None:
            return
        ex.stream_id = None
        self._respond(ex, 200, body, now, content_type=content_type.encode("latin-1"))
        self._advance(now)

    def thread_opened(self, op_id: int, history: Sequence[ChatMessage], now: float) -> None:
        """The answer to ``OpenThread(op_id)``: the thread's messages, oldest first."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.thread_opened(op_id, history, now)
            self._flush_socket(now)

    def messages_saved(self, op_id: int, now: float) -> None:
        """The answer to ``SaveMessages(op_id)``: the messages are durable."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.messages_saved(op_id, now)
            self._flush_socket(now)

    def store_failed(self, op_id: int, message: str, now: float) -> None:
        """``OpenThread`` or ``SaveMessages`` ``op_id`` failed; ``message`` is for the user."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.store_failed(op_id, message, now)
            self._flush_socket(now)

    def tool_finished(
        self, op_id: int, ok: bool, result: object, error: str | None, now: float
    ) -> None:
        """The answer to ``RunTool(op_id)``: its JSON-able result, or an error text."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.tool_finished(op_id, ok, result, error, now)
            self._flush_socket(now)

    def job_event(self, job_id: str, event: dict[str, Any], now: float) -> None:
        """One event of job ``job_id`` (started here, or followed after ``reconnect_job``)."""
        if self._socket is not None:
            self._socket.session.job_event(job_id, event, now)
            self._flush_socket(now)
            return
        ex = self._ex
        if ex is None or ex.job_id != job_id or self._phase is Phase.CLOSED:
            return
        done = event.get("type") == "job_update" and event.get("status") in _JOB_DONE
        if ex.route is not None and ex.route.endpoint is Endpoint.WORKFLOW_STREAM:
            self._stream(ex, sse.event(event), now)
            if done:
                final = (
                    {"type": "complete", "job_id": job_id, "results": event.get("result") or {}}
                    if event.get("status") == "completed"
                    else {
                        "type": "error",
                        "job_id": job_id,
                        "error": event.get("error") or event.get("status"),
                    }
                )
                ex.job_id = None
                self._stream(ex, sse.event(final) + sse.DONE, now)
                self._end_stream(ex, now)
        elif done:
            ex.job_id = None
            status = event.get("status")
            if status == "completed":
                body = {"job_id": job_id, "status": status, "results": event.get("result") or {}}
                self._respond(ex, 200, sse.dumps(body), now)
            else:
                error = RequestError(
                    str(event.get("error") or f"The workflow was {status}"),
                    status=500 if status == "failed" else 409,
                    type="workflow_error",
                    code=str(status),
                )
                self._respond_error(ex, error, now)
        self._advance(now)

    def job_command_done(self, op_id: int, value: object, now: float) -> None:
        """The answer to ``JobCommand(op_id)``."""
        if self._socket is not None and isinstance(self._socket.session, PredictSession):
            self._socket.session.job_command_done(op_id, value)
            self._flush_socket(now)

    # --- inputs from the auth provider ----------------------------------------------

    def token_verified(self, op_id: int, user_id: str | None, now: float) -> None:
        """The answer to ``VerifyToken(op_id)``: the token's user id, or ``None`` when the
        provider refused the token (401 on HTTP, close 1008 on a WebSocket)."""
        self._auth_settled(op_id, user_id, "invalid" if user_id is None else None, "", now)

    def token_check_failed(self, op_id: int, message: str, now: float) -> None:
        """``VerifyToken(op_id)`` got no verdict (the provider is unreachable, slow or
        failing): 503 with ``Retry-After`` on HTTP, close 1011 on a WebSocket. Never a pass.
        ``message`` (no token in it) is shown to the client."""
        self._auth_settled(op_id, None, "unavailable", message, now)

    # --- inputs from the clock and the server ----------------------------------------

    def handle_timer(self, now: float) -> None:
        """Call when ``next_deadline()`` has passed (early calls are harmless)."""
        if self._phase is Phase.CLOSED:
            return
        if self._shutdown_deadline is not None and now >= self._shutdown_deadline:
            self._abandon("The server is shutting down", now)
            return
        if self._socket is not None:
            self._socket.handle_timer(now)
            self._flush_socket(now)
            return
        if self._deadline is None or now < self._deadline:
            return
        if self._phase is Phase.IDLE:
            self._close()  # keep-alive (or never-used) connection: close quietly
        elif self._phase in (Phase.HEAD, Phase.BODY):
            self._fail(RemoteProtocolError("Timed out reading the request", status=408), now)
        elif self._auth is not None:
            message = "the authentication provider did not answer in time"
            self._auth_settled(self._auth.op_id, None, "unavailable", message, now)
        else:
            ex = self._ex
            assert ex is not None and ex.stream_id is not None
            self._outputs.append(CancelProvider(stream_id=ex.stream_id))
            self.provider_failed(
                ex.stream_id,
                ProviderError(
                    "Timed out waiting for the model", status=504, type="timeout", code="timeout"
                ),
                now,
            )

    def start_shutdown(self, now: float) -> None:
        """The server is stopping: finish what is in flight (up to the grace period), take
        no new request, close idle connections now."""
        if self._phase is Phase.CLOSED or self._shutdown_deadline is not None:
            return
        self._shutdown_deadline = now + self.config.shutdown_grace
        if self._phase is Phase.IDLE and not self._inbuf:
            self._close()
        elif self._socket is not None:
            self._flush_socket(now)  # closes now unless a turn is running

    def _abandon(self, message: str, now: float) -> None:
        """Grace is over: end whatever is in flight with an error, then close."""
        if self._socket is not None:
            if isinstance(self._socket.session, ChatSession):
                self._socket.session.abandon(message)  # an error frame before the Close
            self._socket.close(1001, "server shutting down", now)
            self._out += self._socket.ws.data_to_send()
            self._close_socket(now)
            return
        ex = self._ex
        self._cancel_work()
        if ex is not None and self._phase is Phase.STREAMING and ex.run is not None:
            error = ProviderError(message, status=503, type="server_shutdown", code=None)
            self._stream(ex, ex.run.error_events(error), now)
            self._end_stream(ex, now)
        elif ex is not None and self._phase is Phase.WORKING:
            self._respond_error(
                ex,
                RequestError(
                    message, status=503, type="service_unavailable", headers=(("retry-after", "1"),)
                ),
                now,
            )
        self._close()

    # --- request reading ---------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Start on buffered request heads while the connection is free for one."""
        try:
            while self._phase in (Phase.IDLE, Phase.HEAD) and self._inbuf:
                head = check_request_head(self._inbuf, self.config)
                if head is None:
                    if self._phase is Phase.IDLE:
                        self._set_phase(Input.BYTES)
                        self._deadline = now + self.config.head_timeout
                    return
                self._set_phase(Input.HEAD_ACCEPTED)
                self._deadline = now + self.config.body_timeout
                self._h11 = h11.Connection(
                    h11.SERVER, max_incomplete_event_size=self.config.max_head_bytes
                )
                data = bytes(self._inbuf)
                self._inbuf.clear()
                self._chunk_check = ChunkedBodyCheck() if head.chunked else None
                if self._chunk_check is not None:
                    self._chunk_check.feed(data[head.length :])
                self._h11.receive_data(data)
                self._read_request(now)
        except (RemoteProtocolError, h11.RemoteProtocolError) as exc:
            # Also reached from provider_done & co, for requests pipelined behind a response.
            self._fail(exc, now)

    def _read_request(self, now: float) -> None:
        conn = self._h11
        assert conn is not None
        while self._phase is Phase.BODY:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                self._on_request(event, now)
            elif isinstance(event, h11.Data):
                self._on_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._set_phase(Input.BODY_COMPLETE)
                self._deadline = None
                self._dispatch(now)
            else:  # NEED_DATA; PAUSED and ConnectionClosed cannot occur while reading a body
                return

    def _on_request(self, request: h11.Request, now: float) -> None:
        fields = list(request.headers)  # h11's Headers iterate slowly (Sequence.__iter__)
        headers = dict(fields)
        supplied_id = headers.get(b"x-request-id", b"").decode("latin-1")
        origin = headers.get(b"origin")
        ex = Exchange(
            method=request.method.decode("ascii"),
            target=request.target.decode("latin-1"),
            started=now,
            request_id=supplied_id if REQUEST_ID.fullmatch(supplied_id) else new_id("req_"),
            origin=origin.decode("latin-1") if origin is not None else None,
            requested_headers=headers.get(b"access-control-request-headers"),
            host=headers.get(b"host", b"").decode("latin-1"),
        )
        ex.keep_alive = keeps_alive(request.http_version, fields)
        self._ex = ex
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.config.max_body_bytes:
            raise RemoteProtocolError("Request body too large", status=413)
        try:
            ex.route = route(
                ex.method,
                ex.target,
                self.config.surface,
                playground=self.config.playground is not None,
                metrics=self.config.metrics is not MetricsAccess.OFF,
            )
            if self._shutdown_deadline is not None:
                raise RequestError(
                    "The server is shutting down",
                    status=503,
                    type="service_unavailable",
                    headers=(("retry-after", "1"),),
                )
            token = bearer_token(headers.get(b"authorization"))
            if ex.route.endpoint in (Endpoint.CHAT_WS, Endpoint.PREDICT_WS):
                ex.ws_key = handshake_key(headers)
                # NodeTool accepts the handshake, then closes 1008 (PROTOCOL.md §3).
                result = authenticate(token or query_token(split_target(ex.target)[1]), self.config)
                ex.user_id, ex.key = result.user_id, result.key
                if result.check is not None:
                    self._verify(result.check, now)
                elif result.user_id is None:
                    missing = result.failure == "missing"
                    ex.ws_auth_failure = f"{'Missing' if missing else 'Invalid'} authentication"
            elif not ex.route.public and not (
                ex.route.endpoint is Endpoint.METRICS
                and self.config.metrics is MetricsAccess.PUBLIC
            ):
                result = authenticate(token, self.config)
                if result.check is not None:
                    self._verify(result.check, now)
                elif result.user_id is None:
                    raise auth_error(result.failure or "invalid")
                ex.user_id, ex.key = result.user_id, result.key
        except RequestError as exc:
            ex.error = exc
        assert self._h11 is not None
        if self._h11.they_are_waiting_for_100_continue and self._auth is None:
            if ex.error is not None:
                # The client holds its body back until told to send it: refuse now and close,
                # since the unread body would otherwise be parsed as the next request.
                self._respond_error(ex, ex.error, now, close=True)
                return
            self._out += self._h11.send(h11.InformationalResponse(status_code=100, headers=[]))

    def _on_body(self, data: bytes) -> None:
        ex = self._ex
        assert ex is not None
        ex.body_size += len(data)
        if ex.body_size > self.config.max_body_bytes:
            raise RemoteProtocolError("Request body too large", status=413)
        if ex.error is None and ex.route is not None and ex.route.endpoint in _BODY_ENDPOINTS:
            ex.body += data

    # --- dispatch and responses ---------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        ex = self._ex
        assert ex is not None
        if ex.error is not None or ex.route is None:
            self._respond_error(ex, ex.error or RequestError("Bad request"), now)
            return
        endpoint = ex.route.endpoint
        if self._auth is not None and endpoint not in _WS_ENDPOINTS:
            # The token is still being judged: nothing is dispatched before the verdict
            # (a deadline already past fires at once, as "unavailable").
            self._deadline = self._auth.deadline
            return
        if endpoint is Endpoint.HEALTH:
            stamp = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
            self._respond(ex, 200, sse.dumps({"status": "healthy", "timestamp": stamp}), now)
        elif endpoint is Endpoint.PREFLIGHT:
            self._respond(ex, 204, b"", now)
        elif endpoint is Endpoint.OPENAPI:
            self._respond(ex, 200, OPENAPI_JSON, now)
        elif endpoint is Endpoint.PLAYGROUND:
            self._respond_playground(ex, now)
        elif endpoint in (Endpoint.CHAT_WS, Endpoint.PREDICT_WS):
            self._upgrade(ex, now)
        elif endpoint is Endpoint.WORKFLOWS:
            listing = [
                {"id": w.id, "name": w.name, "description": w.description, "inputs": list(w.inputs)}
                for w in self.config.workflows
            ]
            self._respond(ex, 200, sse.dumps({"workflows": listing}), now)
        elif endpoint in (Endpoint.WORKFLOW_RUN, Endpoint.WORKFLOW_STREAM):
            self._start_workflow(ex, now)
        elif endpoint is Endpoint.METRICS:
            ex.stream_id = self._new_stream_id()
            self._outputs.append(RenderMetrics(stream_id=ex.stream_id))
            self._deadline = now + self.config.provider_first_item_timeout
        elif endpoint in (Endpoint.MODELS, Endpoint.MODEL):
            ex.stream_id = self._new_stream_id()
            self._outputs.append(
                ListModels(stream_id=ex.stream_id, user_id=ex.user_id or LOCAL_USER)
            )
            self._deadline = now + self.config.provider_first_item_timeout
        else:
            try:
                parsed = openai.parse_chat_request(bytes(ex.body), max_depth=self.config.max_depth)
            except RequestError as exc:
                self._respond_error(ex, exc, now)
                return
            ex.body = bytearray()
            refusal = self._admit(ex, parsed.request.model, now)
            if refusal is not None:
                self._respond_error(ex, refusal, now)
                return
            ex.run = CompletionRun(parsed, completion_id=new_id("chatcmpl-"), created=int(now))
            self._call_provider(ex, now)

    def _admit(self, ex: Exchange, model: str, now: float) -> RequestError | None:
        """Admit a chat completion as a generation (``ex.ticket``), or say why not: the
        key may not use the model (403), is over a limit (429), or the server is full (503)."""
        limits = ex.key.limits if ex.key is not None else None
        if limits is not None and not limits.allows_model(model):
            return RequestError(
                f"This key may not use the model `{model}`.",
                status=403,
                param="model",
                code="model_not_allowed",
            )
        admitted = self._admission.admit(ex.key.key_id if ex.key else None, limits, now)
        if isinstance(admitted, Ticket):
            ex.ticket = admitted
            return None
        wait = max(admitted.retry_after, 0.001)
        headers = [
            ("retry-after", str(max(1, math.ceil(wait)))),
            ("retry-after-ms", str(max(1, math.ceil(wait * 1000)))),
        ]
        if admitted.status == 503:
            return RequestError(
                admitted.message,
                status=503,
                type="service_unavailable",
                code="server_overloaded",
                headers=tuple(headers),
            )
        # The x-ratelimit-* headers come with every answer to a limited key (_headers).
        return RequestError(
            admitted.message,
            status=429,
            type=admitted.kind if admitted.kind != "concurrent" else "requests",
            code="rate_limit_exceeded",
            headers=tuple(headers),
        )

    def _release(self, ex: Exchange) -> None:
        ticket, ex.ticket = ex.ticket, None
        if ticket is not None:
            if ex.run is not None:
                ticket.tokens = ex.run.usage.total_tokens
            self._admission.release(ticket)

    def _start_workflow(self, ex: Exchange, now: float) -> None:
        assert ex.route is not None
        workflow_id = ex.route.model_id
        if workflow_id not in {w.id for w in self.config.workflows}:
            self._respond_error(
                ex,
                RequestError(
                    f"Workflow {workflow_id} not found", status=404, code="workflow_not_found"
                ),
                now,
            )
            return
        try:
            params = openai.load_json(bytes(ex.body), self.config.max_depth) if ex.body else {}
        except RequestError as exc:
            self._respond_error(ex, exc, now)
            return
        if not isinstance(params, dict):
            self._respond_error(ex, RequestError("The body must be a JSON object of inputs"), now)
            return
        ex.body = bytearray()
        ex.job_id = secrets.token_hex(16)
        self._deadline = None  # a workflow takes what it takes; the client may hang up
        self._outputs.append(
            StartJob(
                job_id=ex.job_id,
                workflow_id=workflow_id,
                params=params,
                user_id=ex.user_id or LOCAL_USER,
                key=ex.key,
            )
        )

    def _call_provider(self, ex: Exchange, now: float) -> None:
        assert ex.run is not None
        ex.stream_id = self._new_stream_id()
        self._outputs.append(
            CallProvider(
                stream_id=ex.stream_id,
                request=ex.run.parsed.request,
                user_id=ex.user_id or LOCAL_USER,
            )
        )
        self._deadline = now + self.config.provider_first_item_timeout

    def _stream(self, ex: Exchange, data: bytes, now: float) -> None:
        """Send SSE bytes, starting the 200 event-stream response if it has not started."""
        conn = self._h11
        assert conn is not None
        if self._phase is Phase.WORKING:
            headers = self._answer_headers(ex, b"text/event-stream", now)
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            # Chunked for an HTTP/1.1 client; an HTTP/1.0 one reads to the close.
            version = conn.their_http_version
            ex.chunked = version is not None and version >= b"1.1"
            if ex.chunked:
                headers.append((b"transfer-encoding", b"chunked"))
            if not (ex.chunked and ex.keep_alive) or self._shutdown_deadline is not None:
                ex.keep_alive = False
                headers.append((b"connection", b"close"))
            self._out += response_head(200, headers)
            self._set_phase(Input.RESPONSE_STARTED)
            ex.status = 200
            if ex.run is not None:  # a completion (not a workflow's event stream)
                route = Endpoint.CHAT_COMPLETIONS.value
                self._outputs.append(FirstTokenSent(route=route, waited=now - ex.started))
        if data:
            out = self._out
            if ex.chunked:
                out += b"%x\r\n" % len(data)
                out += data
                out += b"\r\n"
            else:
                out += data

    def _end_stream(self, ex: Exchange, now: float) -> None:
        if ex.chunked:
            self._out += LAST_CHUNK
        self._finish_exchange(ex, now, streamed=True)

    def _respond_error(
        self, ex: Exchange, error: RequestError, now: float, *, close: bool = False
    ) -> None:
        extra = list(error.headers)
        if error.status == 401:
            extra.append(("www-authenticate", "Bearer"))
        body = sse.dumps(openai.error_body(error))
        self._respond(ex, error.status, body, now, extra=extra, close=close)

    def _respond(
        self,
        ex: Exchange,
        status: int,
        body: bytes,
        now: float,
        *,
        extra: Sequence[tuple[str, str]] = (),
        close: bool = False,
        content_type: bytes = b"application/json",
    ) -> None:
        headers = self._answer_headers(ex, content_type if status != 204 else None, now)
        if ex.route is not None and ex.route.endpoint is Endpoint.PREFLIGHT:
            headers.append((b"allow", ex.route.allow.encode("ascii")))
            headers += preflight_headers(ex, self.config)
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
        if status != 204:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        if close or not ex.keep_alive or self._shutdown_deadline is not None:
            ex.keep_alive = False
            headers.append((b"connection", b"close"))
        self._out += response_head(status, headers)
        if body and ex.method != "HEAD":  # a HEAD answer has the GET headers, no body
            self._out += body
        ex.status = status
        self._finish_exchange(ex, now, streamed=False)

    def _respond_playground(self, ex: Exchange, now: float) -> None:
        page = self.config.playground
        assert page is not None  # routed only when configured
        extra = page.headers(ex.host)
        self._respond(ex, 200, page.page, now, extra=extra, content_type=page.content_type)

    def _answer_headers(
        self, ex: Exchange, content_type: bytes | None, now: float
    ) -> list[tuple[bytes, bytes]]:
        return answer_headers(ex, content_type, now, self.config, self._admission)

    def _finish_exchange(self, ex: Exchange, now: float, *, streamed: bool) -> None:
        conn = self._h11
        assert conn is not None
        self._release(ex)
        self._outputs.append(access_record(ex, ex.status, now, streamed=streamed))
        self._ex = None
        keep_alive = (
            ex.keep_alive and conn.their_state is h11.DONE and self._shutdown_deadline is None
        )
        if not keep_alive:
            self._close()
            return
        # Bytes h11 holds beyond this request belong to the next one: they go back in front
        # of the strictness layer rather than to this h11 connection.
        self._inbuf[:0] = conn.trailing_data[0]
        self._h11 = None
        self._set_phase(Input.RESPONSE_FINISHED)
        self._deadline = now + self.config.keepalive_timeout

    def _upgrade(self, ex: Exchange, now: float) -> None:
        """Answer 101 and hand the connection (and the bytes after the head) to /chat."""
        conn = self._h11
        assert conn is not None and ex.ws_key is not None
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_token(ex.ws_key)),
            (b"x-request-id", ex.request_id.encode("ascii")),
        ]
        self._out += conn.send(h11.InformationalResponse(status_code=101, headers=headers))
        ex.status = 101
        path, _ = split_target(ex.target)  # the query may hold the api_key: never logged
        self._outputs.append(
            RequestCompleted(
                method=ex.method,
                target=path,
                status=101,
                request_id=ex.request_id,
                duration=0.0,
                user_id=ex.user_id,
                route=ex.route.endpoint.value if ex.route is not None else "unknown",
            )
        )
        self._inbuf[:0] = conn.trailing_data[0]  # the client's first frames, if any
        self._h11 = None
        self._ex = None
        self._set_phase(Input.UPGRADED)
        predict = ex.route is not None and ex.route.endpoint is Endpoint.PREDICT_WS
        wait = self._auth
        if wait is not None:
            # The token is still being judged: the socket opens with the verdict, and the
            # client's frames wait in _inbuf until then (reading pauses past the limit).
            wait.predict = predict
            self._deadline = wait.deadline
            return
        close = None if ex.ws_auth_failure is None else (ex.ws_close_code, ex.ws_auth_failure)
        self._open_socket(predict, ex.user_id or "", close, now, ex.key)

    def _open_socket(
        self,
        predict: bool,
        user_id: str,
        close: tuple[int, str] | None,
        now: float,
        key: StaticKey | None = None,
    ) -> None:
        """Start the /chat or /predict session, or close the socket at once (auth failed)."""
        trailing = bytes(self._inbuf)
        self._inbuf.clear()
        self._deadline = None
        socket = AppSocket(
            self.config,
            now,
            user_id,
            predict=predict,
            emit=self._outputs.append,
            new_id=self._new_stream_id,
            admission=self._admission,
            key=key,
        )
        self._socket = socket
        if close is not None:
            socket.close(*close, now)
        elif trailing:
            socket.receive_data(trailing, now)
        self._flush_socket(now)

    def _flush_socket(self, now: float) -> None:
        socket = self._socket
        assert socket is not None
        if self._phase is Phase.CLOSED:
            socket.ws.data_to_send()  # late results after the close: nothing more goes out
            return
        if self._shutdown_deadline is not None and socket.ws.open and not socket.session.busy:
            socket.close(1001, "server shutting down", now)
        if not socket.ws.open:
            socket.session.close()  # we are closing: the session asks for no more work
        self._out += socket.ws.data_to_send()
        if socket.ws.transport_done:
            socket.session.close()
            self._close_socket(now)

    # --- the auth provider's verdict ---------------------------------------------------

    def _verify(self, token: str, now: float) -> None:
        """Ask the auth provider about ``token``; the request waits for the verdict."""
        op_id = self._new_stream_id()
        self._auth = _AuthWait(op_id=op_id, deadline=now + self.config.auth_timeout)
        self._outputs.append(VerifyToken(op_id=op_id, token=token))

    def _auth_settled(
        self, op_id: int, user_id: str | None, failure: str | None, message: str, now: float
    ) -> None:
        wait = self._auth
        if wait is None or wait.op_id != op_id or self._phase is Phase.CLOSED:
            return  # a verdict for a request already answered (or abandoned): dropped
        self._auth = None
        close = {
            None: None,
            "invalid": (1008, "Invalid authentication"),
            "unavailable": (1011, "Authentication unavailable"),
        }[failure]
        if wait.predict is not None:  # the 101 is out: open the session, or close 1008/1011
            self._open_socket(wait.predict, user_id or "", close, now)
            return
        ex = self._ex
        assert ex is not None and ex.route is not None
        if ex.route.endpoint in _WS_ENDPOINTS:  # an upgrade request with a body: 101 at its end
            ex.user_id = user_id
            if close is not None:
                ex.ws_close_code, ex.ws_auth_failure = close
            return
        if failure is None:
            ex.user_id = user_id
        else:
            invalid = failure == "invalid"
            ex.error = auth_error("invalid") if invalid else auth_unavailable(message)
            ex.body = bytearray()  # and the rest of the body is dropped as it arrives
        if self._phase is Phase.BODY:
            conn = self._h11
            assert conn is not None
            if conn.they_are_waiting_for_100_continue:
                # The client held its body back for our word (reliability.md: 100 only
                # after auth): a refusal closes, since the unread body cannot be skipped.
                if ex.error is not None:
                    self._respond_error(ex, ex.error, now, close=True)
                    return
                self._out += conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            return  # the body is still arriving: the request is dispatched at its end
        self._dispatch(now)
        self._advance(now)

    # --- failure and closing -------------------------------------------------------

    def _fail(self, exc: RemoteProtocolError | h11.RemoteProtocolError, now: float) -> None:
        """The peer broke HTTP: answer if no response has started, then close."""
        if isinstance(exc, h11.RemoteProtocolError):
            status, message = exc.error_status_hint, str(exc)
        else:
            status, message = exc.status, exc.message
        self._outputs.append(ConnectionFailed(reason=message, status=status))
        self._cancel_work()
        if self._phase is not Phase.STREAMING:
            request_id = self._ex.request_id if self._ex is not None else new_id("req_")
            # A HEAD answer has no body, even a refusal (RFC 9110 §9.3.2); when the head
            # was refused before parsing, its first bytes still say whether it was HEAD.
            ex = self._ex
            head_only = ex.method == "HEAD" if ex is not None else self._inbuf[:5] == b"HEAD "
            self._out += fatal_response(status, message, request_id, head_only=head_only)
        self._close()

    def _cancel_work(self) -> None:
        self._auth = None  # a verdict arriving later is dropped
        ex = self._ex
        if ex is not None:
            self._release(ex)
        if ex is not None and ex.stream_id is not None:
            self._outputs.append(CancelProvider(stream_id=ex.stream_id))
            ex.stream_id = None
        if ex is not None and ex.job_id is not None:
            # A workflow run over HTTP belongs to its request (unlike a /predict job).
            self._outputs.append(CancelJob(job_id=ex.job_id, user_id=ex.user_id or LOCAL_USER))
            ex.job_id = None

    def _close_socket(self, now: float) -> None:
        """Close a connection that holds a WebSocket session: its end is one notice."""
        socket = self._socket
        if socket is not None and self._phase is not Phase.CLOSED:
            session = socket.session
            self._outputs.append(
                WebSocketClosed(
                    endpoint=socket.endpoint,
                    duration=max(0.0, now - socket.opened),
                    code=socket.ws.close_code,
                    turns=session.turns if isinstance(session, ChatSession) else 0,
                    user_id=session.user_id or None,
                )
            )
        self._close()

    def _close(self) -> None:
        if self._phase is Phase.CLOSED:
            return
        if self._ex is not None:
            self._release(self._ex)
        self._set_phase(Input.CLOSE)
        self._deadline = None
        self._shutdown_deadline = None
        self._inbuf.clear()
        self._outputs.append(CloseTransport())

    # --- small helpers ------------------------------------------------------------------

    def _set_phase(self, event: Input) -> None:
        self._phase = next_phase(self._phase, event)

    def _active(self, stream_id: int) -> Exchange | None:
        ex = self._ex
        if ex is None or ex.stream_id != stream_id or self._phase is Phase.CLOSED:
            return None  # a late result for a call we gave up on: dropped
        return ex

    def _new_stream_id(self) -> int:
        stream_id = self._next_stream_id
        self._next_stream_id += 1
        return stream_id
