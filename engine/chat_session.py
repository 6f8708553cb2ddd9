"""NodeTool's ``/chat`` conversation over one WebSocket, as a state machine of turns.

Rules of this module:

* Frames in are decoded dicts; frames out are dicts handed to ``send`` (the caller encodes
  them in the client's encoding). Work is asked for through ``emit`` (``OpenThread``,
  ``CallProvider``, ``RunTool``, ``SaveMessages``, cancellations) and answered through the
  ``thread_opened`` / ``provider_*`` / ``tool_finished`` / ``messages_saved`` methods with
  the same id. A result for an id the session no longer waits for is dropped.
* One turn at a time (PROTOCOL.md §4). A turn: persist the user message and load the thread,
  then rounds of model call → tools → model call (at most ``max_tool_rounds`` rounds with
  tools), then exactly one done chunk, the durable save of the turn's messages, and the
  final assistant ``message`` frame. Every frame of a turn carries its ``thread_id``.
* ``stop``, or a new chat message, ends the running turn with exactly one
  ``generation_stopped`` and cancels whatever it was waiting for.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    ProviderError,
    ProviderItem,
    TextDelta,
    ToolCall,
    ToolSpec,
)
from .codec import Encoding, chunk_frame
from .config import EngineConfig, StaticKey
from .events import (
    CallProvider,
    CancelJob,
    CancelProvider,
    CancelTool,
    FirstTokenSent,
    OpenThread,
    Output,
    ProviderFailed,
    RunTool,
    SaveMessages,
    StartJob,
    UsageReported,
)
from .limits import Admission, Ticket

Frame = dict[str, Any]


class Step(Enum):
    OPENING = "opening"  # waiting for the thread store (user message saved, history loaded)
    GENERATING = "generating"  # a provider stream is running
    SERVER_TOOL = "server_tool"  # a server tool is running
    CLIENT_TOOL = "client_tool"  # waiting for the client's tool_result
    SAVING = "saving"  # waiting for the turn's messages to be durable
    WORKFLOW = "workflow"  # a workflow job runs; its events are forwarded


@dataclass(slots=True)
class _Turn:
    thread_id: str
    model: str
    provider: str | None
    tools: tuple[ToolSpec, ...]
    step: Step = Step.OPENING
    op_id: int = 0
    history: list[ChatMessage] = field(default_factory=list)
    new_messages: list[ChatMessage] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # all text of the turn, every round
    round_text: list[str] = field(default_factory=list)
    round_calls: list[ToolCall] = field(default_factory=list)
    pending_calls: list[ToolCall] = field(default_factory=list)
    current_call: ToolCall | None = None
    rounds: int = 0
    deadline: float | None = None
    workflow_id: str | None = None
    job_id: str | None = None
    ticket: Ticket | None = None  # the admitted generation, released when the turn ends
    started: float = 0.0  # when the chat message arrived (time to first token)


class ChatSession:
    fixed_encoding: Encoding | None = None  # /chat always mirrors the client's last frame

    def __init__(
        self,
        config: EngineConfig,
        user_id: str,
        *,
        send: Callable[[Frame], None],
        emit: Callable[[Output], None],
        new_id: Callable[[], int],
        send_chunk: Callable[[str, str | None], None] | None = None,
        admission: Admission | None = None,
        key: StaticKey | None = None,
    ) -> None:
        self.config = config
        self.user_id = user_id
        # Every turn is a generation: admitted against the key's limits and the server's.
        self._admission = admission or Admission(config.max_inflight_generations)
        self._key = key
        self._send = send
        # A streamed piece of text (``codec.chunk_frame``): the one frame sent per token, so
        # the socket may encode it without a dict per token.
        self._send_chunk = send_chunk or (lambda text, thread: send(chunk_frame(text, thread)))
        self._emit = emit
        self._new_id = new_id
        self._server_tools = {spec.name: spec for spec in config.server_tools}
        self._client_tools: dict[str, ToolSpec] = {}
        self._turn: _Turn | None = None
        self.turns = 0  # turns started on this socket (its closing log line)

    @property
    def busy(self) -> bool:
        return self._turn is not None

    def next_deadline(self) -> float | None:
        return self._turn.deadline if self._turn is not None else None

    # --- frames from the client --------------------------------------------------------

    def handle_frame(self, frame: Frame, now: float) -> None:
        kind = frame.get("type")
        if kind == "stop":
            self.stop()
        elif kind == "ping":
            self._send({"type": "pong", "ts": now})
        elif kind == "pong":
            pass  # NodeTool started a bogus turn on a pong; we must not (reference §3.3)
        elif kind == "client_tools_manifest":
            self._set_manifest(frame.get("tools"))
        elif kind == "tool_result":
            self._client_tool_result(frame, now)
        elif kind in (None, "message", "chat_message"):
            self._start_turn(frame, now)
        else:
            self._send({"type": "error", "message": f"Unknown frame type: {kind!r}"})

    def stop(self) -> None:
        """End the running turn (if any) with exactly one ``generation_stopped``."""
        turn = self._turn
        self._cancel()
        frame: Frame = {"type": "generation_stopped", "message": "Generation stopped by user"}
        if turn is not None:
            frame["thread_id"] = turn.thread_id
        self._send(frame)

    def close(self) -> None:
        """The socket is gone: cancel what runs, send nothing."""
        self._cancel()

    def abandon(self, message: str) -> None:
        """The server cannot finish the running turn (shutdown grace is over): cancel it and
        say so with an ``error`` frame, so the client does not take the close for a finished
        answer. No turn: nothing to say."""
        turn = self._turn
        if turn is None:
            return
        self._cancel()
        self._send(
            {
                "type": "error",
                "message": message,
                "error_type": "server_shutdown",
                "thread_id": turn.thread_id,
            }
        )

    def _cancel(self) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        self._end(turn)
        if turn.step is Step.GENERATING:
            self._emit(CancelProvider(stream_id=turn.op_id))
        elif turn.step is Step.SERVER_TOOL:
            self._emit(CancelTool(op_id=turn.op_id))
        elif turn.step is Step.WORKFLOW and turn.job_id is not None:
            self._emit(CancelJob(job_id=turn.job_id, user_id=self.user_id))

    def _set_manifest(self, tools: Any) -> None:
        if not isinstance(tools, list):
            self._send({"type": "error", "message": "client_tools_manifest needs a 'tools' list"})
            return
        manifest: dict[str, ToolSpec] = {}
        for tool in tools:
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                parameters = tool.get("parameters")
                manifest[tool["name"]] = ToolSpec(
                    name=tool["name"],
                    description=str(tool.get("description") or ""),
                    parameters=parameters if isinstance(parameters, dict) else {},
                )
        self._client_tools = manifest

    # --- starting a turn ---------------------------------------------------------------

    def _start_turn(self, frame: Frame, now: float) -> None:
        if self._turn is not None:
            self.stop()  # supersession: the old turn ends like a stop (PROTOCOL.md §4)
        workflow_id = frame.get("workflow_id")
        if workflow_id is not None and (
            not isinstance(workflow_id, str)
            or workflow_id not in {w.id for w in self.config.workflows}
        ):
            self._send({"type": "error", "message": f"Workflow {workflow_id} not found"})
            return
        message = _user_message(frame)
        if message is None:
            self._send({"type": "error", "message": "A chat message needs 'content'"})
            return
        tools = _names(frame.get("tools"))
        unknown = [name for name in tools if name not in self._server_tools]
        if unknown:
            self._send({"type": "error", "message": f"Tool {unknown[0]} not found"})
            return
        thread_id = frame.get("thread_id")
        if not isinstance(thread_id, str) or not thread_id:
            thread_id = "thread_" + secrets.token_hex(12)
        model = frame.get("model")
        model = model if isinstance(model, str) and model else self.config.default_model
        ticket = self._admit(model, thread_id, now)
        if ticket is None:
            return
        provider = frame.get("provider")
        turn = _Turn(
            thread_id=thread_id,
            model=model,
            provider=provider if isinstance(provider, str) and provider else None,
            tools=tuple(self._server_tools[name] for name in tools),
            workflow_id=workflow_id,
            ticket=ticket,
            started=now,
        )
        self._turn = turn
        self.turns += 1
        turn.op_id = self._new_id()
        self._emit(
            OpenThread(
                op_id=turn.op_id, thread_id=thread_id, user_id=self.user_id, append=(message,)
            )
        )

    def _admit(self, model: str, thread_id: str, now: float) -> Ticket | None:
        """Admit the turn as a generation, or answer why not (an ``error`` frame; the socket
        stays open, like NodeTool's other turn errors)."""
        key = self._key
        limits = key.limits if key is not None else None
        if limits is not None and not limits.allows_model(model):
            self._send(
                {
                    "type": "error",
                    "message": f"This key may not use the model {model}",
                    "error_type": "model_not_allowed",
                    "thread_id": thread_id,
                }
            )
            return None
        admitted = self._admission.admit(key.key_id if key else None, limits, now)
        if isinstance(admitted, Ticket):
            return admitted
        self._send(
            {
                "type": "error",
                "message": admitted.message,
                "error_type": "rate_limit" if admitted.status == 429 else "overloaded",
                "retry_after": round(admitted.retry_after, 3),
                "thread_id": thread_id,
            }
        )
        return None

    def _end(self, turn: _Turn) -> None:
        """The turn is over, however it ended: its generation is released."""
        if turn.ticket is not None:
            self._admission.release(turn.ticket)

    # --- answers to what the session asked ---------------------------------------------

    def thread_opened(self, op_id: int, history: Sequence[ChatMessage], now: float) -> None:
        turn = self._waiting(op_id, Step.OPENING)
        if turn is None:
            return
        turn.history = list(history)
        if turn.workflow_id is None:
            self._call_model(turn, now)
            return
        # The chat becomes the workflow's inputs (PROTOCOL.md §4; NodeTool's chat-mode runs).
        turn.step = Step.WORKFLOW
        turn.job_id = secrets.token_hex(16)
        last = turn.history[-1] if turn.history else None
        params = {
            "message": last.text if last is not None else "",
            "messages": [_message_dict(m) for m in turn.history],
        }
        self._emit(
            StartJob(
                job_id=turn.job_id,
                workflow_id=turn.workflow_id,
                params=params,
                user_id=self.user_id,
                # The turn is the key's generation (admitted when it began): the job's own
                # model calls run inside it, as a workflow tool's do inside a model's turn.
                key=None,
            )
        )

    def job_event(self, job_id: str, event: Frame, now: float) -> None:
        """An event of the running turn's workflow job: forwarded; its end ends the turn."""
        turn = self._turn
        if turn is None or turn.step is not Step.WORKFLOW or turn.job_id != job_id:
            return
        self._send({**event, "thread_id": turn.thread_id})
        if event.get("type") == "job_update" and event.get("status") in (
            "completed",
            "failed",
            "cancelled",
        ):
            result = event.get("result")
            turn.text = [_outputs_text(result if isinstance(result, dict) else {})]
            self._finish_turn(turn)

    def messages_saved(self, op_id: int, now: float) -> None:
        turn = self._waiting(op_id, Step.SAVING)
        if turn is None:
            return
        self._turn = None
        self._end(turn)
        final: Frame = {
            "type": "message",
            "role": "assistant",
            "content": "".join(turn.text),
            "thread_id": turn.thread_id,
            "model": turn.model,
            "provider": turn.provider,
            "agent_mode": False,
        }
        if turn.workflow_id is not None:
            final["workflow_id"] = turn.workflow_id
            final["workflow_assistant"] = True
        self._send(final)

    def store_failed(self, op_id: int, message: str, now: float) -> None:
        turn = self._turn
        if turn is None or turn.op_id != op_id or turn.step not in (Step.OPENING, Step.SAVING):
            return
        self._turn = None
        self._end(turn)
        self._send({"type": "error", "message": message, "thread_id": turn.thread_id})

    def provider_chunk(self, stream_id: int, item: ProviderItem, now: float) -> None:
        turn = self._waiting(stream_id, Step.GENERATING)
        if turn is None:
            return
        turn.deadline = now + self.config.provider_idle_timeout
        if type(item) is TextDelta or isinstance(item, TextDelta):  # the exact type: fast
            if item.text:
                if not turn.text:  # the turn's first text: once per turn, not per token
                    self._emit(FirstTokenSent(route="chat_ws", waited=now - turn.started))
                turn.text.append(item.text)
                turn.round_text.append(item.text)
                self._send_chunk(item.text, turn.thread_id)
        elif isinstance(item, ToolCall):
            turn.round_calls.append(item)
        else:
            assert isinstance(item, Finish)
            if item.usage is not None and turn.ticket is not None:
                turn.ticket.tokens += item.usage.prompt_tokens + item.usage.completion_tokens
            if item.usage is not None:
                usage = item.usage
                self._emit(
                    UsageReported(
                        route="chat_ws",
                        model=turn.model,
                        prompt_tokens=usage.prompt_tokens,
                        completion_tokens=usage.completion_tokens,
                    )
                )

    def provider_done(self, stream_id: int, now: float) -> None:
        turn = self._waiting(stream_id, Step.GENERATING)
        if turn is None:
            return
        calls, turn.round_calls = turn.round_calls, []
        text = "".join(turn.round_text)
        turn.round_text = []
        turn.deadline = None
        if turn.rounds >= self.config.max_tool_rounds:
            calls = []  # tools were no longer offered: a model calling them anyway is ignored
        if not calls:
            self._finish_turn(turn)
            return
        assistant = ChatMessage(role="assistant", content=text or None, tool_calls=tuple(calls))
        turn.history.append(assistant)
        turn.new_messages.append(assistant)
        turn.rounds += 1
        self._send(
            {
                "type": "message",
                "role": "assistant",
                "content": text or None,
                "tool_calls": [
                    {"id": c.id, "name": c.name, "args": _arguments(c), "result": None}
                    for c in calls
                ],
                "thread_id": turn.thread_id,
                "model": turn.model,
                "provider": turn.provider,
            }
        )
        turn.pending_calls = calls
        self._next_tool(turn, now)

    def provider_failed(self, stream_id: int, error: ProviderError, now: float) -> None:
        turn = self._waiting(stream_id, Step.GENERATING)
        if turn is None:
            return
        self._turn = None
        self._end(turn)
        self._emit(ProviderFailed(route="chat_ws", model=turn.model, status=error.status))
        frame: Frame = {"type": "error", "message": error.message, "thread_id": turn.thread_id}
        if error.code:
            frame["error_type"] = error.code
        elif error.status == 429:
            frame["error_type"] = "rate_limit"
        self._send(frame)

    def tool_finished(
        self, op_id: int, ok: bool, result: Any, error: str | None, now: float
    ) -> None:
        turn = self._waiting(op_id, Step.SERVER_TOOL)
        if turn is not None:
            self._tool_result(turn, ok, result, error, now)

    def handle_timer(self, now: float) -> None:
        turn = self._turn
        if turn is None or turn.deadline is None or now < turn.deadline:
            return
        if turn.step is Step.CLIENT_TOOL and turn.current_call is not None:
            seconds = f"{self.config.client_tool_timeout:g}"
            error = f"Client tool {turn.current_call.name} timed out after {seconds} seconds"
            self._tool_result(turn, False, None, error, now)
        elif turn.step is Step.SERVER_TOOL and turn.current_call is not None:
            self._emit(CancelTool(op_id=turn.op_id))
            seconds = f"{self.config.tool_timeout:g}"
            error = f"Tool {turn.current_call.name} timed out after {seconds} seconds"
            self._tool_result(turn, False, None, error, now)
        elif turn.step is Step.GENERATING:
            self._emit(CancelProvider(stream_id=turn.op_id))
            timeout = ProviderError("Timed out waiting for the model", status=504, code="timeout")
            self.provider_failed(turn.op_id, timeout, now)

    # --- the steps of a turn -----------------------------------------------------------

    def _call_model(self, turn: _Turn, now: float) -> None:
        offer_tools = turn.rounds < self.config.max_tool_rounds
        tools = (*turn.tools, *self._client_tools.values()) if offer_tools else ()
        request = ChatRequest(
            model=turn.model,
            messages=tuple(turn.history),
            tools=tools,
            provider=turn.provider,
        )
        turn.step = Step.GENERATING
        turn.op_id = self._new_id()
        turn.deadline = now + self.config.provider_first_item_timeout
        self._emit(CallProvider(stream_id=turn.op_id, request=request, user_id=self.user_id))

    def _next_tool(self, turn: _Turn, now: float) -> None:
        if not turn.pending_calls:
            self._call_model(turn, now)
            return
        call = turn.pending_calls.pop(0)
        turn.current_call = call
        args = _arguments(call)
        self._send(
            {
                "type": "tool_call",
                "tool_call_id": call.id,
                "name": call.name,
                "args": args,
                "thread_id": turn.thread_id,
            }
        )
        if call.name in self._client_tools:
            turn.step = Step.CLIENT_TOOL
            turn.deadline = now + self.config.client_tool_timeout
        elif any(spec.name == call.name for spec in turn.tools):
            turn.step = Step.SERVER_TOOL
            turn.op_id = self._new_id()
            turn.deadline = now + self.config.tool_timeout
            self._emit(
                RunTool(op_id=turn.op_id, name=call.name, arguments=args, user_id=self.user_id)
            )
        else:
            self._tool_result(turn, False, None, f"Tool {call.name} not found", now)

    def _client_tool_result(self, frame: Frame, now: float) -> None:
        turn = self._turn
        if (
            turn is None
            or turn.step is not Step.CLIENT_TOOL
            or turn.current_call is None
            or frame.get("tool_call_id") != turn.current_call.id
        ):
            return  # a late or unknown result: NodeTool ignores it too
        ok = frame.get("ok") is True
        error = frame.get("error")
        self._tool_result(
            turn,
            ok,
            frame.get("result"),
            None if ok else str(error or "Frontend tool execution failed"),
            now,
        )

    def _tool_result(
        self, turn: _Turn, ok: bool, result: Any, error: str | None, now: float
    ) -> None:
        call = turn.current_call
        assert call is not None
        turn.current_call = None
        turn.deadline = None
        frame: Frame = {
            "type": "tool_result",
            "tool_call_id": call.id,
            "name": call.name,
            "ok": ok,
            "thread_id": turn.thread_id,
        }
        if ok:
            frame["result"] = result
            content = _json_text(result)
        else:
            frame["error"] = error
            content = _json_text({"error": error})  # the model is told of the failure
        self._send(frame)
        message = ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name)
        turn.history.append(message)
        turn.new_messages.append(message)
        self._send(
            {
                "type": "message",
                "role": "tool",
                "tool_call_id": call.id,
                "name": call.name,
                "content": content,
                "thread_id": turn.thread_id,
            }
        )
        self._next_tool(turn, now)

    def _finish_turn(self, turn: _Turn) -> None:
        self._send({"type": "chunk", "content": "", "done": True, "thread_id": turn.thread_id})
        final = ChatMessage(role="assistant", content="".join(turn.text))
        turn.new_messages.append(final)
        turn.step = Step.SAVING
        turn.op_id = self._new_id()
        self._emit(
            SaveMessages(
                op_id=turn.op_id,
                thread_id=turn.thread_id,
                user_id=self.user_id,
                messages=tuple(turn.new_messages),
            )
        )

    def _waiting(self, op_id: int, step: Step) -> _Turn | None:
        turn = self._turn
        if turn is None or turn.op_id != op_id or turn.step is not step:
            return None
        return turn


