"""A provider for Anthropic's Messages API (``POST /v1/messages``, streamed) over httpx.

Rules of this module:

* Translation is pure and kept apart from I/O: ``_request_body`` turns a
  :class:`~wirechat.engine.chat.ChatRequest` into the Messages API body, ``_Translator``
  turns one upstream SSE event at a time into at most one ``ProviderItem``. ``stream`` and
  ``list_models`` only move bytes.
* One event in, at most one item out, pulled lazily from the socket: the provider never
  reads ahead of its consumer (providers/base.py).
* The upstream response lives inside ``async with client.stream(...)``, so a cancelled or
  closed consumer closes the upstream connection at once instead of letting the model
  generate into the void.
* Every failure is a :class:`~wirechat.engine.chat.ProviderError` whose ``status`` is what the
  failure deserves (engine/errors.py ``request_error_for`` decides what the client sees):
  upstream 4xx/429 pass through with Anthropic's message and error type, 529 ``overloaded``
  becomes 503 with ``Retry-After``, an unreachable upstream 502, a malformed stream 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
    ToolSpec,
    Usage,
)

from .http_clients import UpstreamClients

# Anthropic's stop reasons as OpenAI finish reasons (reference/openai-compat.md §3). An
# unknown reason maps to None, so the engine picks "stop" or "tool_calls" itself.
_FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_OVERLOADED_STATUS = 529
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)
# An upstream error body is a small JSON object; never buffer more than this of one.
_MAX_ERROR_BODY = 64 * 1024
_MODELS_PAGE_LIMIT = 1000
_MAX_MODEL_PAGES = 20
# How long to wait, after message_stop, for the end of the response body.
_DRAIN_TIMEOUT = 1.0


class AnthropicProvider:
    """Claude models through Anthropic's Messages API (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str = "anthropic",
        api_key: str | None,
        base_url: str = "https://api.anthropic.com",
        models: Sequence[str] = (),
        connect_timeout: float = 10.0,
        max_tokens_default: int = 4096,
        version: str = "2023-06-01",
        catch_all: bool = False,
    ) -> None:
        self.name = name
        self._api_key = api_key
        # Anthropic's SDKs take the URL without "/v1"; accept it with, as OpenAI-style URLs go.
        self._base_url = base_url.rstrip("/").removesuffix("/v1")
        self._models = tuple(models)
        self._max_tokens_default = max_tokens_default
        self._version = version
        self._catch_all = catch_all
        self._listed: frozenset[str] = frozenset()
        self._clients = UpstreamClients(connect_timeout=connect_timeout)

    def serves(self, model: str) -> bool:
        return (
            self._catch_all
            or model in self._models
            or model in self._listed
            or model.startswith("claude")
        )

    async def list_models(self) -> list[ModelInfo]:
        """``GET /v1/models`` (every page); the configured models if that fails.

        Raises:
            ProviderError: the listing failed and no models are configured.
        """
        try:
            listed = await self._fetch_models()
        except ProviderError:
            if self._models:
                return [ModelInfo(id=model, owned_by=self.name) for model in self._models]
            raise
        self._listed = frozenset(info.id for info in listed)
        return listed

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        body = _request_body(request, self._max_tokens_default)
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = self._headers("text/event-stream")
        headers["content-type"] = "application/json"
        connected = False
        try:
            with self._clients.lease() as client:
                async with client.stream(
                    "POST", f"{self._base_url}/v1/messages", headers=headers, content=payload
                ) as response:
                    connected = True
                    if response.status_code != 200:
                        raise await _http_error(response)
                    translator = _Translator()
                    async with contextlib.aclosing(_sse_events(response.aiter_lines())) as events:
                        async for event, data in events:
                            item = translator.feed(event, data)
                            if translator.finished:
                                # Read the (empty) rest first: a response read to its end lets
                                # httpx keep the connection for the next request.
                                await _drain(events)
                            if item is not None:
                                yield item
                            if translator.finished:
                                return
                    raise ProviderError(
                        "The Anthropic stream ended before message_stop.", status=502
                    )
        except httpx.TimeoutException as error:
            raise ProviderError(
                f"Timed out connecting to Anthropic: {error}", status=504, code="upstream_timeout"
            ) from error
        except httpx.HTTPError as error:
            if connected:
                raise ProviderError(
                    f"The connection to Anthropic broke mid-response: {error}", status=502
                ) from error
            raise _unreachable(error) from error

    async def aclose(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        await self._clients.aclose()

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"anthropic-version": self._version, "accept": accept}
        if self._api_key is not None:
            headers["x-api-key"] = self._api_key
        return headers

    async def _fetch_models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        params: dict[str, str | int] = {"limit": _MODELS_PAGE_LIMIT}
        for _ in range(_MAX_MODEL_PAGES):
            try:
                with self._clients.lease() as client:
                    response = await client.get(
                        f"{self._base_url}/v1/models",
                        headers=self._headers("application/json"),
                        params=params,
                    )
            except httpx.TimeoutException as error:
                raise ProviderError(
                    f"Timed out connecting to Anthropic: {error}",
                    status=504,
                    code="upstream_timeout",
                ) from error
            except httpx.HTTPError as error:
                raise _unreachable(error) from error
            if response.status_code != 200:
                raise _error_from_body(response.status_code, response.headers, response.content)
            try:
                page = response.json()
            except ValueError as error:
                raise ProviderError("Anthropic sent a model list that is not JSON.") from error
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise ProviderError("Anthropic sent a model list without 'data'.")
            for entry in data:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    created = _timestamp(entry.get("created_at"))
                    models.append(ModelInfo(id=entry["id"], owned_by=self.name, created=created))
            last_id = page.get("last_id")
            if page.get("has_more") is not True or not isinstance(last_id, str):
                break
            params = {"limit": _MODELS_PAGE_LIMIT, "after_id": last_id}
        return models


