"""Chat completions from any OpenAI-compatible upstream (OpenAI, Ollama, vLLM, llama.cpp,
LM Studio, Groq, another wirechat, ...) over httpx.

Rules of this module:

* The httpx clients come from ``UpstreamClients`` (http_clients.py): made lazily in the
  running loop, a few small connection pools instead of one big one.
* Every upstream call streams (``"stream": true`` with usage), whatever the client asked
  for: the engine builds non-streaming answers from the same items.
* No read timeout: the engine enforces the first-item and idle timeouts and cancels the
  consuming task, which closes the upstream response at once (``finally`` below). Only
  connecting is bounded here (and the ``/models`` listing, which the engine does not time).
* Upstream failures become :class:`ProviderError` carrying the upstream status and the
  OpenAI envelope's fields; the engine decides what the client sees (``request_error_for``).
  Connection failures are 502 ``upstream_unreachable``, a connect timeout 504.
* The SSE parser is our own and works on bytes: CR, LF and CRLF line ends split anywhere,
  comments and non-``data`` fields ignored, multi-line data joined with ``\\n``. Splitting on
  bytes keeps U+2028 and friends inside JSON strings intact (``str.splitlines`` would not).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import string
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeGuard

import httpx
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

from .http_clients import UpstreamClients

# How much of an upstream error body is read: enough for any envelope, bounded against junk.
ERROR_BODY_LIMIT = 64 * 1024
# One SSE line or event, and a whole JSON body (/models, a non-streamed completion).
MAX_EVENT_BYTES = 8 * 1024 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024
# /models has no engine-side timeout, and one hung upstream must not hang the listing.
LIST_MODELS_TIMEOUT = 30.0
# After [DONE] the end of the chunked body is usually already in flight; reading it lets the
# connection go back to the pool. Bounded, so an upstream that keeps the body open costs
# nothing but the connection.
DRAIN_TIMEOUT = 0.25
DRAIN_LIMIT = 64 * 1024
# No cap on connections: a cap would queue streams (with no pool timeout) behind other
# streams. Idle connections expire before typical upstream keep-alive timeouts (5 s).

# Fields the request body sets itself; an option of the same name never overrides them.
_RESERVED = frozenset(
    {"model", "messages", "stream", "stream_options", "n", "tools", "tool_choice", "max_tokens",
     "stop", "user"}
)  # fmt: skip
# Options that OpenAI refuses unless tools are sent.
_TOOL_OPTIONS = ("parallel_tool_calls",)
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "function_call",
    # What some non-OpenAI servers say for the same things.
    "eos": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}
# Status for an error that arrives inside a 200 stream and names only its type.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "service_unavailable": 503,
    "overloaded_error": 503,
    "timeout": 504,
    "server_error": 500,
    "api_error": 500,
}
_EOL = re.compile(rb"\r\n|\r|\n")
_SPACES = re.compile(r"\s+")
_ID_ALPHABET = string.ascii_letters + string.digits


class OpenAICompatProvider:
    """Models of one OpenAI-compatible upstream at ``base_url`` (e.g. ``.../v1``)."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None = None,
        models: Sequence[str] = (),
        connect_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        catch_all: bool = False,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self.name = name
        self.base_url = base_url
        base_path = url.path.rstrip("/")
        # copy_with keeps a query string (Azure's ?api-version=...) where it belongs.
        self._chat_url = url.copy_with(path=base_path + "/chat/completions")
        self._models_url = url.copy_with(path=base_path + "/models")
        # For messages: never the userinfo of the URL, never the key.
        self._where = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
        self._configured = tuple(dict.fromkeys(models))
        self._listed: frozenset[str] = frozenset()
        self._catch_all = catch_all
        self._connect_timeout = connect_timeout
        self._headers = httpx.Headers({"user-agent": "wirechat"})
        if headers:
            self._headers.update(headers)
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        # Cleared for good when the upstream refuses ``stream_options`` (Mistral, old servers).
        self._include_usage = True
        self._clients = UpstreamClients(connect_timeout=connect_timeout, headers=self._headers)

    def __repr__(self) -> str:
        return f"OpenAICompatProvider(name={self.name!r}, base_url={self._where!r})"

    def serves(self, model: str) -> bool:
        return self._catch_all or model in self._configured or model in self._listed

    async def list_models(self) -> list[ModelInfo]:
        """The upstream's models (then configured ones it did not list), as ``self.name``'s.

        Raises:
            ProviderError: the listing failed and no models were configured.
        """
        try:
            listed = await self._fetch_models()
        except ProviderError:
            if self._configured:
                return [ModelInfo(id=model, owned_by=self.name) for model in self._configured]
            raise
        self._listed = frozenset(listed)
        models = [ModelInfo(id=i, owned_by=self.name, created=c) for i, c in listed.items()]
        models += [
            ModelInfo(id=model, owned_by=self.name)
            for model in self._configured
            if model not in listed
        ]
        return models

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        # The lease lasts as long as the response is read: its connection is in use.
        with self._clients.lease() as client:
            response = await self._open(client, request)
            try:
                content_type = response.headers.get("content-type", "")
                if content_type.startswith("application/json"):
                    # An upstream that ignores "stream": a whole chat.completion.
                    body = await _read_bounded(response, MAX_JSON_BYTES)
                    for item in self._completion_items(body):
                        yield item
                    return
                assembler = _Assembler(self.name)
                parser = _SSEParser()
                chunks = response.aiter_bytes()
                done = False
                async for data in chunks:
                    for payload in parser.feed(data):
                        if payload.startswith(b"[DONE]"):
                            done = True
                            break
                        for item in assembler.event(payload):
                            yield item
                    if done:
                        break
                else:
                    for payload in parser.close():
                        if payload.startswith(b"[DONE]"):
                            done = True
                            break
                        for item in assembler.event(payload):
                            yield item
                if done:
                    await _drain(chunks)
                for item in assembler.end(done=done):
                    yield item
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, mid_stream=True) from exc
            finally:
                # Runs on cancellation and on aclose() too: the upstream stops generating now.
                await response.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections (a later call opens new ones). Close a provider in
        its own loop: the clients of another loop are dropped (http_clients.py)."""
        await self._clients.aclose()

    # --- HTTP ---------------------------------------------------------------------------

    async def _open(self, client: httpx.AsyncClient, request: ChatRequest) -> httpx.Response:
        """POST the request; the response with a 2xx status, its body not read yet.

        Sent at most twice: once more when a pooled connection turns out to have been closed
        by the upstream before it answered, and once more without ``stream_options`` when
        the upstream refuses that field.
        """
        for attempt in (1, 2):
            body = _request_body(request, include_usage=self._include_usage)
            http_request = client.build_request(
                "POST",
                self._chat_url,
                content=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                # identity: a compressing upstream or proxy would batch the tokens.
                headers={"content-type": "application/json", "accept-encoding": "identity"},
            )
            try:
                response = await client.send(http_request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt == 1:
                    continue
                raise self._transport_error(exc) from exc
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            if response.is_success:
                return response
            try:
                error = await self._status_error(response)
            finally:
                await response.aclose()
            if (
                attempt == 1
                and self._include_usage
                and error.status in (400, 422)
                and "stream_options" in error.message
            ):
                self._include_usage = False
                continue
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_models(self) -> dict[str, int]:
        """``GET /models``: the listed ids (in order, once each) and their ``created``."""
        timeout = httpx.Timeout(LIST_MODELS_TIMEOUT, connect=self._connect_timeout)
        with self._clients.lease() as client:
            http_request = client.build_request("GET", self._models_url, timeout=timeout)
            try:
                response = await client.send(http_request, stream=True)
                try:
                    if not response.is_success:
                        raise await self._status_error(response)
                    body = await _read_bounded(response, MAX_JSON_BYTES)
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
        try:
            parsed: Any = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
        entries = parsed.get("data") if isinstance(parsed, dict) else parsed
        if not isinstance(entries, list):
            raise ProviderError(
                f"Upstream {self.name} answered /models with no model list",
                status=502,
                type="upstream_error",
                code="bad_upstream_response",
            )
        listed: dict[str, int] = {}
        for entry in entries:
            model = entry.get("id") if isinstance(entry, dict) else entry
            if isinstance(model, str) and model and model not in listed:
                created = entry.get("created") if isinstance(entry, dict) else None
                listed[model] = created if _is_int(created) else 0
        return listed

    async def _status_error(self, response: httpx.Response) -> ProviderError:
        """The failure a non-2xx upstream answer stands for (reads a bounded body)."""
        try:
            body = await _read_bounded(response, ERROR_BODY_LIMIT)
        except httpx.HTTPError:
            body = b""
        status = response.status_code
        error = _error_from_body(body)
        message = error.message
        if not message:
            text = _SPACES.sub(" ", body.decode("utf-8", "replace")).strip()[:200]
            message = f"Upstream {self.name} answered HTTP {status} {response.reason_phrase}"
            if 300 <= status < 400 and "location" in response.headers:
                message += f" (redirect to {response.headers['location']}; check base_url)"
            elif text:
                message += f": {text}"
        return ProviderError(
            message,
            status=status,
            type=error.type,
            code=error.code,
            param=error.param,
            retry_after=_retry_after(response.headers),
        )

    def _transport_error(self, exc: httpx.HTTPError, *, mid_stream: bool = False) -> ProviderError:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            verb = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for"
            return ProviderError(
                f"Timed out {verb} upstream {self.name} at {self._where}",
                status=504,
                type="timeout",
                code="upstream_timeout",
            )
        if isinstance(exc, httpx.ConnectError):
            return ProviderError(
                f"Cannot connect to upstream {self.name} at {self._where}: {detail}",
                status=502,
                type="upstream_error",
                code="upstream_unreachable",
            )
        where = " in the middle of the stream" if mid_stream else ""
        return ProviderError(
            f"Connection to upstream {self.name} at {self._where} failed{where}: {detail}",
            status=502,
            type="upstream_error",
            code="upstream_disconnected",
        )

    def _completion_items(self, body: bytes) -> list[ProviderItem]:
        """The items of a non-streamed ``chat.completion`` body."""
        assembler = _Assembler(self.name)
        completion = assembler.decode(body)
        choices = completion.get("choices")
        chunk: dict[str, Any] = {"usage": completion.get("usage")}
        if isinstance(choices, list):
            choice = next((c for c in choices if isinstance(c, dict)), None)
            if choice is not None:
                message = choice.get("message")
                delta = dict(message) if isinstance(message, dict) else {}
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    delta["tool_calls"] = [
                        {**call, "index": i}
                        for i, call in enumerate(calls)
                        if isinstance(call, dict)
                    ]
                content = delta.get("content")
                if isinstance(content, list):
                    delta["content"] = ChatMessage(role="assistant", content=content).text
                chunk["choices"] = [
                    {"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason")}
                ]
        items = assembler.chunk(chunk)
        items += assembler.end(done=True)
        return items


# --- the request body ---------------------------------------------------------------------


def _request_body(request: ChatRequest, *, include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        key: value for key, value in request.options.items() if key not in _RESERVED
    }
    body["model"] = request.model
    body["messages"] = [_message_json(message) for message in request.messages]
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in request.tools
        ]
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
    else:
        # OpenAI refuses tool_choice (even "none") and parallel_tool_calls without tools.
        for key in _TOOL_OPTIONS:
            body.pop(key, None)
    if request.max_tokens is not None:
        # Many local servers know only max_tokens; max_completion_tokens only when asked for.
        body["max_tokens"] = request.max_tokens
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    if request.user is not None:
        body["user"] = request.user
    body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def _message_json(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    out: dict[str, Any] = {
        "role": message.role,
        "content": list(content) if isinstance(content, list) else content,
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


# --- reading answers ----------------------------------------------------------------------


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            total = 0
            async for data in chunks:
                total += len(data)
                if total > DRAIN_LIMIT:
                    return
    except (TimeoutError, httpx.HTTPError):
        pass  # the connection is closed instead of pooled


def _malformed(detail: str) -> ProviderError:
    return ProviderError(
        f"malformed upstream stream: {detail}",
        status=502,
        type="upstream_error",
        code="malformed_upstream_stream",
    )


class _SSEParser:
    """Server-sent events to their ``data`` payloads (bytes, lines joined with ``\\n``)."""

    __slots__ = ("_buffer", "_data", "_size", "_skip_lf")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[bytes] = []
        self._size = 0
        self._skip_lf = False  # the last chunk ended in CR: a leading LF is its CRLF's

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events that ``chunk`` completes."""
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._buffer
        buffer += chunk
        events: list[bytes] = []
        start = 0
        for match in _EOL.finditer(buffer):
            self._line(bytes(buffer[start : match.start()]), events)
            start = match.end()
        if start:
            self._skip_lf = buffer[start - 1 : start] == b"\r" and start == len(buffer)
            del buffer[:start]
        if len(buffer) > MAX_EVENT_BYTES:
            raise _malformed("an event line is too long")
        return events

    def close(self) -> list[bytes]:
        """The payload of an event the body ended in without its blank line, if any."""
        events: list[bytes] = []
        if self._buffer:
            self._line(bytes(self._buffer), events)
            self._buffer.clear()
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
                self._size = 0
            return
        if line[:1] == b":":
            return  # a comment (keep-alive ping)
        name, _, value = line.partition(b":")
        if name != b"data":
            return  # event:, id:, retry: and unknown fields mean nothing to a chat stream
        if value[:1] == b" ":
            value = value[1:]
        self._data.append(value)
        self._size += len(value)
        if self._size > MAX_EVENT_BYTES:
            raise _malformed("an event is too large")


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class _Assembler:
    """Chat completion chunks to provider items; only choice 0 counts (we ask for n=1)."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._calls: dict[int, _PartialCall] = {}
        self._flushed: set[int] = set()
        self._called = False
        self._reason: str | None = None
        self._usage: Usage | None = None

    def decode(self, payload: bytes) -> dict[str, Any]:
        try:
            chunk: Any = json.loads(payload)
        except (ValueError, RecursionError):
            raise _malformed("an event is not JSON") from None
        if not isinstance(chunk, dict):
            raise _malformed("an event is not a JSON object")
        error = chunk.get("error")
        if error:
            raise _event_error(error, self._provider)
        return chunk

    def event(self, payload: bytes) -> list[ProviderItem]:
        return self.chunk(self.decode(payload))

    def chunk(self, chunk: dict[str, Any]) -> list[ProviderItem]:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = Usage(
                prompt_tokens=_count(usage.get("prompt_tokens")),
                completion_tokens=_count(usage.get("completion_tokens")),
            )
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return []
        items: list[ProviderItem] = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    items.append(TextDelta(text=content))
                fragments = delta.get("tool_calls")
                if isinstance(fragments, list):
                    for fragment in fragments:
                        if isinstance(fragment, dict):
                            self._fragment(fragment)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._reason = reason
                items += self._flush()
        return items

    def end(self, *, done: bool) -> list[ProviderItem]:
        """The last items: pending tool calls and the Finish."""
        if not done and self._reason is None:
            raise _malformed("the stream ended before [DONE] and without a finish_reason")
        items: list[ProviderItem] = list(self._flush())
        reason = _FINISH_REASONS.get(self._reason or "")
        if self._called and reason in (None, "stop"):
            # Some servers (Ollama, a few proxies) say "stop" after calling tools.
            reason = "tool_calls"
        items.append(Finish(reason=reason, usage=self._usage))
        return items

    def _fragment(self, fragment: dict[str, Any]) -> None:
        raw_index = fragment.get("index")
        call_id = fragment.get("id")
        if _is_int(raw_index):
            index: int = raw_index
        else:
            # Servers that omit the index send each call whole, or continue the last one.
            last = max(self._calls, default=-1)
            known = self._calls.get(last)
            if known is None or (isinstance(call_id, str) and call_id and call_id != known.id):
                index = max((*self._calls, *self._flushed), default=-1) + 1
            else:
                index = last
        if index in self._flushed:
            return
        call = self._calls.setdefault(index, _PartialCall())
        if isinstance(call_id, str) and call_id and not call.id:
            call.id = call_id
        function = fragment.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name and not call.name:
                call.name = name
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.arguments.append(arguments)
            elif isinstance(arguments, dict):
                call.arguments.append(json.dumps(arguments, separators=(",", ":")))

    def _flush(self) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            if not partial.name:
                raise _malformed("a tool call has no function name")
            calls.append(
                ToolCall(
                    id=partial.id or "call_" + "".join(random.choices(_ID_ALPHABET, k=24)),
                    name=partial.name,
                    # "" is not JSON; servers send it for calls without arguments.
                    arguments="".join(partial.arguments) or "{}",
                )
            )
            self._flushed.add(index)
        self._calls.clear()
        self._called = self._called or bool(calls)
        return calls


# --- errors -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Envelope:
    message: str | None = None
    type: str | None = None
    code: str | None = None
    param: str | None = None


def _error_from_body(body: bytes) -> _Envelope:
    """The fields of an error body: OpenAI's envelope, or what other servers send."""
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):
        return _Envelope()
    if not isinstance(parsed, dict):
        return _Envelope()
    error = parsed.get("error", parsed)  # vLLM <= 0.10 sent the fields at the top level
    envelope = _Envelope()
    if isinstance(error, str):
        envelope.message = error  # {"error": "..."} (Ollama, llama.cpp)
    elif isinstance(error, dict):
        envelope.message = _string(error.get("message"))
        envelope.type = _string(error.get("type"))
        envelope.code = _string(error.get("code"))  # an integer code is just the status
        envelope.param = _string(error.get("param"))
    if envelope.message is None:
        detail = parsed.get("detail")  # FastAPI
        if isinstance(detail, str):
            envelope.message = detail
        elif detail is not None:
            envelope.message = json.dumps(detail)[:500]
    return envelope


def _event_error(error: Any, provider: str) -> ProviderError:
    """The failure an ``{"error": ...}`` event inside a 200 stream reports."""
    if isinstance(error, dict):
        message = _string(error.get("message")) or f"Upstream {provider} failed"
        kind = _string(error.get("type"))
        code = error.get("code")
        status = _TYPE_STATUS.get(kind or "", 502)
        if _is_int(code) and 400 <= code <= 599:
            status = code  # vLLM puts the status there
        return ProviderError(
            message, status=status, type=kind, code=_string(code), param=_string(error.get("param"))
        )
    return ProviderError(str(error)[:500], status=502, type="upstream_error")


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> int:
    return value if _is_int(value) and value >= 0 else 0
