"""The OpenAI Chat Completions and Models wire format: request parsing and response shapes.

Rules of this module:

* Pure functions over plain values. ``parse_chat_request`` turns a request body into a
  :class:`ParsedChatRequest` or raises :class:`RequestError` carrying the OpenAI envelope's
  ``param`` path (``messages.[2].content``), exactly as OpenAI words it.
* ``null`` is the same as absent for every optional field (reference/openai-compat.md §2).
  Unknown fields are accepted and passed to the provider in ``ChatRequest.options``.
* The shapes written here are those of reference/openai-compat.md §3-§6: every required
  field present (``logprobs: null``, ``refusal: null``), ``created`` an integer, tool-call
  ``arguments`` always a string.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from . import sse
from .chat import ChatMessage, ChatRequest, ModelInfo, ToolCall, ToolSpec, Usage
from .codec import loads_json
from .errors import RequestError

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_USER_PART_TYPES = ("text", "image_url", "input_audio", "file")
# Fields the engine consumes itself; every other non-null field goes to the provider.
_CONSUMED = frozenset(
    {
        "model", "messages", "stream", "stream_options", "n", "tools", "tool_choice",
        "max_tokens", "max_completion_tokens", "stop", "user",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedChatRequest:
    request: ChatRequest
    stream: bool
    include_usage: bool
    n: int
    named_tool_choice: bool


def load_json(body: bytes, max_depth: int = 64) -> Any:
    """Decode a request body, refusing NaN/Infinity, nesting past ``max_depth`` and
    anything that is not JSON."""
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads
        return loads_json(text, max_depth)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        # RecursionError is not a ValueError: deep nesting must still be a 400.
        raise RequestError(
            "We could not parse the JSON body of your request. (HINT: This likely means you"
            " aren't using your HTTP library correctly. The OpenAI API expects a JSON payload,"
            f" but what was sent was not valid JSON: {type(exc).__name__})",
            code="invalid_json",
        ) from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid_type(param: str, expected: str, value: Any) -> RequestError:
    return RequestError(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _invalid_value(param: str, message: str) -> RequestError:
    return RequestError(message, param=param, code="invalid_value")


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid_type(key, "a decimal", value)
    if not math.isfinite(value) or not low <= value <= high:
        raise _invalid_value(
            key,
            f"Invalid '{key}': decimal out of range. Expected a value between {low} and {high}.",
        )
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        # JSON Schema (and OpenAI's schema) counts 2.0 as an integer; some clients send one.
        # is_integer() is False for NaN and the infinities (`1e999` decodes to inf).
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(key, "an integer", value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _invalid_value(key, f"Invalid '{key}': integer out of range. Expected {bound}.")
    return value


def _boolean(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _invalid_type(key, "a boolean", value)
    return value


def _text_parts(content: list[Any], param: str, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    if not content:
        raise _invalid_value(param, f"Invalid '{param}': empty array. Expected at least one part.")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        where = f"{param}.[{i}]"
        if not isinstance(part, dict):
            raise _invalid_type(where, "an object", part)
        kind = part.get("type")
        if kind not in allowed:
            raise _invalid_value(
                f"{where}.type",
                f"Invalid value: '{kind}'. Supported values are: "
                + ", ".join(f"'{a}'" for a in allowed)
                + ".",
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise _invalid_type(f"{where}.text", "a string", part.get("text"))
        if kind == "image_url" and isinstance(part.get("image_url"), str):
            # Ollama's docs send image_url as a bare string; accept it in the OpenAI shape.
            part = {**part, "image_url": {"url": part["image_url"]}}
        parts.append(part)
    return parts


def _tool_call(raw: Any, param: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise _invalid_type(param, "an object", raw)
    call_id = raw.get("id")
    if not isinstance(call_id, str):
        raise _invalid_type(f"{param}.id", "a string", call_id)
    function = raw.get("function")
    if not isinstance(function, dict):
        raise _invalid_type(f"{param}.function", "an object", function)
    name = function.get("name")
    if not isinstance(name, str):
        raise _invalid_type(f"{param}.function.name", "a string", name)
    arguments = function.get("arguments", "")
    if isinstance(arguments, dict):
        # Some clients re-send history with arguments as an object (bug B5): accept it.
        arguments = json.dumps(arguments, separators=(",", ":"))
    elif not isinstance(arguments, str):
        raise _invalid_type(f"{param}.function.arguments", "a string", arguments)
    return ToolCall(id=call_id, name=name, arguments=arguments)


def _message(raw: Any, i: int) -> ChatMessage:
    where = f"messages.[{i}]"
    if not isinstance(raw, dict):
        raise _invalid_type(where, "an object", raw)
    role = raw.get("role")
    if role not in _ROLES:
        raise _invalid_value(
            f"{where}.role",
            f"{role!r} is not one of {list(_ROLES)} - '{where}.role'",
        )
    content = raw.get("content")
    param = f"{where}.content"
    parts: str | list[dict[str, Any]] | None
    if isinstance(content, str):
        parts = content
    elif isinstance(content, list):
        allowed = _USER_PART_TYPES if role == "user" else ("text", "refusal")
        parts = _text_parts(content, param, allowed)
    elif content is None and role in ("assistant", "function"):
        parts = None
    elif content is None:
        raise RequestError(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    else:
        raise _invalid_type(param, "a string or array", content)

    calls: tuple[ToolCall, ...] = ()
    raw_calls = raw.get("tool_calls")
    if raw_calls is not None and role == "assistant":
        if not isinstance(raw_calls, list):
            raise _invalid_type(f"{where}.tool_calls", "an array", raw_calls)
        calls = tuple(_tool_call(c, f"{where}.tool_calls.[{j}]") for j, c in enumerate(raw_calls))

    tool_call_id = raw.get("tool_call_id")
    if role == "tool" and not isinstance(tool_call_id, str):
        raise RequestError(
            f"Missing required parameter: '{where}.tool_call_id'.",
            param=f"{where}.tool_call_id",
            code="missing_required_parameter",
        )
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise _invalid_type(f"{where}.name", "a string", name)
    return ChatMessage(
        role=role,
        content=parts,
        name=name,
        tool_calls=calls,
        tool_call_id=tool_call_id if role == "tool" else None,
    )


def _tools(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    raw = body.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _invalid_type("tools", "an array", raw)
    specs: list[ToolSpec] = []
    for i, tool in enumerate(raw):
        where = f"tools.[{i}]"
        if not isinstance(tool, dict):
            raise _invalid_type(where, "an object", tool)
        if tool.get("type", "function") != "function":
            raise _invalid_value(f"{where}.type", "Only tools of type 'function' are supported.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid_type(f"{where}.function", "an object", function)
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _invalid_value(
                f"{where}.function.name",
                f"Invalid '{where}.function.name': string does not match pattern."
                " Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
            )
        # Only null means absent: `false` or `0` is a wrong type, not a missing value.
        description = function.get("description")
        if description is None:
            description = ""
        elif not isinstance(description, str):
            raise _invalid_type(f"{where}.function.description", "a string", description)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {}
        elif not isinstance(parameters, dict):
            raise _invalid_type(f"{where}.function.parameters", "an object", parameters)
        specs.append(ToolSpec(name=name, description=description, parameters=parameters))
    return tuple(specs)


def _tool_choice(body: dict[str, Any], tools: tuple[ToolSpec, ...]) -> str | dict[str, Any] | None:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _invalid_value(
                "tool_choice",
                f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and 'required'.",
            )
        if choice == "required" and not tools:
            raise _invalid_value("tool_choice", "tool_choice 'required' needs 'tools'.")
        return choice
    if not isinstance(choice, dict):
        raise _invalid_type("tool_choice", "a string or object", choice)
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise _invalid_value(
            "tool_choice", "tool_choice must be {'type': 'function', 'function': {'name': ...}}."
        )
    if name not in {t.name for t in tools}:
        raise _invalid_value(
            "tool_choice", f"Invalid value for 'tool_choice': no function named '{name}' in tools."
        )
    return choice


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid_type("stop", "a string or array of strings", stop)
    if len(stop) > 4:
        raise _invalid_value("stop", "Invalid 'stop': array too long. Expected at most 4 items.")
    return tuple(s for s in stop if s)


def parse_chat_request(
    body: bytes, *, default_model: str | None = None, max_depth: int = 64
) -> ParsedChatRequest:
    """Validate a ``POST /v1/chat/completions`` body (raises :class:`RequestError`)."""
    data = load_json(body, max_depth)
    if not isinstance(data, dict):
        raise _invalid_type("(root)", "an object", data)

    model = data.get("model")
    if model is None or model == "":
        raise RequestError(
            "you must provide a model parameter", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)

    raw_messages = data.get("messages")
    if raw_messages is None:
        raise RequestError(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(raw_messages, list):
        raise _invalid_type("messages", "an array", raw_messages)
    if not raw_messages:
        raise _invalid_value(
            "messages", "Invalid 'messages': empty array. Expected an array with minimum length 1."
        )
    messages = tuple(_message(m, i) for i, m in enumerate(raw_messages))

    stream = bool(_boolean(data, "stream"))
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        # Accepted (and ignored) without stream: SDKs and agents send it by default (bug B14).
        usage_flag = options.get("include_usage")
        if usage_flag is not None and not isinstance(usage_flag, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean", usage_flag)
        include_usage = bool(usage_flag) and stream

    n = _integer(data, "n", 1, 128) or 1
    for key, low, high in (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        _number(data, key, low, high)
    # Both are checked; the newer name wins when both are given.
    max_completion_tokens = _integer(data, "max_completion_tokens", 1)
    legacy_max_tokens = _integer(data, "max_tokens", 1)
    max_tokens = max_completion_tokens if max_completion_tokens is not None else legacy_max_tokens
    logprobs = _boolean(data, "logprobs")
    top_logprobs = _integer(data, "top_logprobs", 0, 20)
    if top_logprobs is not None and not logprobs:
        raise _invalid_value(
            "top_logprobs", "Invalid 'top_logprobs': 'logprobs' must be set to true."
        )
    _boolean(data, "parallel_tool_calls")
    seed = _integer(data, "seed", -(2**63), 2**63 - 1)
    response_format = data.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise _invalid_type("response_format", "an object", response_format)
        kind = response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise _invalid_value(
                "response_format.type",
                f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object',"
                " and 'json_schema'.",
            )
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid_type("user", "a string", user)

    tools = _tools(data)
    tool_choice = _tool_choice(data, tools)
    if tool_choice == "none":
        tools = ()  # the model may not call tools: do not offer them.
    passthrough = {k: v for k, v in data.items() if k not in _CONSUMED and v is not None}
    # Integer fields the provider receives go as integers, even when sent as 2.0.
    for key, number in (("seed", seed), ("top_logprobs", top_logprobs)):
        if number is not None:
            passthrough[key] = number
    request = ChatRequest(
        model=model or default_model or "",
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        max_tokens=max_tokens,
        stop=_stop(data),
        options=passthrough,
        user=user,
        stream=stream,
    )
    return ParsedChatRequest(
        request=request,
        stream=stream,
        include_usage=include_usage,
        n=n,
        named_tool_choice=isinstance(tool_choice, dict),
    )


# --- response shapes -------------------------------------------------------------------


def error_body(error: RequestError) -> dict[str, Any]:
    """The OpenAI error envelope, plus ``detail`` for NodeTool clients (PROTOCOL.md §2)."""
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        },
        "detail": error.message,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def completion_choice(
    index: int, text: str, calls: list[ToolCall], finish_reason: str
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        # A tool-only reply has content null (reference/openai-compat.md §3).
        "content": text if (text or not calls) else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = [tool_call_body(c) for c in calls]
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_completion(
    *, id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_body(usage),
        "system_fingerprint": None,
    }


def chunk_prefix(*, id: str, created: int, model: str) -> bytes:
    """The JSON text every chunk of one stream starts with (id, created, model never vary)."""
    head = sse.dumps(
        {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    )
    return head[:-1] + b","


def chunk_json(prefix: bytes, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
    """One ``chat.completion.chunk`` as JSON text, sharing ``prefix`` with its stream."""
    tail: dict[str, Any] = {"choices": choices}
    if usage is not None:
        tail["usage"] = usage_body(usage)
    return prefix + sse.dumps(tail)[1:]


def content_chunk_frame(prefix: bytes, index: int) -> tuple[bytes, bytes]:
    """The constant bytes around a content delta of choice ``index``: the JSON of a chunk is
    ``head + json.dumps(text) + tail``, the same bytes ``chunk_json`` would produce for
    ``delta_choice(index, {"content": text})``, without encoding the constant part again
    for every token."""
    head = prefix + b'"choices":[{"index":%d,"delta":{"content":' % index
    return head, b'},"logprobs":null,"finish_reason":null}]}'


def delta_choice(
    index: int, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def role_delta(first_is_tool_call: bool) -> dict[str, Any]:
    if first_is_tool_call:
        return {"role": "assistant", "content": None}
    return {"role": "assistant", "content": "", "refusal": None}


def tool_call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """The opening delta of a call (id, type, name, empty arguments), then its arguments.

    The name and id appear only in the opening delta: clients concatenate strings across
    deltas, so repeating them corrupts the name (bug B4).
    """
    opening = {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    deltas = [{"tool_calls": [opening]}]
    if call.arguments:
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    return deltas


def model_body(model: ModelInfo) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


def model_list_body(models: list[ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(m) for m in models]}
