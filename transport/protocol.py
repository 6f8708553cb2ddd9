"""``EngineProtocol``: the asyncio protocol that moves bytes between a socket and the engine.

Rules of this module:

* No protocol knowledge: every decision is the engine's. This module feeds bytes and
  provider results in, writes ``data_to_send()``, carries out ``effects()`` and keeps one
  timer armed at ``next_deadline()``.
* Back-pressure: a provider stream is pulled one item at a time, and the next item is not
  pulled until the socket has drained (``pause_writing``/``resume_writing``), so a slow
  reader slows generation instead of growing a buffer. A client that does not read for
  ``send_timeout`` seconds is dropped.
* Cancellation: every task started for a connection is cancelled when the engine says so
  (``CancelProvider``) or when the socket goes away; a cancelled provider call reports
  nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, assert_never

from wirechat.engine import Output, ProviderError, ServerConnection
from wirechat.engine.events import (
    CallProvider,
    CancelJob,
    CancelProvider,
    CancelTool,
    CloseTransport,
    ConnectionFailed,
    FirstTokenSent,
    JobCommand,
    ListModels,
    OpenThread,
    ProviderFailed,
    RenderMetrics,
    RequestAbandoned,
    RequestCompleted,
    RunTool,
    SaveMessages,
    StartJob,
    UsageReported,
    VerifyToken,
    WebSocketClosed,
)
from wirechat.providers.supabase_auth import AuthUnavailable
from wirechat.providers.threads import ThreadAccessError
from wirechat.providers.workflows import JobLimits

if TYPE_CHECKING:
    from .server import Server


class _SlowReader(ConnectionError):
    """The client has not read for ``send_timeout`` seconds."""


# Above this many queued bytes a write goes out at once (the asyncio write-buffer scale).
_COALESCE_LIMIT = 64 * 1024

access_log = logging.getLogger("wirechat.access")
logger = logging.getLogger("wirechat.transport")


class EngineProtocol(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._conn = ServerConnection(server.config, time.time(), admission=server.admission)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._deadline: float | None = None  # the engine's latest next_deadline()
        self._wbuf: list[bytes] = []  # written at the end of this event-loop turn
        self._wbuf_size = 0
        self._flush_scheduled = False
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._writable: asyncio.Event = asyncio.Event()
        self._writable.set()
        self._reading = True
        self._following: dict[str, Callable[[], None]] = {}  # job id → its unsubscribe
        self._ws_request_id = ""  # the upgrade's request id, for the socket's closing line

    @property
    def engine(self) -> ServerConnection:
        """The connection's engine (read-only use: metrics read what is in progress)."""
        return self._conn

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Every SSE event must leave at once, not wait for Nagle (reference §4.1).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        self._pump()

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data, time.time())
        self._pump()

    def eof_received(self) -> bool:
        self._conn.receive_eof(time.time())
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._conn.closed:
            self._conn.receive_eof(time.time())
            # The socket is gone: of the effects only the cancellations below matter, but
            # the notices (a WebSocket session's end) are still logged and counted.
            for output in self._conn.effects():
                if isinstance(output, WebSocketClosed):
                    self._websocket_closed(output)
                elif isinstance(output, RequestAbandoned):
                    self._request_done(output.record)  # status 499, like nginx
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        for unsubscribe in self._following.values():
            unsubscribe()  # jobs keep running; only their feed to this socket stops
        self._following.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._writable.set()  # wake a waiting drain: its task is being cancelled anyway
        self._server.connections.discard(self)

    def pause_writing(self) -> None:
        self._writable.clear()
        self._sync_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        self._sync_reading()

    # --- the pump -----------------------------------------------------------------------

    def _pump(self) -> None:
        """Write what the engine produced, carry out its effects, re-arm the timer."""
        transport = self._transport
        if transport is None:
            return
        # Some effects are answered on the spot (JobCommand) and produce more output, so
        # write and carry out until the engine has nothing left.
        while True:
            data = self._conn.data_to_send()
            if data and not transport.is_closing():
                self._write(data)
            outputs = self._conn.effects()
            if not outputs:
                break
            self._carry_out(outputs, transport)
        self._arm_timer(self._conn.next_deadline())
        self._sync_reading()

    def _carry_out(self, outputs: list[Output], transport: asyncio.Transport) -> None:
        for output in outputs:
            match output:
                case CallProvider():
                    self._start(output.stream_id, self._run_provider(output))
                case ListModels():
                    cached = self._server.providers.cached_models()
                    if cached is None:
                        self._start(output.stream_id, self._list_models(output))
                    else:  # answered on the spot; the pump's loop writes the reply
                        self._conn.models_listed(output.stream_id, cached, time.time())
                case OpenThread():
                    self._start(output.op_id, self._open_thread(output))
                case SaveMessages():
                    self._start(output.op_id, self._save_messages(output))
                case RunTool():
                    self._start(output.op_id, self._run_tool(output))
                case CancelProvider():
                    self._cancel(output.stream_id)
                case CancelTool():
                    self._cancel(output.op_id)
                case StartJob():
                    self._start_job(output)
                case JobCommand():
                    self._job_command(output)
                case CancelJob():
                    self._server.jobs.cancel(output.job_id, output.user_id)
                case VerifyToken():
                    self._verify_token(output)
                case RenderMetrics():  # answered on the spot, like cached models
                    metrics = self._server.metrics
                    body = metrics.render() if metrics is not None else b""
                    content_type = metrics.content_type if metrics is not None else "text/plain"
                    self._conn.metrics_rendered(output.stream_id, body, content_type, time.time())
                case CloseTransport():
                    if output.abort:
                        transport.abort()
                    else:
                        self._flush_writes()
                        transport.close()  # flushes what was written first...
                        # ...unless the peer never reads it: then drop it after a while.
                        self._loop.call_later(self._server.config.send_timeout, transport.abort)
                case RequestCompleted():
                    self._request_done(output)
                case RequestAbandoned():
                    self._request_done(output.record)  # status 499, like nginx
                case ConnectionFailed():
                    logger.debug("closing a connection: %s (%s)", output.reason, output.status)
                    if self._server.metrics is not None:
                        self._server.metrics.connection_failed(output)
                case FirstTokenSent():
                    if self._server.metrics is not None:
                        self._server.metrics.first_token_sent(output)
                case UsageReported():
                    if self._server.metrics is not None:
                        self._server.metrics.usage_reported(output)
                case ProviderFailed():
                    if self._server.metrics is not None:
                        self._server.metrics.provider_failed(output)
                case WebSocketClosed():
                    self._websocket_closed(output)
                case _:
                    assert_never(output)

    def _sync_reading(self) -> None:
        """Read only while the engine wants bytes and the peer reads what we write: a
        client that floods requests (or pings) without reading the answers stops being
        read, so our write buffer cannot grow without bound."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        want = self._writable.is_set() and not self._conn.reading_paused
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _write(self, data: bytes) -> None:
        """Queue bytes for the socket; everything queued in one event-loop turn leaves in
        one write (a stream of small SSE events costs one syscall per turn, not per event).
        Past the write-buffer high-water mark it goes out at once, so back-pressure still
        sees it."""
        self._wbuf.append(data)
        self._wbuf_size += len(data)
        if self._wbuf_size >= _COALESCE_LIMIT:
            self._flush_writes()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_writes)

    def _flush_writes(self) -> None:
        self._flush_scheduled = False
        if not self._wbuf:
            return
        data = b"".join(self._wbuf) if len(self._wbuf) > 1 else self._wbuf[0]
        self._wbuf.clear()
        self._wbuf_size = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _arm_timer(self, deadline: float | None) -> None:
        """Keep one timer at or before the engine's deadline.

        Deadlines mostly move *later* (every streamed item pushes the idle deadline), so a
        timer that fires early is simply re-armed rather than being cancelled and created
        again on every item; only an earlier deadline replaces the timer.
        """
        self._deadline = deadline
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - time.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = time.time()
        if self._deadline is not None and now < self._deadline:
            self._arm_timer(self._deadline)  # the deadline moved later meanwhile
            return
        self._conn.handle_timer(now)
        self._pump()

    def start_shutdown(self) -> None:
        self._conn.start_shutdown(time.time())
        self._pump()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _reset(self) -> None:
        """Drop the connection with a reset, discarding what the kernel still buffers for a
        peer that does not read (a plain close would trickle it out for minutes)."""
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    # --- work the engine asked for ------------------------------------------------------

    def _start(self, op_id: int, work: Any) -> None:
        self._tasks[op_id] = self._loop.create_task(work)

    def _cancel(self, op_id: int) -> None:
        task = self._tasks.pop(op_id, None)
        if task is not None:
            task.cancel()

    async def _run_provider(self, call: CallProvider) -> None:
        conn, sid = self._conn, call.stream_id
        logger.debug("provider call %d for %s started", sid, call.request.model)
        try:
            stream = self._server.providers.stream(call.request)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    conn.provider_chunk(sid, item, time.time())
                    if conn.has_only_data:  # a streamed token: only its bytes to write
                        self._write(conn.data_to_send())
                    elif conn.has_output:
                        self._pump()
                    if not self._writable.is_set():
                        await self._drain()
            conn.provider_done(sid, time.time())
        except ProviderError as exc:
            conn.provider_failed(sid, exc, time.time())
        except asyncio.CancelledError:
            logger.debug("provider call %d for %s cancelled", sid, call.request.model)
            raise
        except _SlowReader:
            logger.info("dropping a client that stopped reading")
            self._reset()
            return
        except ConnectionError:
            return
        except Exception:
            logger.exception("provider failed on %s", call.request.model)
            failure = ProviderError("The model failed", status=500, code="internal_error")
            conn.provider_failed(sid, failure, time.time())
        finally:
            if self._tasks.get(sid) is asyncio.current_task():
                del self._tasks[sid]
        self._pump()

    async def _list_models(self, effect: ListModels) -> None:
        sid = effect.stream_id
        try:
            models = await self._server.providers.list_models()
            self._conn.models_listed(sid, models, time.time())
        except ProviderError as exc:
            self._conn.provider_failed(sid, exc, time.time())
        finally:
            self._tasks.pop(sid, None)
        self._pump()

    async def _open_thread(self, op: OpenThread) -> None:
        try:
            history = await self._server.threads.open(op.thread_id, op.user_id, op.append)
            self._conn.thread_opened(op.op_id, history, time.time())
        except ThreadAccessError:
            # Never tell a user that another user's thread exists.
            self._conn.store_failed(op.op_id, "Thread not found", time.time())
        except Exception:
            logger.exception("opening thread %s failed", op.thread_id)
            self._conn.store_failed(op.op_id, "Could not open the thread", time.time())
        finally:
            self._tasks.pop(op.op_id, None)
        self._pump()

    async def _save_messages(self, op: SaveMessages) -> None:
        try:
            await self._server.threads.append(op.thread_id, op.user_id, op.messages)
            self._conn.messages_saved(op.op_id, time.time())
        except ThreadAccessError:
            self._conn.store_failed(op.op_id, "Thread not found", time.time())
        except Exception:
            logger.exception("saving to thread %s failed", op.thread_id)
            self._conn.store_failed(op.op_id, "Could not save the conversation", time.time())
        finally:
            self._tasks.pop(op.op_id, None)
        self._pump()

    async def _run_tool(self, op: RunTool) -> None:
        try:
            result = await self._server.tools.run(op.name, op.arguments)
            self._conn.tool_finished(op.op_id, True, result, None, time.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing tool is reported to the model, not fatal
            logger.info("tool %s failed: %s", op.name, exc)
            error = f"{type(exc).__name__}: {exc}"
            self._conn.tool_finished(op.op_id, False, None, error, time.time())
        finally:
            self._tasks.pop(op.op_id, None)
        self._pump()

    def _verify_token(self, op: VerifyToken) -> None:
        """Judge a token: from the verifier's cache on the spot, else by asking it."""
        verifier = self._server.auth
        if verifier is None:
            message = "no authentication provider is configured"
            self._conn.token_check_failed(op.op_id, message, time.time())
            return
        verdict = verifier.cached(op.token)
        if verdict is not None:
            self._conn.token_verified(op.op_id, verdict.user_id, time.time())
            return
        self._start(op.op_id, self._check_token(op))

    async def _check_token(self, op: VerifyToken) -> None:
        verifier = self._server.auth
        assert verifier is not None
        try:
            user_id = await verifier.verify(op.token)
            self._conn.token_verified(op.op_id, user_id, time.time())
        except AuthUnavailable as exc:
            self._conn.token_check_failed(op.op_id, str(exc), time.time())
        except Exception as exc:  # a verifier bug must not let anyone in, nor log the token
            logger.error("token check failed: %s", type(exc).__name__)
            message = "the authentication provider failed"
            self._conn.token_check_failed(op.op_id, message, time.time())
        finally:
            self._tasks.pop(op.op_id, None)
        self._pump()

    def _follow(self, job_id: str, user_id: str) -> bool:
        """Feed the events of ``job_id`` to the engine, as they happen, in order."""

        def deliver(event: dict[str, Any]) -> None:
            self._conn.job_event(job_id, event, time.time())
            self._pump()

        if job_id in self._following:
            return True  # one feed per job and socket, however often it reconnects
        unsubscribe = self._server.jobs.subscribe(job_id, user_id, deliver)
        if unsubscribe is None:
            return False
        self._following[job_id] = unsubscribe
        return True

    def _start_job(self, job: StartJob) -> None:
        jobs = self._server.jobs
        try:
            limits = JobLimits(self._server.admission, job.key)
            jobs.start(job.job_id, job.workflow_id, job.params, job.user_id, limits)
        except (KeyError, ValueError, RuntimeError) as exc:  # unknown, duplicate, closing
            logger.info("job %s could not start: %r", job.job_id, exc)
            event = {
                "type": "job_update",
                "status": "failed",
                "job_id": job.job_id,
                "workflow_id": job.workflow_id,
                "error": "Workflow not found",
            }
            self._conn.job_event(job.job_id, event, time.time())
            return
        self._follow(job.job_id, job.user_id)

    def _job_command(self, command: JobCommand) -> None:
        """Ask the job runner; the engine turns the raw answer into the protocol's reply."""
        jobs, data, user = self._server.jobs, command.data, command.user_id
        job_id = str(data.get("job_id") or "")
        value: object
        if command.command == "get_status":
            value = jobs.status(job_id, user) if job_id else jobs.jobs(user)
        elif command.command == "cancel_job":
            status = jobs.status(job_id, user)
            value = status if jobs.cancel(job_id, user) else None
        elif command.command == "reconnect_job":
            value = jobs.snapshot(job_id, user)
        elif command.command == "stream_input":
            value = jobs.stream_input(job_id, user, str(data.get("input")), data.get("value"))
        else:
            value = jobs.end_input_stream(job_id, user, str(data.get("input")))
        self._conn.job_command_done(command.op_id, value, time.time())
        if command.command == "reconnect_job" and value is not None:
            self._follow(job_id, user)  # after the snapshot, the live events

    async def _drain(self) -> None:
        if self._writable.is_set():
            return
        try:
            await asyncio.wait_for(self._writable.wait(), self._server.config.send_timeout)
        except TimeoutError:
            # The caller closes its provider stream first (the upstream request must end
            # cleanly, not be cut by our own cancellation), then drops the client.
            raise _SlowReader("client stopped reading") from None
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("connection closed")

    # --- the access log (never a token: the engine strips the query from targets) --------

    def _request_done(self, done: RequestCompleted) -> None:
        self._log_request(done)
        if self._server.metrics is not None:
            self._server.metrics.request_completed(done)

    def _log_request(self, done: RequestCompleted) -> None:
        if done.status == 101:
            self._ws_request_id = done.request_id
        if not self._access_logged():
            return
        record = {
            "method": done.method,
            "path": done.target,
            "route": done.route,
            "status": done.status,
            "duration_ms": round(done.duration * 1000, 1),
            "request_id": done.request_id,
            "user": done.user_id,
            "streamed": done.streamed,
        }
        self._access_line(
            record,
            "%s %s %d %.1fms rid=%s%s",
            done.method,
            done.target,
            done.status,
            done.duration * 1000,
            done.request_id,
            " stream" if done.streamed else "",
        )

    def _websocket_closed(self, closed: WebSocketClosed) -> None:
        if self._server.metrics is not None:
            self._server.metrics.websocket_closed(closed)
        if not self._access_logged():
            return
        path = "/" + closed.endpoint
        record = {
            "event": "websocket_closed",
            "path": path,
            "close_code": closed.code,
            "duration_ms": round(closed.duration * 1000, 1),
            "turns": closed.turns,
            "request_id": self._ws_request_id,
            "user": closed.user_id,
        }
        self._access_line(
            record,
            "WS %s closed %d %.1fs turns=%d rid=%s",
            path,
            closed.code,
            closed.duration,
            closed.turns,
            self._ws_request_id,
        )

    def _access_logged(self) -> bool:
        return self._server.access_log != "off" and access_log.isEnabledFor(logging.INFO)

    def _access_line(self, record: dict[str, Any], plain: str, *args: object) -> None:
        """One access-log line: ``record`` as JSON (time first), or ``plain % args``."""
        if self._server.access_log == "json":
            line = json.dumps({"ts": _timestamp(), **record}, separators=(",", ":"))
            access_log.info("%s", line)
        else:
            access_log.info(plain, *args)


def _timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