# --- ChatRequest -> Messages API body ---------------------------------------------------


def _request_body(request: ChatRequest, max_tokens_default: int) -> dict[str, Any]:
    """The ``POST /v1/messages`` body for ``request`` (raises ProviderError 400)."""
    system, messages = _conversation(request.messages)
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens if request.max_tokens is not None else max_tokens_default,
        "messages": messages,
        "stream": True,
    }
    if system:
        body["system"] = system
    if request.tools and request.tool_choice != "none":
        body["tools"] = [_tool(spec) for spec in request.tools]
        choice = _tool_choice(request.tool_choice)
        if request.options.get("parallel_tool_calls") is False:
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            body["tool_choice"] = choice
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    for key in ("temperature", "top_p", "top_k"):
        value = request.options.get(key)
        if value is not None:
            body[key] = value
    if request.user:
        body["metadata"] = {"user_id": request.user}
    return body


def _conversation(messages: Sequence[ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """The system prompt and the alternating user/assistant turns."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages.[{i}]"
        if message.role in ("system", "developer"):
            if message.text:
                system.append(message.text)
            continue
        if message.role == "tool":
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id or "",
            }
            if message.text:
                result["content"] = message.text
            role, blocks = "user", [result]
        elif message.role == "assistant":
            role = "assistant"
            blocks = _content_blocks(message.content, where)
            blocks += [_tool_use(call, f"{where}.tool_calls.[{j}]")
                       for j, call in enumerate(message.tool_calls)]  # fmt: skip
        else:
            # "user", and the legacy "function" result, which has no call id to pair with.
            role, blocks = "user", _content_blocks(message.content, where)
        if not blocks:
            continue  # Anthropic rejects empty messages; an empty one carries nothing anyway.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)  # Anthropic requires strict alternation.
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":
            # Tool results must open their user message, before any text.
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n\n".join(system), turns


def _content_blocks(content: str | list[dict[str, Any]] | None, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        param = f"{where}.content.[{j}]"
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if isinstance(text, str) and text:  # Anthropic rejects empty text blocks.
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), param))
        elif kind == "file":
            blocks.append(_document(part.get("file"), param))
        else:
            raise _unsupported(f"Content parts of type '{kind}' are not supported.", param)
    return blocks


def _image(image: Any, param: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _unsupported("An image_url part needs a 'url'.", param)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    media_type, data = _base64_data_url(url, param)
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _document(file: Any, param: str) -> dict[str, Any]:
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        raise _unsupported("Only files sent inline as 'file_data' are supported.", param)
    if data.startswith("data:"):
        media_type, data = _base64_data_url(data, param)
    else:
        media_type = "application/pdf"  # OpenAI's file parts are PDFs
    source = {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "document", "source": source}


def _base64_data_url(url: str, param: str) -> tuple[str, str]:
    match = _DATA_URL.fullmatch(url)
    if match is None or ";base64" not in match.group(2).lower():
        raise _unsupported("Images must be http(s) URLs or base64 data: URLs.", param)
    return match.group(1) or "application/octet-stream", match.group(3)


def _tool_use(call: ToolCall, param: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise _unsupported(
            "Tool call arguments must be a JSON object.", f"{param}.function.arguments"
        )
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


def _tool(spec: ToolSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    if spec.parameters:
        schema = {"type": "object", **spec.parameters}  # Anthropic insists on the type
    tool: dict[str, Any] = {"name": spec.name, "input_schema": schema}
    if spec.description:
        tool["description"] = spec.description
    return tool


def _tool_choice(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    return None  # absent: Anthropic's default is "auto"


def _unsupported(message: str, param: str) -> ProviderError:
    return ProviderError(message, status=400, type="invalid_request_error", param=param)


# --- Messages API stream -> ProviderItems ------------------------------------------------


async def _sse_events(
    lines: AsyncIterator[str],
) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """Server-sent events as ``(event name, JSON data)``; malformed data is a 502."""
    event = ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    parsed = json.loads(text)
                except (ValueError, RecursionError) as error:
                    raise ProviderError(
                        f"Anthropic sent an event that is not JSON: {text[:200]!r}", status=502
                    ) from error
                if not isinstance(parsed, dict):
                    raise ProviderError("Anthropic sent an event that is not an object.")
                yield event, parsed
            event, data = "", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        # Comments (":"), "id" and "retry" carry nothing for us.


@dataclass(slots=True)
class _ToolBlock:
    id: str
    name: str
    start_input: Any
    parts: list[str] = field(default_factory=list)

    def call(self) -> ToolCall:
        arguments = "".join(self.parts)
        if not arguments.strip():
            # Some blocks arrive whole in content_block_start, with no input_json_delta.
            has_input = isinstance(self.start_input, dict) and self.start_input
            arguments = json.dumps(self.start_input, separators=(",", ":")) if has_input else "{}"
        return ToolCall(id=self.id, name=self.name, arguments=arguments)


class _Translator:
    """Anthropic stream events in, ``ProviderItem`` values out, one event at a time."""

    def __init__(self) -> None:
        self.finished = False
        self._tools: dict[int, _ToolBlock] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._stop_reason: str | None = None

    def feed(self, event: str, data: dict[str, Any]) -> ProviderItem | None:
        kind = data.get("type", event)
        if kind == "message_start":
            message = data.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._count(usage)
        elif kind == "content_block_start":
            return self._block_start(_index(data), data.get("content_block"))
        elif kind == "content_block_delta":
            return self._block_delta(_index(data), data.get("delta"))
        elif kind == "content_block_stop":
            block = self._tools.pop(_index(data), None)
            return block.call() if block is not None else None
        elif kind == "message_delta":
            delta = data.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self._stop_reason = delta["stop_reason"]
            usage = data.get("usage")
            if isinstance(usage, dict):
                self._count(usage)
        elif kind == "message_stop":
            self.finished = True
            reason = _FINISH_REASONS.get(self._stop_reason or "")
            usage = Usage(
                prompt_tokens=self._prompt_tokens, completion_tokens=self._completion_tokens
            )
            return Finish(reason=reason, usage=usage)
        elif kind == "error":
            raise _stream_error(data.get("error"))
        # "ping" and event types added later carry nothing for us (Anthropic's versioning
        # policy says clients must ignore unknown events).
        return None

    def _block_start(self, index: int, block: Any) -> ProviderItem | None:
        if not isinstance(block, dict):
            raise ProviderError("Anthropic sent content_block_start without a block.")
        if block.get("type") == "text":
            text = block.get("text")
            return TextDelta(text=text) if isinstance(text, str) and text else None
        if block.get("type") == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise ProviderError("Anthropic sent a tool_use block without an id or name.")
            self._tools[index] = _ToolBlock(id=call_id, name=name, start_input=block.get("input"))
        # thinking, redacted_thinking and server-side tool blocks are not part of the reply.
        return None

    def _block_delta(self, index: int, delta: Any) -> ProviderItem | None:
        if not isinstance(delta, dict):
            raise ProviderError("Anthropic sent content_block_delta without a delta.")
        if delta.get("type") == "text_delta":
            text = delta.get("text")
            return TextDelta(text=text) if isinstance(text, str) and text else None
        if delta.get("type") == "input_json_delta":
            block = self._tools.get(index)
            partial = delta.get("partial_json")
            if block is None or not isinstance(partial, str):
                raise ProviderError("Anthropic sent input_json_delta outside a tool_use block.")
            block.parts.append(partial)
        return None

    def _count(self, usage: dict[str, Any]) -> None:
        # message_delta repeats the counts cumulatively; the latest value wins.
        if "input_tokens" in usage and usage["input_tokens"] is not None:
            self._prompt_tokens = sum(
                _count(usage.get(key))
                for key in (
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                )
            )
        if usage.get("output_tokens") is not None:
            self._completion_tokens = _count(usage["output_tokens"])


def _index(data: dict[str, Any]) -> int:
    index = data.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise ProviderError(f"Anthropic sent {data.get('type')} without an index.")
    return index


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _stream_error(error: Any) -> ProviderError:
    """A mid-stream ``error`` event: 503 when Anthropic is overloaded, else 502."""
    kind = error.get("type") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    overloaded = kind == "overloaded_error"
    return ProviderError(
        message if isinstance(message, str) and message else "Anthropic stream failed.",
        status=503 if overloaded else 502,
        type=kind if isinstance(kind, str) else None,
        retry_after=1.0 if overloaded else None,
    )


# --- HTTP failures ------------------------------------------------------------------------


async def _http_error(response: httpx.Response) -> ProviderError:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _MAX_ERROR_BODY:
            break
    return _error_from_body(response.status_code, response.headers, bytes(body))


def _error_from_body(status: int, headers: httpx.Headers, body: bytes) -> ProviderError:
    """An upstream error reply (``{"type":"error","error":{"type","message"}}``)."""
    message = f"Anthropic answered HTTP {status}."
    kind: str | None = None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        if isinstance(error.get("message"), str) and error["message"]:
            message = error["message"]
        if isinstance(error.get("type"), str):
            kind = error["type"]
    retry_after = _retry_after(headers.get("retry-after"))
    if status == _OVERLOADED_STATUS:
        # 529 is Anthropic's own; clients and their retry logic understand 503.
        status = 503
        if retry_after is None:
            retry_after = 1.0
    elif status < 400:
        status = 502  # a redirect or other surprise: the upstream misbehaved
    return ProviderError(message, status=status, type=kind, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare upstream, and a guess would be wrong
    return seconds if 0 <= seconds < 86_400 else None


async def _drain(events: AsyncIterator[tuple[str, dict[str, Any]]]) -> None:
    """Read what follows message_stop, within a bound; whatever it is no longer matters."""
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT):
            async for _ in events:
                pass
    except (TimeoutError, ProviderError, httpx.HTTPError):
        pass


def _unreachable(error: httpx.HTTPError) -> ProviderError:
    return ProviderError(
        f"Cannot reach Anthropic: {str(error) or type(error).__name__}",
        status=502,
        code="upstream_unreachable",
    )


def _timestamp(value: Any) -> int:
    if not isinstance(value, str):
        return 0
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