def _names(tools: Any) -> list[str]:
    """Tool names from a message's ``tools`` (strings, or dicts reduced to their name)."""
    if not isinstance(tools, list):
        return []
    names = []
    for tool in tools:
        name = tool.get("name") if isinstance(tool, dict) else tool
        if isinstance(name, str) and name:
            names.append(name)
    return names


def _user_message(frame: Frame) -> ChatMessage | None:
    content = frame.get("content")
    if isinstance(content, str):
        return ChatMessage(role="user", content=content)
    if not isinstance(content, list):
        return None
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            # NodeTool's image part is {"image": {"uri"}}; providers speak OpenAI's shape.
            image = part.get("image") or part.get("image_url") or {}
            uri = image.get("uri") or image.get("url") if isinstance(image, dict) else image
            if isinstance(uri, str):
                parts.append({"type": "image_url", "image_url": {"url": uri}})
    return ChatMessage(role="user", content=parts)


def _arguments(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    """A stored message as plain data for a workflow's ``messages`` input."""
    return {
        "role": message.role,
        "content": message.content,
        "name": message.name,
        "tool_call_id": message.tool_call_id,
        "tool_calls": [
            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls
        ],
    }


def _outputs_text(result: dict[str, Any]) -> str:
    """The final assistant text of a workflow turn: the last value of each output."""
    parts = []
    for values in result.values():
        value = values[-1] if isinstance(values, list) and values else values
        if isinstance(value, list):
            parts.append(" ".join(str(v) for v in value))
        elif value is not None and value != []:
            parts.append(value if isinstance(value, str) else _json_text(value))
    return "\n".join(parts)
