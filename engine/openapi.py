"""The OpenAPI 3.1 description of wirechat's HTTP endpoints, served as ``GET /openapi.json``.

Rules of this module:

* Pure data: no I/O, no clock, nothing but ``json`` and ``typing``. ``openapi_document()``
  builds a fresh dict on every call; ``OPENAPI_JSON`` is its compact JSON encoding, computed
  once at import, which is what the server sends.
* It describes what the server *accepts and answers*, not a wish list: every constraint on
  a request field is one that ``openai.parse_chat_request`` (or the router) enforces with a
  400, and a field the engine passes to the provider unchecked is documented without a type
  (its description says what the provider expects). A fuzzer (schemathesis) holds the server
  to this document, both ways: data valid here must not get a 400, data invalid here must.
* Response schemas list the fields we always send as ``required`` and never forbid extra
  ones, so a provider that adds fields does not break the contract.
* Only the ``/v1`` spelling of the OpenAI routes is listed: they also answer without ``/v1``,
  and most routes with a trailing slash, which the description says once.
"""

from __future__ import annotations

import json
from typing import Any

# The package version (``wirechat.__version__``; a test keeps the two equal). Not imported:
# the engine imports nothing from the rest of the package.
API_VERSION = "0.1.0"

Schema = dict[str, Any]

_DESCRIPTION = """\
wirechat is an OpenAI-compatible (and NodeTool-compatible) chat server. This document \
describes its HTTP endpoints; the WebSocket endpoints `/chat` and `/predict` speak \
NodeTool's protocols and are described in the README.

* **Paths.** The OpenAI routes are listed with their `/v1` prefix only: every one of them \
also answers without it (`/chat/completions`, `/models`, `/models/{model}`), and every \
route but `/openapi.json` also answers with a trailing slash. These aliases are not \
repeated here. \
`GET` routes also answer `HEAD`. A model id in `/v1/models/{model}` may contain raw or \
percent-encoded slashes.
* **Which server serves what.** `wirechat serve` serves every path here. \
`wirechat chat-server` serves the OpenAI routes, `/health` and `/openapi.json` only \
(no `/ping`, no `/workflows`, no `/`); `wirechat worker` serves everything but `/chat` and `/`.
* **Authentication.** With `--auth-provider static` (or `supabase`) every operation except \
`/`, `/health`, `/ping`, `/openapi.json` and `OPTIONS` needs `Authorization: Bearer <token>`; \
a failure is a 401 with `WWW-Authenticate: Bearer`. With `supabase`, a token Supabase \
could not judge (unreachable, failing or too slow) is a 503 `auth_unavailable` with \
`retry-after`, never a pass. With `local` or `none` (the default) nothing is checked.
* **CORS.** `OPTIONS` on any path is a CORS preflight (204), answered without \
authentication. Its `Allow` names the path's methods (`GET, HEAD, OPTIONS` or `POST, \
OPTIONS`, as a 405 does); on a path that names no endpoint, every method the server has.
* **Errors.** Every error is OpenAI's envelope `{"error": {"message", "type", "param", \
"code"}}` (`code` a string or null) plus `"detail"` (the same message, for NodeTool \
clients). An unknown path is a 404 `unknown_url`; a wrong method a 405 with `Allow`.
* **Headers.** Every response carries `x-request-id` (the client's `X-Request-Id` when it \
sent one of 1-128 characters `[A-Za-z0-9._:-]`, else a new one). Responses built by the \
engine also carry `openai-version` and `openai-processing-ms`. 429 and 503 carry \
`retry-after` (integer seconds) and `retry-after-ms` when the cause is known, and \
502/503/504 carry `x-should-retry`, which the official `openai` clients obey.
* **Streaming.** `POST /v1/chat/completions` with `"stream": true` answers \
`text/event-stream`: one `data: <chat.completion.chunk JSON>` event per chunk \
(`#/components/schemas/ChatCompletionChunk`), then `data: [DONE]`. A failure after the \
first event is a `data: {"error": {...}}` event, then `data: [DONE]`.
"""


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


