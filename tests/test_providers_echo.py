"""The embedded ``echo`` model and the provider router (PROTOCOL.md §1).

Streams are driven with ``asyncio.run`` so the tests need no pytest plugin.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from wirechat.engine.chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    ModelInfo,
    ProviderError,
    ProviderItem,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from wirechat.providers import (
    ChatProvider,
    EchoProvider,
    ProviderRouter,
    default_router,
)
from wirechat.providers.echo import MAX_SLOW_MS, _plan

WEATHER = ToolSpec(name="get_weather", parameters={"type": "object"})


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def make_request(*messages: ChatMessage | str, **fields: Any) -> ChatRequest:
    converted = tuple(user(m) if isinstance(m, str) else m for m in messages)
    return ChatRequest(model=fields.pop("model", "echo"), messages=converted, **fields)


def collect(
    request: ChatRequest, provider: ChatProvider | ProviderRouter | None = None
) -> list[ProviderItem]:
    source = provider if provider is not None else EchoProvider()

    async def run() -> list[ProviderItem]:
        return [item async for item in source.stream(request)]

    return asyncio.run(run())


def collect_until_error(request: ChatRequest) -> tuple[list[ProviderItem], ProviderError]:
    """The items sent before the stream failed, and the failure (which must happen)."""
    items: list[ProviderItem] = []

    async def run() -> None:
        async for item in EchoProvider().stream(request):
            items.append(item)

    with pytest.raises(ProviderError) as caught:
        asyncio.run(run())
    return items, caught.value


def texts(items: list[ProviderItem]) -> list[str]:
    return [item.text for item in items if isinstance(item, TextDelta)]


def finish(items: list[ProviderItem]) -> Finish:
    assert isinstance(items[-1], Finish)
    assert sum(isinstance(item, Finish) for item in items) == 1
    return items[-1]


# --- plain echo --------------------------------------------------------------------------


def test_echo_streams_one_word_per_delta_with_following_whitespace() -> None:
    items = collect(make_request("  Hello,  wide\tworld\n again "))
    assert texts(items) == ["  Hello,  ", "wide\t", "world\n ", "again "]
    assert "".join(texts(items)) == "  Hello,  wide\tworld\n again "
    assert finish(items) == Finish(reason="stop", usage=Usage(prompt_tokens=4, completion_tokens=4))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_echo_deltas_concatenate_to_the_message_exactly(text: str) -> None:
    assume(not text.lstrip().startswith("/"))
    items = collect(make_request(text))
    pieces = texts(items)
    words = len(text.split())
    assert "".join(pieces) == text
    assert all(pieces)
    assert len(pieces) == (words if words else (1 if text else 0))
    assert finish(items).usage == Usage(prompt_tokens=words, completion_tokens=words)


def test_empty_reply_is_only_a_finish() -> None:
    items = collect(make_request(""))
    assert items == [Finish(reason="stop", usage=Usage(prompt_tokens=0, completion_tokens=0))]


def test_no_user_message_is_an_empty_reply() -> None:
    items = collect(make_request(ChatMessage(role="system", content="be brief")))
    assert items == [Finish(reason="stop", usage=Usage(prompt_tokens=2, completion_tokens=0))]


def test_reply_is_the_last_user_message_and_prompt_counts_every_message() -> None:
    items = collect(
        make_request(
            ChatMessage(role="system", content="You are terse."),
            "first question here",
            ChatMessage(role="assistant", content="an answer"),
            ChatMessage(role="user", content=[{"type": "text", "text": "second one"}]),
        )
    )
    assert "".join(texts(items)) == "second one"
    assert finish(items).usage == Usage(prompt_tokens=10, completion_tokens=2)


def test_directive_is_only_recognised_at_the_start() -> None:
    items = collect(make_request("please /history", "say /error 500 now"))
    assert "".join(texts(items)) == "say /error 500 now"


def test_unknown_directive_is_echoed() -> None:
    items = collect(make_request("/nothing here", "/historyx"))
    assert "".join(texts(items)) == "/historyx"


# --- limits ------------------------------------------------------------------------------


def test_max_tokens_cuts_words_and_finishes_with_length() -> None:
    items = collect(make_request("one two three four five", max_tokens=3))
    assert texts(items) == ["one ", "two ", "three "]
    assert finish(items) == Finish(
        reason="length", usage=Usage(prompt_tokens=5, completion_tokens=3)
    )


def test_max_tokens_equal_to_the_reply_is_a_normal_stop() -> None:
    items = collect(make_request("one two three", max_tokens=3))
    assert texts(items) == ["one ", "two ", "three"]
    assert finish(items).reason == "stop"


def test_stop_cuts_before_the_earliest_stop_sequence() -> None:
    items = collect(make_request("alpha beta. gamma, delta", stop=(",", ".")))
    assert "".join(texts(items)) == "alpha beta"
    assert finish(items) == Finish(reason="stop", usage=Usage(prompt_tokens=4, completion_tokens=2))


def test_stop_sequence_absent_or_empty_changes_nothing() -> None:
    items = collect(make_request("alpha beta", stop=("zzz", "")))
    assert "".join(texts(items)) == "alpha beta"


def test_max_tokens_applies_after_the_stop_cut() -> None:
    items = collect(make_request("a b c d. e f", stop=(".",), max_tokens=2))
    assert "".join(texts(items)) == "a b "
    assert finish(items).reason == "length"
    items = collect(make_request("a b. c d e f", stop=(".",), max_tokens=2))
    assert "".join(texts(items)) == "a b"
    assert finish(items).reason == "stop"


# --- non-streamed requests -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from("ab .\t\n"), max_size=40),
    st.none() | st.integers(min_value=0, max_value=12),
    st.lists(st.sampled_from([".", "b a", "", "\n"]), max_size=2),
)
def test_a_non_streamed_request_gets_the_streamed_text_in_one_piece(
    text: str, max_tokens: int | None, stop: list[str]
) -> None:
    """What a non-streamed client sees is what the streamed pieces join to, with the same
    finish reason and usage: only the number of pieces differs."""
    assume(not text.lstrip().startswith("/"))
    fields: dict[str, Any] = {"max_tokens": max_tokens, "stop": tuple(stop)}
    streamed = collect(make_request(text, **fields))
    whole = collect(make_request(text, stream=False, **fields))
    joined = "".join(texts(streamed))
    assert texts(whole) == ([joined] if joined else [])
    assert finish(whole) == finish(streamed)


def test_a_non_streamed_answer_takes_no_event_loop_turn_per_word() -> None:
    text = " ".join(["w"] * 500)

    async def main() -> tuple[int, list[ProviderItem]]:
        turns = 0

        async def count() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        await asyncio.sleep(0)
        before = turns
        items = [
            i async for i in EchoProvider(yield_every=1).stream(make_request(text, stream=False))
        ]
        counter.cancel()
        return turns - before, items

    turns, items = asyncio.run(main())
    assert turns == 0
    assert texts(items) == [text]
    assert finish(items) == Finish(
        reason="stop", usage=Usage(prompt_tokens=500, completion_tokens=500)
    )


def test_slow_still_pauses_before_every_word_of_a_non_streamed_answer() -> None:
    items = collect(make_request("/slow 1 a b c", stream=False))
    assert texts(items) == ["a ", "b ", "c"]


# --- tools -------------------------------------------------------------------------------


def test_tool_directive_calls_an_offered_tool() -> None:
    items = collect(
        make_request('/tool get_weather {"city": "Paris", "days": [1, 2]}', tools=(WEATHER,))
    )
    assert len(items) == 2
    call = items[0]
    assert isinstance(call, ToolCall)
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    assert call.name == "get_weather"
    assert call.arguments == '{"city":"Paris","days":[1,2]}'
    assert finish(items) == Finish(
        reason="tool_calls", usage=Usage(prompt_tokens=7, completion_tokens=2)
    )


def test_tool_directive_without_arguments_sends_an_empty_object() -> None:
    items = collect(make_request("  /tool get_weather  ", tools=(WEATHER,)))
    assert isinstance(items[0], ToolCall)
    assert items[0].arguments == "{}"


def test_tool_call_ids_differ() -> None:
    request = make_request("/tool get_weather", tools=(WEATHER,))
    ids = {item.id for _ in range(5) for item in collect(request) if isinstance(item, ToolCall)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ('/tool get_weather {"city": "Paris"}', {}),  # no tools offered
        ('/tool get_time {"zone": "UTC"}', {"tools": (WEATHER,)}),  # unknown name
        ("/tool get_weather {not json", {"tools": (WEATHER,)}),
        ("/tool get_weather [1, 2]", {"tools": (WEATHER,)}),  # not an object
        ('/tool get_weather {"x": NaN}', {"tools": (WEATHER,)}),  # not JSON either
        ("/tool get_weather {}", {"tools": (WEATHER,), "tool_choice": "none"}),
        ("/tool", {"tools": (WEATHER,)}),
    ],
)
def test_tool_directive_that_cannot_call_is_an_ordinary_echo(
    text: str, fields: dict[str, Any]
) -> None:
    items = collect(make_request(text, **fields))
    assert not any(isinstance(item, ToolCall) for item in items)
    assert "".join(texts(items)) == text
    assert finish(items).reason == "stop"


def test_tool_result_reply_names_the_tool_from_the_assistant_call() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')
    other = ToolCall(id="call_2", name="get_time", arguments="{}")
    items = collect(
        make_request(
            '/tool get_weather {"city": "Paris"}',
            ChatMessage(role="assistant", tool_calls=(call, other)),
            ChatMessage(role="tool", tool_call_id="call_2", content="12:00"),
            ChatMessage(role="tool", tool_call_id="call_1", content="sunny, 21 C"),
            tools=(WEATHER,),
        )
    )
    assert "".join(texts(items)) == "tool get_weather returned: sunny, 21 C"
    assert finish(items).reason == "stop"


def test_tool_result_reply_falls_back_to_the_message_name_then_unknown() -> None:
    named = ChatMessage(role="tool", tool_call_id="call_x", name="lookup", content="42")
    assert "".join(texts(collect(make_request("q", named)))) == "tool lookup returned: 42"
    anonymous = ChatMessage(role="tool", tool_call_id="call_x", content="42")
    assert "".join(texts(collect(make_request("q", anonymous)))) == "tool unknown returned: 42"


# --- fault injection ---------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry_after"), [(429, 1.0), (503, 1.0), (500, None)])
def test_error_fails_before_the_first_item(status: int, retry_after: float | None) -> None:
    items, error = collect_until_error(make_request(f"/error {status}"))
    assert items == []
    assert error.status == status
    assert error.retry_after == retry_after
    assert str(status) in error.message


@pytest.mark.parametrize(
    "text", ["/error", "/error 200", "/error 600", "/error abc", "/error 4290"]
)
def test_error_with_a_bad_status_is_a_500(text: str) -> None:
    items, error = collect_until_error(make_request(text))
    assert items == []
    assert error.status == 500
    assert error.retry_after is None


def test_error_mid_sends_one_word_then_fails() -> None:
    items, error = collect_until_error(make_request("/error-mid 502 hello there world"))
    assert items == [TextDelta(text="hello ")]
    assert error.status == 502


def test_error_mid_without_text_sends_a_placeholder_word() -> None:
    items, error = collect_until_error(make_request("/error-mid 429"))
    assert items == [TextDelta(text="partial ")]
    assert error.status == 429
    assert error.retry_after == 1.0


def test_slow_sleeps_before_every_word() -> None:
    started = time.monotonic()
    items = collect(make_request("/slow 20 one two three"))
    elapsed = time.monotonic() - started
    assert texts(items) == ["one ", "two ", "three"]
    assert finish(items).usage == Usage(prompt_tokens=5, completion_tokens=3)
    assert 0.04 <= elapsed < 2.0


@pytest.mark.parametrize("text", ["/slow", "/slow -5 a b", "/slow 1.5 a b", "/slow fast a b"])
def test_slow_with_a_bad_delay_is_an_ordinary_echo(text: str) -> None:
    assert "".join(texts(collect(make_request(text)))) == text


def test_slow_delay_is_capped() -> None:
    # White-box: waiting out the cap itself would take a minute.
    assert _plan(make_request("/slow 99999999999 x")).delay == MAX_SLOW_MS / 1000
    assert _plan(make_request("/slow 0 x")).delay == 0


def test_cancelling_a_slow_stream_stops_it_cleanly() -> None:
    received: list[ProviderItem] = []

    async def consume() -> None:
        async for item in EchoProvider().stream(make_request("/slow 30 a b c d e f g h")):
            received.append(item)

    async def main() -> None:
        task = asyncio.create_task(consume())
        while len(received) < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = len(received)
        await asyncio.sleep(0.1)
        assert len(received) == seen < 8
        assert not any(isinstance(item, Finish) for item in received)

    asyncio.run(main())


def test_fast_streams_yield_to_the_event_loop_every_so_many_words() -> None:
    from wirechat.providers.echo import YIELD_EVERY

    order: list[str] = []
    text = " ".join(["w"] * (YIELD_EVERY * 2))

    async def consume(label: str) -> None:
        async for item in EchoProvider().stream(make_request(text)):
            if isinstance(item, TextDelta):
                order.append(label)

    async def main() -> None:
        await asyncio.gather(consume("x"), consume("y"))

    asyncio.run(main())
    # Each stream runs YIELD_EVERY words per event-loop turn, so two long replies
    # interleave in blocks instead of one starving the other.
    block = ["x"] * YIELD_EVERY + ["y"] * YIELD_EVERY
    assert order == block * 2


def test_history_counts_the_messages_before_the_last() -> None:
    items = collect(
        make_request(
            ChatMessage(role="system", content="sys"),
            "hi",
            ChatMessage(role="assistant", content="hi"),
            " /history ",
        )
    )
    assert "".join(texts(items)) == "history: 3 messages"
    assert finish(items).usage == Usage(prompt_tokens=4, completion_tokens=3)


# --- router ------------------------------------------------------------------------------


class BrokenListing:
    """A model whose listing fails, as an unreachable upstream's would."""

    name = "broken"

    def serves(self, model: str) -> bool:
        return model == "broken-model"

    async def list_models(self) -> list[ModelInfo]:
        raise ProviderError("upstream unreachable", status=502)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        yield Finish(reason="stop")


