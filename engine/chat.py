"""Chat domain types shared by the engine and the providers.

Rules of this module:

* Plain data only: frozen, slotted, keyword-only dataclasses. No I/O, no parsing of wire
  formats (that is ``openai.py``), no knowledge of HTTP or WebSockets.
* These are the *only* types a provider sees or produces. The engine turns a validated
  OpenAI request (and, later, a NodeTool chat message) into a :class:`ChatRequest`; a
  provider answers with an async stream of :data:`ProviderItem` values.
* Tool calls have one representation everywhere: :class:`ToolCall` with ``arguments`` as a
  JSON *string* (OpenAI's wire form), whatever the client sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """One call of a tool by the model (``arguments`` is JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One message of a conversation, as sent to a provider.

    ``content`` is a string, a list of OpenAI content parts (kept as plain dicts so an
    upstream provider can pass them through untouched) or ``None``.
    """

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        """The text of the message: the string, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolSpec:
    """A tool the model may call: a name, a description and a JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    """A validated request for one completion (always one choice; see ``n`` in openai.py).

    ``options`` holds the sampling and format fields the client sent that a provider may
    pass upstream (``temperature``, ``top_p``, ``stop``, ``seed``, ``response_format``, ...),
    with ``None`` values already dropped. ``max_tokens`` is the effective output limit
    (``max_completion_tokens`` wins over ``max_tokens``).
    """

    model: str
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    provider: str | None = None
    # False when nobody sees the answer before it is complete (a non-streamed chat
    # completion): a provider may then deliver it in fewer, larger pieces, down to one.
    stream: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDelta:
    """A piece of assistant text, as the model produced it."""

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts of one provider call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish:
    """The last item of a provider stream: why it stopped and what it cost.

    A provider may omit it; the engine then assumes ``stop`` (or ``tool_calls`` when the
    model called tools) and zero usage.
    """

    reason: FinishReason | None = None
    usage: Usage | None = None


ProviderItem = TextDelta | ToolCall | Finish
"""What a provider stream yields, in order: text and tool calls, then at most one Finish."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """One entry of ``/v1/models``."""

    id: str
    owned_by: str
    created: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowSpec:
    """A registered workflow as the engine knows it: data only (the runner lives in providers)."""

    id: str
    name: str = ""
    description: str = ""
    inputs: tuple[str, ...] = ()


class ProviderError(Exception):
    """A provider call failed; raised by providers, reported to the engine.

    ``status`` is the upstream HTTP status (or the status the failure deserves: 404 for an
    unknown model, 502 for a connection failure, 504 for a timeout). The engine decides what
    the client sees from it (see ``errors.client_status_for``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ProviderError({self.message!r}, status={self.status}, code={self.code!r})"
