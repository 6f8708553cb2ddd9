"""The embedded default model ``echo``: deterministic, offline, built for testing clients.

Rules of this module (PROTOCOL.md §1):

* The reply is the text of the last user message, streamed one word per ``TextDelta``, each
  word with the whitespace after it (leading whitespace rides on the first word), so the
  deltas concatenate to the reply exactly. A request that is not streamed
  (``ChatRequest.stream``) gets the same text as one ``TextDelta``, unless ``/slow`` asks
  for a pause before every word.
* "Tokens" are whitespace-separated words, for usage and for ``max_tokens`` alike.
* A directive is the first word of the stripped last user message; anything that does not
  parse as one is echoed verbatim, so a client can never make this provider fail by accident.
* Every decision is made before the first item (``_plan``); the generator only plays the plan
  back, which keeps the per-word hot path to one ``TextDelta``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import string
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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

ECHO_MODEL = "echo"
ECHO_OWNER = "wirechat"
# Fixed (2025-01-01T00:00:00Z) so that /v1/models answers the same bytes on every run.
ECHO_CREATED = 1_735_689_600
# A fast reply gives the event loop a turn every this many words.
YIELD_EVERY = 64
# /slow is for testing client timeouts, not for parking a connection forever.
MAX_SLOW_MS = 60_000

_WORD = re.compile(r"\S+\s*")
_COUNT_SLICE = 1 << 16
# Up to this many characters a reply's pieces are made as one list; past it one at a time, so
# that a multi-megabyte reply never becomes a million strings before its first word goes out.
_LIST_LIMIT = 1 << 16
# A directive word, then either the end or whitespace and the rest ("/toolx" is no directive).
_DIRECTIVE = re.compile(r"(/[a-z][a-z-]*)(?:\s+(.*))?", re.DOTALL)
# At most three digits: every valid status has three, and int() never sees a huge number.
_STATUS = re.compile(r"[0-9]{1,3}")
_SLOW = re.compile(r"([0-9]+)(?:\s+(.*))?", re.DOTALL)
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one request will produce, decided up front."""

    reply: str = ""
    delay: float = 0.0
    tool_call: ToolCall | None = None
    error: ProviderError | None = None  # raised before the first item
    mid_error: ProviderError | None = None  # raised after ``reply`` (one word) is sent


class EchoProvider:
    """The ``echo`` model (see the module docstring for its behaviour)."""

    name = ECHO_OWNER

    def __init__(self, yield_every: int = YIELD_EVERY) -> None:
        # 1 makes every word its own event-loop turn, as a real token stream arrives (the
        # benchmarks compare servers that way: WIRECHAT_ECHO_YIELD_EVERY=1).
        if yield_every < 1:
            raise ValueError("yield_every must be at least 1")
        self.yield_every = yield_every

    def serves(self, model: str) -> bool:
        return model == ECHO_MODEL

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id=ECHO_MODEL, owned_by=ECHO_OWNER, created=ECHO_CREATED)]

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        plan = _plan(request)
        if plan.error is not None:
            raise plan.error
        prompt_tokens = sum(_count_words(message.text) for message in request.messages)

        if plan.tool_call is not None:
            call = plan.tool_call
            yield call
            # The call is what the model "wrote": count it like text.
            completion = _count_words(call.name) + _count_words(call.arguments)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion)
            yield Finish(reason="tool_calls", usage=usage)
            return

        if plan.mid_error is not None:
            yield TextDelta(text=plan.reply)
            raise plan.mid_error

        reply = _cut_at_stop(plan.reply, request.stop)
        limit = request.max_tokens
        delay = plan.delay
        if not request.stream and not delay:
            # Nobody sees the words before the answer is complete (a non-streamed
            # completion): the whole reply is one piece, made without a loop turn per word.
            text, words = _first_words(reply, limit)
            if text:
                yield TextDelta(text=text)
            reason: FinishReason = "stop" if text == reply else "length"
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=words)
            yield Finish(reason=reason, usage=usage)
            return
        if not delay and limit is None and len(reply) <= _LIST_LIMIT:
            # The common case, kept as lean as a token loop can be: the pieces made at once
            # (findall), then one TextDelta and at most one loop turn per word.
            pieces = _pieces(reply)
            yield_every = self.yield_every
            for index, piece in enumerate(pieces):
                if index and index % yield_every == 0:
                    await asyncio.sleep(0)
                yield TextDelta(text=piece)
            words = len(pieces) if not reply.isspace() else 0
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=words)
            yield Finish(reason="stop", usage=usage)
            return
        words = 0
        reason = "stop"
        # Pieces are made one at a time: a multi-megabyte request must not become a list of
        # a million strings before its first word goes out.
        for index, piece in enumerate(_iter_pieces(reply)):
            is_word = not piece.isspace()
            if limit is not None and is_word and words >= limit:
                reason = "length"
                break
            # /slow sleeps before every word. A plain echo yields to the loop only every
            # yield_every (YIELD_EVERY) words: often enough that a huge reply cannot starve other
            # connections or delay a cancel, rarely enough that a normal reply costs one
            # event-loop turn instead of one per word.
            if delay:
                await asyncio.sleep(delay)
            elif index and index % self.yield_every == 0:
                await asyncio.sleep(0)
            yield TextDelta(text=piece)
            words += is_word
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=words)
        yield Finish(reason=reason, usage=usage)