class AlsoEcho:
    """A second provider claiming ``echo``, to show the first added one wins."""

    name = "shadow"

    def serves(self, model: str) -> bool:
        return True

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id="anything", owned_by=self.name)]

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        yield TextDelta(text="shadow")


def test_echo_lists_its_model() -> None:
    models = asyncio.run(EchoProvider().list_models())
    assert models == [ModelInfo(id="echo", owned_by="wirechat", created=models[0].created)]
    assert models[0].created > 0
    assert EchoProvider().serves("echo")
    assert not EchoProvider().serves("gpt-4o")


def test_router_resolves_in_order() -> None:
    echo = EchoProvider()
    router = ProviderRouter([echo])
    router.add(AlsoEcho())
    assert router.resolve("echo") is echo
    assert router.resolve("gpt-4o").name == "shadow"
    assert "".join(texts(collect(make_request("hi there"), router))) == "hi there"


def test_router_unknown_model_is_a_404_model_not_found() -> None:
    router = default_router()
    with pytest.raises(ProviderError) as caught:
        router.resolve("gpt-4o")
    error = caught.value
    assert (error.status, error.code, error.param, error.type) == (
        404,
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    assert error.message == "The model `gpt-4o` does not exist or you do not have access to it."


def test_router_stream_of_an_unknown_model_fails_on_the_first_pull() -> None:
    stream = default_router().stream(make_request("hi", model="nope"))  # does not raise yet

    async def first() -> ProviderItem:
        return await anext(stream)

    with pytest.raises(ProviderError) as caught:
        asyncio.run(first())
    assert caught.value.code == "model_not_found"


def test_router_lists_every_provider_and_skips_a_failing_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = ProviderRouter([BrokenListing(), EchoProvider(), AlsoEcho()])
    with caplog.at_level(logging.WARNING, logger="wirechat.providers"):
        models = asyncio.run(router.list_models())
    assert [(m.id, m.owned_by) for m in models] == [("echo", "wirechat"), ("anything", "shadow")]
    assert any(
        record.name == "wirechat.providers" and "broken" in record.getMessage()
        for record in caplog.records
    )


def test_default_router_serves_echo_only() -> None:
    models = asyncio.run(default_router().list_models())
    assert [m.id for m in models] == ["echo"]


def test_yield_every_sets_how_often_the_echo_gives_the_loop_a_turn() -> None:
    """``EchoProvider(yield_every=1)`` yields to the event loop after every word, like a real
    token stream (what the benchmarks compare); the words are the same either way."""
    import asyncio

    from wirechat.engine.chat import ChatMessage, ChatRequest, TextDelta
    from wirechat.providers.echo import EchoProvider

    request = ChatRequest(model="echo", messages=(ChatMessage(role="user", content="a b c d"),))

    async def run(provider: EchoProvider) -> tuple[list[str], int]:
        turns = 0
        done = False

        async def count() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        await asyncio.sleep(0)
        before = turns
        words = [i.text async for i in provider.stream(request) if isinstance(i, TextDelta)]
        done = True
        await counter
        return words, turns - before

    batched, batched_turns = asyncio.run(run(EchoProvider()))
    stepped, stepped_turns = asyncio.run(run(EchoProvider(yield_every=1)))
    assert batched == stepped == ["a ", "b ", "c ", "d"]
    assert batched_turns <= 1 < 3 <= stepped_turns
    with pytest.raises(ValueError, match="at least 1"):
        EchoProvider(yield_every=0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \t\n\u2028\u00a0\u3000")))
def test_the_pieces_made_at_once_are_the_pieces_made_one_at_a_time(text: str) -> None:
    """Short replies take the list path (findall), long ones and limited ones the iterator."""
    from wirechat.providers.echo import _iter_pieces, _pieces

    assert _pieces(text) == list(_iter_pieces(text))
