"""Record what a real model answers, and replay it later without a network.

Rules of this module:

* A recording is one readable JSON file per distinct request, named
  ``<model-sanitized>-<key[:16]>.json``, format ``wirechat-recording/1``. It holds the request,
  every item with its offset ``t`` (seconds since the stream was first pulled), the error the
  stream ended with (if any) and whether the consumer cancelled it.
* Requests are matched by :func:`request_key`: a sha256 of the canonical JSON of the model,
  the messages and the tools. Tool-call ids and ``tool_call_id`` are left out (they are random
  per run), so a replayed conversation with tool rounds still matches; sampling options,
  ``max_tokens``, ``stop`` and ``tool_choice`` are left out too (they are recorded, not keyed).
* :class:`RecordingProvider` passes every item through unchanged and untouched in time; the
  file is written when the stream ends (normally, with an error, or cancelled), atomically
  (temp file + ``os.replace``). A failure to write is logged, never raised into the stream.
* :class:`ReplayProvider` loads a directory once, at construction; files it cannot read are
  skipped with a warning. The key of a recording is recomputed from the request stored in
  the file, so a hand-edited request still matches what it now says.
* Replay is deterministic: the same items (tool-call ids included) and the same error, in
  the same order; with ``timing`` at the recorded offsets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, get_args

from wirechat.engine.chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    FinishReason,
    ModelInfo,
    ProviderError,
    ProviderItem,
    TextDelta,
    ToolCall,
    Usage,
)

from .base import ChatProvider

__all__ = ["FORMAT", "RecordingProvider", "ReplayProvider", "recording_filename", "request_key"]

FORMAT = "wirechat-recording/1"
logger = logging.getLogger("wirechat.providers")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_MODEL_CHARS = 64
_FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))
# What the transport reports for a provider that raised something other than ProviderError;
# recording it the same way makes the replay look the same to the client.
_CRASH_MESSAGE = "The model failed"
_T = TypeVar("_T")


# --- the key -----------------------------------------------------------------------------


def request_key(request: ChatRequest) -> str:
    """The sha256 hex digest that identifies ``request`` among recordings.

    Covers the model, the messages (role, content, name, tool calls' names and arguments)
    and the tools (name, description, parameters); tool-call ids and ``tool_call_id`` are
    excluded because they differ on every run.
    """
    messages = [
        _key_message(m.role, m.content, m.name, [(c.name, c.arguments) for c in m.tool_calls])
        for m in request.messages
    ]
    tools = [_key_tool(t.name, t.description, t.parameters) for t in request.tools]
    return _digest(request.model, messages, tools)


def recording_filename(request: ChatRequest) -> str:
    """The file name a recording of ``request`` gets (inside the recording directory)."""
    return _filename(request.model, request_key(request))


def _key_message(
    role: str, content: Any, name: str | None, calls: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    return {
        "role": role,
        "content": content,
        "name": name,
        "tool_calls": [{"name": n, "arguments": a} for n, a in calls],
    }


def _key_tool(name: str, description: str, parameters: Any) -> dict[str, Any]:
    return {"name": name, "description": description, "parameters": parameters}


def _digest(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    canonical = json.dumps(
        {"model": model, "messages": messages, "tools": tools},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _filename(model: str, key: str) -> str:
    # Path separators, spaces and the like never reach the file system; a leading dot or dash
    # would hide the file or read as an option in a shell.
    safe = _UNSAFE.sub("_", model).strip("._-")[:_MAX_MODEL_CHARS] or "model"
    return f"{safe}-{key[:16]}.json"


# --- recording ---------------------------------------------------------------------------


class RecordingProvider:
    """Wraps ``inner`` and writes one recording per request that passes through."""

    def __init__(self, inner: ChatProvider, directory: str | Path) -> None:
        self.inner = inner
        self.directory = Path(directory)
        # Created now, so a bad --record path fails at start-up, not on the first request.
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return self.inner.name

    def serves(self, model: str) -> bool:
        return self.inner.serves(model)

    async def list_models(self) -> list[ModelInfo]:
        return await self.inner.list_models()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        items: list[dict[str, Any]] = []
        finished = False
        source: AsyncIterator[ProviderItem] | None = None
        try:
            try:
                source = self.inner.stream(request)
                async for item in source:
                    items.append(_item_json(item, round(loop.time() - started, 3)))
                    finished = isinstance(item, Finish)
                    yield item
            except ProviderError as exc:
                t = round(loop.time() - started, 3)
                await self._save(request, items, _error_json(exc, t), cancelled=False)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # The consumer went away: written synchronously (small file), since a task
                # being torn down may be cancelled again at any await. Closed right after
                # the Finish is a complete answer, not a cancel.
                self._write(request, items, None, cancelled=not finished)
                raise
            except Exception:
                t = round(loop.time() - started, 3)
                crash = _error_json(ProviderError(_CRASH_MESSAGE, status=500), t)
                await self._save(request, items, crash, cancelled=False)
                raise
            else:
                await self._save(request, items, None, cancelled=False)
        finally:
            # ``async for`` does not close what it iterates; a cancel must reach the inner
            # stream's own ``finally`` blocks (an upstream HTTP response, say).
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _save(
        self,
        request: ChatRequest,
        items: list[dict[str, Any]],
        error: dict[str, Any] | None,
        *,
        cancelled: bool,
    ) -> None:
        await asyncio.to_thread(self._write, request, items, error, cancelled=cancelled)

    def _write(
        self,
        request: ChatRequest,
        items: list[dict[str, Any]],
        error: dict[str, Any] | None,
        *,
        cancelled: bool,
    ) -> None:
        try:
            key = request_key(request)
            document = {
                "format": FORMAT,
                "key": key,
                "model": request.model,
                "provider": self.inner.name,
                "request": _request_json(request),
                "items": items,
                "error": error,
                "cancelled": cancelled,
                "recorded_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            # default=str: an odd option value must not cost the recording.
            text = json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n"
            _write_atomically(self.directory / _filename(request.model, key), text)
        except Exception:
            logger.exception("could not record the answer of %s", request.model)


def _write_atomically(path: Path, text: str) -> None:
    # A unique temp name per writer: concurrent recordings of one request never share a temp
    # file, and the last os.replace wins whole. The ".tmp" suffix keeps it out of a replay.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _request_json(request: ChatRequest) -> dict[str, Any]:
    return {
        "model": request.model,
        "messages": [_message_json(message) for message in request.messages],
        "tools": [_key_tool(t.name, t.description, t.parameters) for t in request.tools],
        "tool_choice": request.tool_choice,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
        "options": request.options,
    }


def _message_json(message: ChatMessage) -> dict[str, Any]:
    return {
        "role": message.role,
        "content": message.content,
        "name": message.name,
        "tool_calls": [
            {"id": call.id, "name": call.name, "arguments": call.arguments}
            for call in message.tool_calls
        ],
        "tool_call_id": message.tool_call_id,
    }


def _item_json(item: ProviderItem, t: float) -> dict[str, Any]:
    if isinstance(item, TextDelta):
        return {"t": t, "type": "text", "text": item.text}
    if isinstance(item, ToolCall):
        return {
            "t": t,
            "type": "tool_call",
            "id": item.id,
            "name": item.name,
            "arguments": item.arguments,
        }
    usage = None
    if item.usage is not None:
        usage = {
            "prompt_tokens": item.usage.prompt_tokens,
            "completion_tokens": item.usage.completion_tokens,
        }
    return {"t": t, "type": "finish", "reason": item.reason, "usage": usage}


def _error_json(error: ProviderError, t: float) -> dict[str, Any]:
    return {
        "t": t,
        "message": error.message,
        "status": error.status,
        "type": error.type,
        "code": error.code,
        "param": error.param,
        "retry_after": error.retry_after,
    }


# --- replay ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RecordedError:
    t: float
    message: str
    status: int
    type: str | None
    code: str | None
    param: str | None
    retry_after: float | None

    def exception(self) -> ProviderError:
        # A fresh exception per replay: a raised exception carries its traceback along.
        return ProviderError(
            self.message,
            status=self.status,
            type=self.type,
            code=self.code,
            param=self.param,
            retry_after=self.retry_after,
        )


@dataclass(frozen=True, slots=True)
class _Recording:
    path: Path
    key: str
    model: str
    items: tuple[tuple[float, ProviderItem], ...]
    error: _RecordedError | None


class _Invalid(ValueError):
    """A recording file that cannot be replayed (the message says why)."""


class ReplayProvider:
    """Answers requests from the recordings in ``directory``, offline and deterministically."""

    def __init__(
        self, directory: str | Path, *, timing: bool = False, name: str = "replay"
    ) -> None:
        self.directory = Path(directory)
        self.timing = timing
        self.name = name
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no recording directory at {self.directory}")
        self._recordings: dict[str, _Recording] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                recording = _load(path)
            except _Invalid as exc:
                logger.warning("skipping recording %s: %s", path, exc)
                continue
            seen = self._recordings.get(recording.key)
            if seen is not None:
                logger.warning(
                    "skipping recording %s: same request as %s", path.name, seen.path.name
                )
                continue
            self._recordings[recording.key] = recording
        self._models = sorted({recording.model for recording in self._recordings.values()})
        logger.info(
            "loaded %d recordings of %d models from %s",
            len(self._recordings),
            len(self._models),
            self.directory,
        )

    def __len__(self) -> int:
        """The number of recordings loaded."""
        return len(self._recordings)

    def serves(self, model: str) -> bool:
        return model in self._models

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id=model, owned_by=self.name, created=0) for model in self._models]

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        key = request_key(request)
        recording = self._recordings.get(key)
        if recording is None:
            logger.warning(
                "no recording matches a request for %s (would be %s)",
                request.model,
                _filename(request.model, key),
            )
            raise ProviderError(
                "No recording matches this request (model, messages, tools)",
                status=404,
                type="invalid_request_error",
                code="recording_not_found",
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, (t, item) in enumerate(recording.items):
            await self._pace(loop, started, t, first=index == 0)
            yield item
        if recording.error is not None:
            await self._pace(loop, started, recording.error.t, first=not recording.items)
            raise recording.error.exception()

    async def _pace(
        self, loop: asyncio.AbstractEventLoop, started: float, t: float, *, first: bool
    ) -> None:
        if self.timing:
            # Against the start, not the previous item: delays do not add up into drift.
            await asyncio.sleep(max(0.0, started + t - loop.time()))
        elif not first:
            # Lets a cancel land and other streams run, as a real model stream would.
            await asyncio.sleep(0)


def _load(path: Path) -> _Recording:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Invalid(f"unreadable: {exc}") from None
    if not isinstance(document, dict):
        raise _Invalid("not a JSON object")
    if document.get("format") != FORMAT:
        raise _Invalid(f"format is not {FORMAT!r}")
    model = _field(document, "model", str)
    request = _field(document, "request", dict)
    key = _key_of_recorded_request(model, request)
    if document.get("key") not in (None, key):
        logger.info("recording %s: request edited by hand, matching on the request", path.name)
    items = tuple(_item(raw) for raw in _field(document, "items", list))
    error = document.get("error")
    cancelled = document.get("cancelled", False)
    if not isinstance(cancelled, bool):
        raise _Invalid("cancelled is not true or false")
    if cancelled:
        # A cancelled stream never got its Finish; replay it as it was cut.
        items = tuple(pair for pair in items if not isinstance(pair[1], Finish))
    return _Recording(
        path=path,
        key=key,
        model=model,
        items=items,
        error=None if error is None else _error(error),
    )


def _key_of_recorded_request(model: str, request: dict[str, Any]) -> str:
    messages = []
    for raw in _field(request, "messages", list):
        if not isinstance(raw, dict):
            raise _Invalid("a message is not an object")
        content = raw.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _Invalid("a message content is not a string, a list or null")
        calls = []
        for call in _optional(raw, "tool_calls", list) or ():
            if not isinstance(call, dict):
                raise _Invalid("a tool call is not an object")
            calls.append((_field(call, "name", str), _field(call, "arguments", str)))
        messages.append(
            _key_message(_field(raw, "role", str), content, _optional(raw, "name", str), calls)
        )
    tools = []
    for raw in _optional(request, "tools", list) or ():
        if not isinstance(raw, dict):
            raise _Invalid("a tool is not an object")
        # The same defaults as ToolSpec, so a hand-written tool may leave them out.
        description = _optional(raw, "description", str) or ""
        parameters = raw.get("parameters", {})
        tools.append(_key_tool(_field(raw, "name", str), description, parameters))
    return _digest(model, messages, tools)


def _item(raw: Any) -> tuple[float, ProviderItem]:
    if not isinstance(raw, dict):
        raise _Invalid("an item is not an object")
    t = _offset(raw)
    kind = raw.get("type")
    if kind == "text":
        return t, TextDelta(text=_field(raw, "text", str))
    if kind == "tool_call":
        return t, ToolCall(
            id=_field(raw, "id", str),
            name=_field(raw, "name", str),
            arguments=_field(raw, "arguments", str),
        )
    if kind == "finish":
        reason = raw.get("reason")
        if reason is not None and reason not in _FINISH_REASONS:
            raise _Invalid(f"unknown finish reason {reason!r}")
        usage = _optional(raw, "usage", dict)
        return t, Finish(
            reason=reason,
            usage=None
            if usage is None
            else Usage(
                prompt_tokens=_count(usage, "prompt_tokens"),
                completion_tokens=_count(usage, "completion_tokens"),
            ),
        )
    raise _Invalid(f"unknown item type {kind!r}")


def _error(raw: Any) -> _RecordedError:
    if not isinstance(raw, dict):
        raise _Invalid("error is not an object or null")
    status = _field(raw, "status", int)
    retry_after = raw.get("retry_after")
    if retry_after is not None and not _is_number(retry_after):
        raise _Invalid("retry_after is not a number or null")
    return _RecordedError(
        t=_offset(raw),
        message=_field(raw, "message", str),
        status=status,
        type=_optional(raw, "type", str),
        code=_optional(raw, "code", str),
        param=_optional(raw, "param", str),
        retry_after=None if retry_after is None else float(retry_after),
    )


def _offset(raw: dict[str, Any]) -> float:
    t = raw.get("t", 0.0)
    if not _is_number(t) or t < 0:
        raise _Invalid("t is not a non-negative number")
    return float(t)


def _count(raw: dict[str, Any], name: str) -> int:
    value = _field(raw, name, int)
    if value < 0:
        raise _Invalid(f"{name} is negative")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _field(raw: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = raw.get(name)
    # bool is an int to Python, never to a recording.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Invalid(f"{name} is missing or not {kind.__name__}")
    return value


def _optional(raw: dict[str, Any], name: str, kind: type[_T]) -> _T | None:
    if raw.get(name) is None:
        return None
    return _field(raw, name, kind)