def _plan(request: ChatRequest) -> _Plan:
    """Read the conversation's last message and any directive in it (PROTOCOL.md §1)."""
    messages = request.messages
    if not messages:
        return _Plan()
    last = messages[-1]
    if last.role in ("tool", "function"):
        return _Plan(reply=f"tool {_tool_name(messages)} returned: {last.text}")

    user = next((message for message in reversed(messages) if message.role == "user"), None)
    if user is None:
        return _Plan()
    text = user.text
    stripped = text.strip()
    match = _DIRECTIVE.fullmatch(stripped) if stripped.startswith("/") else None
    if match is None:
        return _Plan(reply=text)
    directive, rest = match.group(1), match.group(2) or ""

    if directive == "/tool" and user is last and request.tools and request.tool_choice != "none":
        call = _tool_call(rest, {tool.name for tool in request.tools})
        if call is not None:
            return _Plan(tool_call=call)
    elif directive == "/error":
        return _Plan(error=_injected_error(_first_word(rest)[0]))
    elif directive == "/error-mid":
        status, mid_text = _first_word(rest)
        first = next(_iter_pieces(mid_text), None)
        return _Plan(
            reply=first or "partial ",
            mid_error=_injected_error(status, mid_stream=True),
        )
    elif directive == "/slow":
        slow = _SLOW.fullmatch(rest)
        if slow is not None:
            digits = slow.group(1)
            # Compare by length first: int() of thousands of digits raises in Python 3.11.
            ms = MAX_SLOW_MS if len(digits) > 6 else min(int(digits), MAX_SLOW_MS)
            return _Plan(reply=slow.group(2) or "", delay=ms / 1000)
    elif directive == "/history":
        return _Plan(reply=f"history: {len(messages) - 1} messages")
    return _Plan(reply=text)


def _first_word(text: str) -> tuple[str, str]:
    """``text`` (already stripped) as its first word and the rest ("" when absent)."""
    parts = text.split(None, 1)
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""


def _tool_name(messages: Sequence[ChatMessage]) -> str:
    """The name of the tool whose result is the last message."""
    result = messages[-1]
    if result.tool_call_id is not None:
        for message in reversed(messages[:-1]):
            for call in message.tool_calls:
                if call.id == result.tool_call_id:
                    return call.name
    return result.name or "unknown"


def _tool_call(rest: str, offered: set[str]) -> ToolCall | None:
    """``NAME [{json object}]`` as a call of an offered tool, or None (then it is echoed)."""
    name, raw = _first_word(rest)
    if name not in offered:
        return None
    try:
        arguments: Any = json.loads(raw or "{}", parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(
        id="call_" + "".join(random.choices(_ID_ALPHABET, k=24)),
        name=name,
        # Compact, like the arguments OpenAI models produce.
        arguments=json.dumps(arguments, separators=(",", ":"), ensure_ascii=False),
    )


def _reject_constant(constant: str) -> Any:
    # NaN and Infinity are not JSON; passing them on would hand clients unparsable arguments.
    raise ValueError(f"not JSON: {constant}")


def _injected_error(status_text: str, *, mid_stream: bool = False) -> ProviderError:
    status = 500
    if status_text and _STATUS.fullmatch(status_text):
        status = int(status_text)
        if not 400 <= status <= 599:
            status = 500
    where = " after the first token" if mid_stream else ""
    return ProviderError(
        f"Injected upstream error {status}{where}",
        status=status,
        retry_after=1.0 if status in (429, 503) else None,
    )


def _pieces(text: str) -> list[str]:
    """``_iter_pieces`` as a list, made at C speed (for texts up to ``_LIST_LIMIT``)."""
    pieces = _WORD.findall(text)
    lead = len(text) - len(text.lstrip())
    if lead:
        if pieces:
            pieces[0] = text[:lead] + pieces[0]
        else:
            pieces = [text]  # whitespace only
    return pieces


def _iter_pieces(text: str) -> Iterator[str]:
    """``text`` as words, each with its trailing whitespace; they join back to ``text``."""
    lead = len(text) - len(text.lstrip())
    first = True
    for match in _WORD.finditer(text):
        piece = match.group()
        if first and lead:
            piece = text[:lead] + piece  # leading whitespace rides on the first word
        first = False
        yield piece
    if first and lead:
        yield text  # whitespace only: still sent, so the deltas always join to the reply


def _first_words(text: str, limit: int | None) -> tuple[str, int]:
    """``text`` up to ``limit`` words (each with its trailing whitespace, as the streamed
    pieces join) and how many words that is."""
    words = _count_words(text)
    if limit is None or words <= limit:
        return text, words
    return "".join(itertools.islice(_iter_pieces(text), limit)), limit


def _count_words(text: str) -> int:
    """Whitespace-separated words, counted at C speed in slices: a message may be megabytes
    long, and neither one huge list of words nor a Python loop per word is acceptable."""
    if len(text) <= _COUNT_SLICE:
        return len(text.split())
    count, start = 0, 0
    while start < len(text):
        end = min(start + _COUNT_SLICE, len(text))
        # Extend the slice to the end of the word it cuts, so no word is counted twice.
        while end < len(text) and not text[end].isspace():
            end += 1
        count += len(text[start:end].split())
        start = end
    return count


def _cut_at_stop(reply: str, stop: Sequence[str]) -> str:
    """The reply before the earliest stop sequence (never sent itself, as with OpenAI)."""
    cuts = [index for index in (reply.find(s) for s in stop if s) if index >= 0]
    return reply[: min(cuts)] if cuts else reply
