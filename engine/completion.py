"""One chat completion in progress: provider items in, OpenAI response bytes out.

Rules of this module:

* Knows the OpenAI response format and nothing of HTTP framing: it returns SSE event bytes
  (streaming) or the final JSON body (non-streaming); the connection decides when the
  response head goes out and frames the bytes (chunked or not).
* ``n`` choices are produced by ``n`` provider calls, one after another, each with its own
  role chunk and finish chunk. Choices are never interleaved, so choice *k* opens only after
  choices ``0..k-1`` (what openai-python's stream helper requires, reference §4.3).
* Every stream ends with a finish chunk per choice, the usage chunk when asked for, and
  ``data: [DONE]``; or with an error event and ``data: [DONE]`` (reference §4.4).
"""

from __future__ import annotations

from typing import Any

from . import openai, sse
from .chat import Finish, ProviderError, ProviderItem, TextDelta, ToolCall, Usage
from .errors import RequestError


class CompletionRun:
    def __init__(self, parsed: openai.ParsedChatRequest, *, completion_id: str, created: int):
        self.parsed = parsed
        self.completion_id = completion_id
        self.created = created
        self.choice = 0
        self.usage = Usage()
        self._choice_opened = False
        self._streaming = parsed.stream
        # Only a stream writes chunks: a non-streamed answer never builds their templates.
        self._prefix = b""
        self._content_frame = (b"", b"")
        if parsed.stream:
            self._prefix = openai.chunk_prefix(
                id=completion_id, created=created, model=parsed.request.model
            )
            self._content_frame = _content_event(self._prefix, 0)
        self._text: list[str] = []
        self._calls: list[ToolCall] = []
        self._finish: Finish | None = None
        self._done_choices: list[dict[str, Any]] = []

    @property
    def stream(self) -> bool:
        return self.parsed.stream

    @property
    def has_more_choices(self) -> bool:
        return self.choice + 1 < self.parsed.n

    def item(self, item: ProviderItem) -> bytes:
        """Take one provider item; return the SSE bytes it produces (``b""`` if none)."""
        if self._choice_opened and type(item) is TextDelta:
            # The path of nearly every item (a token of an open choice), checked first.
            if not item.text:
                return b""
            if self._streaming:
                head, tail = self._content_frame
                return head + sse.dumps_text(item.text) + tail
            self._text.append(item.text)  # a stream never needs the whole text again
            return b""
        if isinstance(item, Finish):
            self._finish = item
            return b""
        out = b""
        if self.stream and not self._choice_opened:
            out = self._event(
                [openai.delta_choice(self.choice, openai.role_delta(isinstance(item, ToolCall)))]
            )
        self._choice_opened = True
        if isinstance(item, TextDelta):
            if not item.text:
                return out
            if not self.stream:
                self._text.append(item.text)  # a stream never needs the whole text again
            else:
                head, tail = self._content_frame
                out += head + sse.dumps_text(item.text) + tail
            return out
        index = len(self._calls)
        self._calls.append(item)
        if self.stream:
            for delta in openai.tool_call_deltas(index, item):
                out += self._event([openai.delta_choice(self.choice, delta)])
        return out

    def _finish_reason(self) -> str:
        reason = self._finish.reason if self._finish else None
        if self._calls and reason in (None, "stop", "tool_calls"):
            # A named tool_choice ends with "stop", an auto/required one with "tool_calls"
            # (reference §3; agents branch on it, bug B7).
            return "stop" if self.parsed.named_tool_choice else "tool_calls"
        return reason or "stop"

    def choice_done(self) -> bytes:
        """The current provider call ended normally: close its choice. Returns SSE bytes."""
        reason = self._finish_reason()
        if self._finish and self._finish.usage:
            self.usage = self.usage + self._finish.usage
        out = b""
        if self.stream:
            if not self._choice_opened:
                out = self._event([openai.delta_choice(self.choice, openai.role_delta(False))])
            out += self._event([openai.delta_choice(self.choice, {}, reason)])
        else:
            self._done_choices.append(
                openai.completion_choice(self.choice, "".join(self._text), self._calls, reason)
            )
        return out

    def next_choice(self) -> None:
        self.choice += 1
        if self._streaming:
            self._content_frame = _content_event(self._prefix, self.choice)
        self._choice_opened = False
        self._text = []
        self._calls = []
        self._finish = None

    def stream_end(self) -> bytes:
        """After the last choice of a stream: the usage chunk (if asked) and ``[DONE]``."""
        out = b""
        if self.parsed.include_usage:
            out = sse.raw_event(openai.chunk_json(self._prefix, [], self.usage))
        return out + sse.DONE

    def completion_body(self) -> bytes:
        """After the last choice of a non-streaming request: the ``chat.completion`` JSON."""
        return sse.dumps(
            openai.chat_completion(
                id=self.completion_id,
                created=self.created,
                model=self.parsed.request.model,
                choices=self._done_choices,
                usage=self.usage,
            )
        )

    def error_events(self, error: ProviderError | RequestError) -> bytes:
        """A failure after the stream started: an error event, then ``[DONE]``."""
        body = {
            "error": {
                "message": error.message,
                "type": error.type or "server_error",
                "param": error.param,
                "code": error.code,
            }
        }
        return sse.event(body) + sse.DONE

    def _event(self, choices: list[dict[str, Any]]) -> bytes:
        return sse.raw_event(openai.chunk_json(self._prefix, choices))


def _content_event(prefix: bytes, index: int) -> tuple[bytes, bytes]:
    """The SSE event of a content delta as the bytes around its JSON-encoded text."""
    head, tail = openai.content_chunk_frame(prefix, index)
    return b"data: " + head, tail + b"\n\n"