def _nullable(schema: Schema) -> Schema:
    """``schema`` or null: ``null`` is the same as absent for every optional field."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _passthrough(description: str) -> Schema:
    """A field the engine hands to the provider unchecked: documented, not constrained."""
    return {"description": description + " Passed to the provider as sent; not checked here."}


# --- request schemas ------------------------------------------------------------------------


def _content_parts() -> dict[str, Schema]:
    text = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }

    def part(kind: str, field: str, shape: str) -> Schema:
        return {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"const": kind},
                field: {"description": f"{shape} Passed to the provider as sent."},
            },
        }

    return {
        "TextContentPart": text,
        "ImageUrlContentPart": part(
            "image_url",
            "image_url",
            '`{"url": "https://... or data:image/png;base64,...", "detail": "auto|low|high"}`,'
            " or the URL as a bare string (Ollama's form).",
        ),
        "InputAudioContentPart": part(
            "input_audio", "input_audio", '`{"data": "<base64>", "format": "wav|mp3"}`.'
        ),
        "FileContentPart": part(
            "file", "file", '`{"filename": "...", "file_data": "<base64>", "file_id": "file-..."}`.'
        ),
        "RefusalContentPart": part("refusal", "refusal", "The refusal text (a string)."),
    }


def _content(parts: list[str], *, required: bool, description: str) -> Schema:
    array = {
        "type": "array",
        "minItems": 1,
        "items": {"oneOf": [_schema(p) for p in parts]},
    }
    branches: list[Schema] = [{"type": "string"}, array]
    if not required:
        branches.append({"type": "null"})
    return {"description": description, "oneOf": branches}


def _message(role: str, description: str, content: Schema, **extra: Schema) -> Schema:
    required = ["role"]
    if role in ("system", "developer", "user", "tool"):
        required.append("content")
    if role == "tool":
        required.append("tool_call_id")
    return {
        "type": "object",
        "description": description,
        "required": required,
        "properties": {
            "role": {"const": role},
            "content": content,
            "name": _nullable(
                {"type": "string", "description": "An optional name for the participant."}
            ),
            **extra,
        },
    }


def _messages() -> dict[str, Schema]:
    # Every role but `user` takes text and refusal parts (OpenAI: refusal for assistant only).
    instructions = ["TextContentPart", "RefusalContentPart"]
    user_parts = [
        "TextContentPart",
        "ImageUrlContentPart",
        "InputAudioContentPart",
        "FileContentPart",
    ]
    tool_call = {
        "type": "object",
        "required": ["id", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"description": 'Always `"function"`; not checked.'},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "arguments": {
                        "description": "The arguments as JSON text (an object is accepted"
                        " too and re-encoded as text).",
                        "type": ["string", "object"],
                    },
                },
            },
        },
    }
    return {
        "SystemMessage": _message(
            "system",
            "Instructions for the model.",
            _content(instructions, required=True, description="Text, or text parts."),
        ),
        "DeveloperMessage": _message(
            "developer",
            "Instructions for the model (treated like `system` by models that lack the role).",
            _content(instructions, required=True, description="Text, or text parts."),
        ),
        "UserMessage": _message(
            "user",
            "A message from the user.",
            _content(
                user_parts,
                required=True,
                description="Text, or parts: text, image, audio, file.",
            ),
        ),
        "AssistantMessage": _message(
            "assistant",
            "A previous reply of the model.",
            _content(
                instructions,
                required=False,
                description="Text, text parts or one refusal part; null (or absent) when the"
                " reply only called tools.",
            ),
            tool_calls=_nullable({"type": "array", "items": tool_call}),
            refusal=_passthrough("The refusal text, or null."),
        ),
        "ToolMessage": _message(
            "tool",
            "The result of a tool call.",
            _content(instructions, required=True, description="The result, as text."),
            tool_call_id={
                "type": "string",
                "description": "The `id` of the call in a previous assistant message.",
            },
        ),
        "FunctionMessage": {
            **_message(
                "function",
                "Deprecated: the result of a legacy `function_call`.",
                _content(instructions, required=False, description="The result, or null."),
            ),
            "deprecated": True,
        },
    }


def _tools() -> dict[str, Schema]:
    return {
        "FunctionTool": {
            "type": "object",
            "required": ["function"],
            "properties": {
                "type": {"const": "function", "description": "The default; the only one."},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                        "description": _nullable({"type": "string"}),
                        "parameters": _nullable(
                            {
                                "type": "object",
                                "description": "A JSON Schema object; absent means no parameters.",
                            }
                        ),
                        "strict": _passthrough("Whether to follow `parameters` exactly."),
                    },
                },
            },
        },
        "ToolChoice": {
            "description": "`none` (tools are not offered), `auto`, `required` (needs"
            " `tools`), or a named function, which must be one of `tools` (otherwise 400).",
            "oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"const": "function"},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
                            },
                        },
                    },
                },
            ],
        },
    }


def _chat_request() -> Schema:
    def number(low: float, high: float, default: float, text: str) -> Schema:
        return _nullable(
            {"type": "number", "minimum": low, "maximum": high, "default": default}
        ) | {"description": text}

    def integer(text: str, low: int, high: int | None = None) -> Schema:
        schema: Schema = {"type": "integer", "minimum": low}
        if high is not None:
            schema["maximum"] = high
        return _nullable(schema) | {"description": text}

    properties: dict[str, Schema] = {
        "model": {
            "type": "string",
            "minLength": 1,
            "examples": ["echo"],
            "description": "The model id (`GET /v1/models`), optionally `provider/model`."
            " An unknown model is a 404 `model_not_found`. `echo` is always there.",
        },
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": _schema("ChatMessage"),
            "description": "The conversation so far, oldest first.",
        },
        "stream": _nullable({"type": "boolean", "default": False})
        | {"description": "`true`: answer `text/event-stream` (never chosen by `Accept`)."},
        "stream_options": _nullable(
            {
                "type": "object",
                "properties": {
                    "include_usage": _nullable(
                        {
                            "type": "boolean",
                            "description": "Send a last chunk with `usage` and `choices: []`.",
                        }
                    ),
                },
            }
        )
        | {"description": "Options of a stream; accepted (and ignored) without `stream`."},
        "n": integer("How many choices to generate.", 1, 128),
        "temperature": number(0, 2, 1, "Sampling temperature."),
        "top_p": number(0, 1, 1, "Nucleus sampling."),
        "presence_penalty": number(-2, 2, 0, "Presence penalty."),
        "frequency_penalty": number(-2, 2, 0, "Frequency penalty."),
        "max_tokens": integer(
            "Deprecated upper bound on generated tokens (`max_completion_tokens` wins).", 1
        ),
        "max_completion_tokens": integer("Upper bound on generated tokens.", 1),
        "stop": {
            "description": "Up to 4 sequences; the reply stops before the first one.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "maxItems": 4, "items": {"type": "string"}},
                {"type": "null"},
            ],
        },
        "seed": integer("Best-effort determinism.", -(2**63), 2**63 - 1),
        "logprobs": _nullable({"type": "boolean"})
        | {"description": "Return log probabilities (when the provider supports it)."},
        "top_logprobs": integer("Needs `logprobs: true`.", 0, 20),
        "tools": _nullable({"type": "array", "items": _schema("FunctionTool")})
        | {"description": "Functions the model may call."},
        "tool_choice": _nullable(_schema("ToolChoice")),
        "parallel_tool_calls": _nullable({"type": "boolean"})
        | {"description": "Whether the model may call several tools at once."},
        "response_format": _nullable(
            {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["text", "json_object", "json_schema"]},
                    "json_schema": _passthrough(
                        "With `json_schema`: `{name, description, schema, strict}`."
                    ),
                },
            }
        )
        | {"description": "The reply's format."},
        "user": _nullable({"type": "string"})
        | {"description": "Deprecated end-user identifier; accepted and not used."},
        "logit_bias": _passthrough("Token id to bias (-100..100)."),
        "metadata": _passthrough("String to string map."),
        "store": _passthrough("Boolean."),
        "modalities": _passthrough('`["text"]` or `["text", "audio"]`.'),
        "audio": _passthrough("Audio output options `{voice, format}`."),
        "prediction": _passthrough("Predicted output."),
        "reasoning_effort": _passthrough("`none|minimal|low|medium|high|xhigh|max`."),
        "verbosity": _passthrough("`low|medium|high`."),
        "service_tier": _passthrough("`auto|default|flex|scale|priority|fast`."),
        "web_search_options": _passthrough("Web search options."),
        "safety_identifier": _passthrough("End-user identifier."),
        "prompt_cache_key": _passthrough("Cache key."),
        "functions": {
            **_passthrough("Deprecated legacy function definitions."),
            "deprecated": True,
        },
        "function_call": {**_passthrough("Deprecated legacy function choice."), "deprecated": True},
    }
    return {
        "type": "object",
        "description": "OpenAI's `CreateChatCompletionRequest`. `null` is the same as absent"
        " for every optional field. Unknown fields are accepted and passed to the provider.",
        "required": ["model", "messages"],
        "properties": properties,
        "additionalProperties": True,
        "allOf": [
            {
                "if": {
                    "required": ["top_logprobs"],
                    "properties": {"top_logprobs": {"type": "integer"}},
                },
                "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
            },
            {
                "if": {
                    "required": ["tool_choice"],
                    "properties": {"tool_choice": {"enum": ["required"]}},
                },
                "then": {
                    "required": ["tools"],
                    "properties": {"tools": {"type": "array", "minItems": 1}},
                },
            },
            {
                "if": {
                    "required": ["tool_choice"],
                    "properties": {"tool_choice": {"type": "object"}},
                },
                "then": {
                    "required": ["tools"],
                    "properties": {"tools": {"type": "array", "minItems": 1}},
                },
            },
        ],
        "examples": [
            {
                "model": "echo",
                "messages": [
                    {"role": "system", "content": "Answer tersely."},
                    {"role": "user", "content": "Hello, wirechat!"},
                ],
                "stream": False,
            }
        ],
    }


# --- response schemas -----------------------------------------------------------------------


def _responses_schemas() -> dict[str, Schema]:
    tool_call = {
        "type": "object",
        "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {
                    "name": {"type": "string"},
                    "arguments": {"type": "string", "description": "JSON text."},
                },
            },
        },
    }
    finish_reason = {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]}
    count = {"type": "integer", "minimum": 0}
    delta_call = {
        "type": "object",
        "required": ["index"],
        "properties": {
            "index": count,
            "id": {"type": "string", "description": "Only in the call's first delta."},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "Only in the call's first delta."},
                    "arguments": {"type": "string", "description": "A fragment of JSON text."},
                },
            },
        },
    }
    return {
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": count,
                "completion_tokens": count,
                "total_tokens": count,
                "prompt_tokens_details": {"type": "object"},
                "completion_tokens_details": {"type": "object"},
            },
        },
        "ToolCall": tool_call,
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string", "description": "`chatcmpl-` and a random suffix."},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer", "description": "Unix seconds."},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "message", "finish_reason", "logprobs"],
                        "properties": {
                            "index": count,
                            "message": {
                                "type": "object",
                                "required": ["role", "content", "refusal"],
                                "properties": {
                                    "role": {"const": "assistant"},
                                    "content": {
                                        "type": ["string", "null"],
                                        "description": "null when the reply only calls tools.",
                                    },
                                    "refusal": {"type": ["string", "null"]},
                                    "tool_calls": {"type": "array", "items": _schema("ToolCall")},
                                },
                            },
                            "finish_reason": finish_reason,
                            "logprobs": {"type": ["object", "null"]},
                        },
                    },
                },
                "usage": _schema("Usage"),
                "system_fingerprint": {"type": ["string", "null"]},
            },
        },
        "ChatCompletionChunk": {
            "type": "object",
            "description": "One `data:` event of a stream. The same `id`, `created` and"
            " `model` on every chunk; the first chunk of a choice carries the role, the last"
            " one `finish_reason` and an empty `delta`; with `stream_options.include_usage`"
            " a last chunk has `choices: []` and `usage`.",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion.chunk"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "delta", "finish_reason"],
                        "properties": {
                            "index": count,
                            "delta": {
                                "type": "object",
                                "properties": {
                                    "role": {"const": "assistant"},
                                    "content": {"type": ["string", "null"]},
                                    "refusal": {"type": ["string", "null"]},
                                    "tool_calls": {"type": "array", "items": delta_call},
                                },
                            },
                            "logprobs": {"type": ["object", "null"]},
                            "finish_reason": {
                                **finish_reason,
                                "enum": [*finish_reason["enum"], None],
                            },
                        },
                    },
                },
                "usage": _schema("Usage"),
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer", "description": "Unix seconds."},
                "owned_by": {"type": "string", "description": "The provider's name."},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": _schema("Model")},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "timestamp"],
            "properties": {
                "status": {"const": "healthy"},
                "timestamp": {"type": "string", "format": "date-time"},
            },
        },
        "WorkflowList": {
            "type": "object",
            "required": ["workflows"],
            "properties": {
                "workflows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "name", "description", "inputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "name": {"type": "string"},
                            "description": {"type": "string"},
                            "inputs": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                }
            },
        },
        "WorkflowInputs": {
            "type": "object",
            "description": "The workflow's inputs by name (see `GET /workflows`). An empty"
            " body is the same as `{}`.",
            "additionalProperties": True,
        },
        "WorkflowResult": {
            "type": "object",
            "required": ["job_id", "status", "results"],
            "properties": {
                "job_id": {"type": "string"},
                "status": {"const": "completed"},
                "results": {"type": "object", "description": "The workflow's outputs by name."},
            },
        },
        "Error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {
                    "type": "string",
                    "description": "`invalid_request_error`, `rate_limit_error`,"
                    " `upstream_error`, `timeout`, `service_unavailable`, ...",
                },
                "param": {
                    "type": ["string", "null"],
                    "description": "The offending field's path, e.g. `messages.[2].content`.",
                },
                "code": {
                    "type": ["string", "null"],
                    "description": "`invalid_api_key`, `model_not_found`, `unknown_url`,"
                    " `invalid_type`, `invalid_value`, ...",
                },
            },
        },
        "ErrorResponse": {
            "type": "object",
            "description": "OpenAI's error envelope, plus `detail` (the message) for NodeTool.",
            "required": ["error", "detail"],
            "properties": {"error": _schema("Error"), "detail": {"type": "string"}},
        },
        "StreamError": {
            "type": "object",
            "description": "A failure after a stream started; `data: [DONE]` follows.",
            "required": ["error"],
            "properties": {"error": _schema("Error")},
        },
        "ChatCompletionEvent": _event(
            "One event of a chat completion stream: a chunk, an error, or `[DONE]`.",
            {"anyOf": [_schema("ChatCompletionChunk"), _schema("StreamError")]},
        ),
        "WorkflowEvent": _event(
            "One event of a workflow run: a job event (`job_update`, `node_update`,"
            ' `node_progress`, `output_update`), then `{"type": "complete", "job_id",'
            ' "results"}` or `{"type": "error", "job_id", "error"}`, then `[DONE]`.',
            {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string"}, "job_id": {"type": "string"}},
            },
        ),
    }


# --- headers and responses -------------------------------------------------------------------


def _headers() -> dict[str, Schema]:
    def header(text: str, schema: Schema, *, required: bool = False) -> Schema:
        return {"description": text, "required": required, "schema": schema}

    return {
        "XRequestId": header(
            "The request's id: the client's `X-Request-Id` when it sent a sane one.",
            {"type": "string", "minLength": 1},
            required=True,
        ),
        "OpenAIProcessingMs": header(
            "Milliseconds from the request to the response head.",
            {"type": "integer", "minimum": 0},
        ),
        "OpenAIVersion": header("Always `2020-10-01`.", {"type": "string"}),
        "RetryAfter": header(
            "Seconds to wait before retrying (when the cause is known).",
            {"type": "integer", "minimum": 0},
        ),
        "RetryAfterMs": header("The same, in milliseconds.", {"type": "integer", "minimum": 0}),
        "XShouldRetry": header(
            "Whether a retry can help; the official `openai` clients obey it.",
            {"enum": ["true", "false"]},
        ),
        "WWWAuthenticate": header("`Bearer`.", {"type": "string"}, required=True),
        "Allow": header("The methods the path answers.", {"type": "string"}, required=True),
    }


_COMMON_HEADERS = {
    "x-request-id": _ref("headers", "XRequestId"),
    "openai-processing-ms": _ref("headers", "OpenAIProcessingMs"),
    "openai-version": _ref("headers", "OpenAIVersion"),
}

_ERRORS: dict[str, tuple[str, str, dict[str, Schema]]] = {
    # name: (status, description, headers beyond the common ones)
    "BadRequest": (
        "400",
        "The request is malformed or a field is invalid (`param` names it). JSON nested more"
        " than 64 levels deep (`--max-depth`) is refused too, wherever it is.",
        {},
    ),
    "Unauthorized": (
        "401",
        "Missing or invalid bearer token (`code: invalid_api_key`).",
        {"www-authenticate": _ref("headers", "WWWAuthenticate")},
    ),
    "NotFound": ("404", "Unknown model (`model_not_found`), workflow or path.", {}),
    "MethodNotAllowed": (
        "405",
        "The path does not answer this method.",
        {"allow": _ref("headers", "Allow")},
    ),
    "RequestTimeout": ("408", "The request was not received in time; the connection closes.", {}),
    "PayloadTooLarge": ("413", "The body is over the limit (8 MiB by default).", {}),
    "URITooLong": ("414", "The request line is over the limit.", {}),
    "TooManyRequests": (
        "429",
        "A rate limit (the upstream's, passed through).",
        {
            "retry-after": _ref("headers", "RetryAfter"),
            "retry-after-ms": _ref("headers", "RetryAfterMs"),
        },
    ),
    "HeaderFieldsTooLarge": ("431", "The request head is over the limit.", {}),
    "BadGateway": (
        "502",
        "The upstream failed (a 5xx, a refused connection, or it refused our own key).",
        {"x-should-retry": _ref("headers", "XShouldRetry")},
    ),
    "ServiceUnavailable": (
        "503",
        "Overloaded, shutting down, the upstream is unavailable, or (supabase auth) the token"
        " could not be verified.",
        {
            "retry-after": _ref("headers", "RetryAfter"),
            "retry-after-ms": _ref("headers", "RetryAfterMs"),
            "x-should-retry": _ref("headers", "XShouldRetry"),
        },
    ),
    "GatewayTimeout": (
        "504",
        "The model sent nothing in time.",
        {"x-should-retry": _ref("headers", "XShouldRetry")},
    ),
}


def _error_responses() -> dict[str, Schema]:
    return {
        name: {
            "description": description,
            "headers": {**_COMMON_HEADERS, **headers},
            "content": {"application/json": {"schema": _schema("ErrorResponse")}},
        }
        for name, (_, description, headers) in _ERRORS.items()
    }


# What any request may meet: a bad head, a wrong method, a slow or oversized request, shutdown.
_ALWAYS = (
    "BadRequest",
    "MethodNotAllowed",
    "RequestTimeout",
    "PayloadTooLarge",
    "URITooLong",
    "HeaderFieldsTooLarge",
    "ServiceUnavailable",
)


def _errors(*names: str) -> dict[str, Schema]:
    """The error responses of an operation: ``names`` and those any request may meet."""
    chosen = set(names) | set(_ALWAYS)
    return {
        status: _ref("responses", name)
        for name, (status, _, _) in sorted(_ERRORS.items(), key=lambda kv: kv[1][0])
        if name in chosen
    }


def _ok(description: str, content: dict[str, Schema]) -> Schema:
    return {"description": description, "headers": dict(_COMMON_HEADERS), "content": content}


def _json(name: str) -> dict[str, Schema]:
    return {"application/json": {"schema": _schema(name)}}


def _event_stream(event: str) -> dict[str, Schema]:
    return {"text/event-stream": {"schema": _schema(event)}}


def _event(description: str, payload: Schema) -> Schema:
    """One server-sent event, read as OpenAPI 3.2 (and schemathesis) read ``text/event-stream``:
    an object with the event's fields. The body as a whole is text: ``data: <JSON>`` lines
    with a blank line after each, no ``event:`` or ``id:`` lines, the last one ``[DONE]``."""
    return {
        "type": "object",
        "description": description,
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]", "description": "The end of the stream."},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": payload,
                    },
                ]
            }
        },
    }


# --- paths ----------------------------------------------------------------------------------


def _path_parameter(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


def _paths() -> dict[str, Schema]:
    public: list[dict[str, list[str]]] = []  # overrides the document's bearer requirement
    secured = ("Unauthorized",)
    workflow_id = _path_parameter("workflow_id", "A workflow id from `GET /workflows`.")
    workflow_body = {
        "required": False,
        "content": {"application/json": {"schema": _schema("WorkflowInputs")}},
    }
    health = {
        "tags": ["Health"],
        "security": public,
        "responses": {"200": _ok("The server is up.", _json("Health")), **_errors()},
    }
    return {
        "/v1/chat/completions": {
            "post": {
                "tags": ["OpenAI"],
                "operationId": "createChatCompletion",
                "summary": "Create a chat completion (JSON, or SSE with `stream: true`).",
                "description": "Also answers as `POST /chat/completions`. Validation happens"
                " before the status line: every request error is a plain 4xx. A provider"
                " failure before the first token is a plain HTTP error (429 and 503 keep"
                " `Retry-After`, other upstream 4xx pass through, upstream 5xx become 502,"
                ' timeouts 504); after it, a `data: {"error": ...}` event and'
                " `data: [DONE]`. A client that disconnects cancels the model call.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _schema("ChatCompletionRequest")}},
                },
                "responses": {
                    "200": _ok(
                        "The completion: `application/json` (a `chat.completion`), or"
                        " `text/event-stream` when the body has `stream: true`.",
                        {
                            **_json("ChatCompletion"),
                            **_event_stream("ChatCompletionEvent"),
                        },
                    ),
                    **_errors(
                        *secured, "NotFound", "TooManyRequests", "BadGateway", "GatewayTimeout"
                    ),
                    "4XX": {
                        "description": "Another client error of the upstream, passed through.",
                        "headers": dict(_COMMON_HEADERS),
                        "content": _json("ErrorResponse"),
                    },
                },
            }
        },
        "/v1/models": {
            "get": {
                "tags": ["OpenAI"],
                "operationId": "listModels",
                "summary": "List the models of every configured provider.",
                "description": "Also answers as `GET /models`. `owned_by` names the provider;"
                " an upstream that fails is skipped.",
                "responses": {"200": _ok("The models.", _json("ModelList")), **_errors(*secured)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "tags": ["OpenAI"],
                "operationId": "retrieveModel",
                "summary": "One model.",
                "description": "Also answers as `GET /models/{model}`.",
                "parameters": [
                    _path_parameter("model", "The model id; slashes may be raw or percent-encoded.")
                ],
                "responses": {
                    "200": _ok("The model.", _json("Model")),
                    **_errors(*secured, "NotFound"),
                },
            }
        },
        "/health": {
            "get": {
                **health,
                "operationId": "health",
                "summary": "Liveness; no authentication.",
            }
        },
        "/ping": {
            "get": {
                **health,
                "operationId": "ping",
                "summary": "The same as `/health` (not on `wirechat chat-server`).",
            }
        },
        "/workflows": {
            "get": {
                "tags": ["Workflows"],
                "operationId": "listWorkflows",
                "summary": "The registered workflows.",
                "responses": {
                    "200": _ok("The workflows.", _json("WorkflowList")),
                    **_errors(*secured),
                },
            }
        },
        "/workflows/{workflow_id}/run": {
            "post": {
                "tags": ["Workflows"],
                "operationId": "runWorkflow",
                "summary": "Run a workflow to its end and return its results.",
                "description": "The job belongs to the request: a client that disconnects"
                " cancels it. A workflow that fails is a 500 (`type: workflow_error`,"
                " `code: failed`); one that is cancelled a 409.",
                "parameters": [workflow_id],
                "requestBody": workflow_body,
                "responses": {
                    "200": _ok("The workflow completed.", _json("WorkflowResult")),
                    **_errors(*secured, "NotFound"),
                    "409": {
                        "description": "The workflow was cancelled.",
                        "headers": dict(_COMMON_HEADERS),
                        "content": _json("ErrorResponse"),
                    },
                    "500": {
                        "description": "The workflow failed (`code: failed`).",
                        "headers": dict(_COMMON_HEADERS),
                        "content": _json("ErrorResponse"),
                    },
                },
            }
        },
        "/workflows/{workflow_id}/run/stream": {
            "post": {
                "tags": ["Workflows"],
                "operationId": "streamWorkflow",
                "summary": "Run a workflow, streaming its events.",
                "description": "Server-sent events: the job's events (`job_update`,"
                " `node_update`, `node_progress`, `output_update`), then"
                ' `{"type": "complete", "job_id", "results"}` (or `{"type": "error",'
                ' "job_id", "error"}`) and `data: [DONE]`.',
                "parameters": [workflow_id],
                "requestBody": workflow_body,
                "responses": {
                    "200": _ok(
                        "The job's events.",
                        _event_stream("WorkflowEvent"),
                    ),
                    **_errors(*secured, "NotFound"),
                },
            }
        },
        "/": {
            "get": {
                "tags": ["Meta"],
                "operationId": "getPlayground",
                "summary": "The web playground: a chat page over `/chat`; no authentication.",
                "description": "A static, self-contained HTML page (`wirechat serve` only; not"
                " with `--no-playground`, which leaves `/` a 404). A token the server needs is"
                " pasted into the page and sent by the browser. The page is served with a"
                " strict `Content-Security-Policy` (its own inline script and style by hash,"
                " connections to this origin only), `X-Content-Type-Options: nosniff` and"
                " `Cache-Control: no-cache`.",
                "security": public,
                "responses": {
                    "200": _ok("The page.", {"text/html": {"schema": {"type": "string"}}}),
                    **_errors(),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["Meta"],
                "operationId": "getMetrics",
                "summary": "The server's metrics, in the Prometheus text format.",
                "description": "Requests by endpoint and status, latency and time to first"
                " token, tokens by model, provider errors, open WebSockets, streams and jobs"
                " (README: Observability). The API's authentication applies unless the server"
                " runs with `--metrics-public`; with `--no-metrics` this is a 404. Each"
                " `--workers` process answers with its own counts.",
                "responses": {
                    "200": _ok(
                        "The exposition.",
                        {"text/plain": {"schema": {"type": "string"}}},
                    ),
                    **_errors(*secured),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["Meta"],
                "operationId": "getOpenapi",
                "summary": "This document; no authentication.",
                "security": public,
                "responses": {
                    "200": _ok(
                        "The OpenAPI 3.1 document.",
                        {"application/json": {"schema": {"type": "object"}}},
                    ),
                    **_errors(),
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of wirechat's HTTP endpoints (a fresh dict every call)."""
    schemas: dict[str, Schema] = {
        "ChatCompletionRequest": _chat_request(),
        "ChatMessage": {
            "description": "One message, by `role`.",
            "oneOf": [
                _schema(name)
                for name in (
                    "SystemMessage",
                    "DeveloperMessage",
                    "UserMessage",
                    "AssistantMessage",
                    "ToolMessage",
                    "FunctionMessage",
                )
            ],
            "discriminator": {
                "propertyName": "role",
                "mapping": {
                    "system": "#/components/schemas/SystemMessage",
                    "developer": "#/components/schemas/DeveloperMessage",
                    "user": "#/components/schemas/UserMessage",
                    "assistant": "#/components/schemas/AssistantMessage",
                    "tool": "#/components/schemas/ToolMessage",
                    "function": "#/components/schemas/FunctionMessage",
                },
            },
        },
        **_messages(),
        **_content_parts(),
        **_tools(),
        **_responses_schemas(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wirechat",
            "version": API_VERSION,
            "summary": "An OpenAI-compatible and NodeTool-compatible chat server.",
            "description": _DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "OpenAI", "description": "OpenAI's Chat Completions and Models API."},
            {"name": "Workflows", "description": "Run registered workflows over HTTP."},
            {"name": "Health", "description": "Liveness probes."},
            {"name": "Meta", "description": "This document and the web playground."},
        ],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of `WORKER_AUTH_TOKEN` (or the config file's"
                    " keys) with `--auth-provider static`; unchecked with `local`/`none`.",
                }
            },
            "schemas": schemas,
            "headers": _headers(),
            "responses": _error_responses(),
        },
    }


OPENAPI_JSON: bytes = json.dumps(openapi_document(), separators=(",", ":")).encode("ascii")
