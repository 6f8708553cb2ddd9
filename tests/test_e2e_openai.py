"""End to end with the official ``openai`` client against a real server process.

PROTOCOL.md §1 (the ``echo`` model), §2 (OpenAI HTTP) and §3 (authentication). Every
client is made with ``max_retries=0`` and a timeout unless a test is about retries.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionToolParam

if TYPE_CHECKING:
    from conftest import ServerFactory, ServerProcess

TIMEOUT = 10.0
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_REQUEST = '/tool get_weather {"city": "Oslo"}'


def make_client(srv: ServerProcess, *, api_key: str = "x", max_retries: int = 0) -> OpenAI:
    return OpenAI(
        base_url=f"{srv.base_url}/v1",
        api_key=api_key,
        max_retries=max_retries,
        timeout=TIMEOUT,
    )


@pytest.fixture
def client(server: ServerProcess) -> Iterator[OpenAI]:
    with make_client(server) as c:
        yield c


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def words(text: str) -> int:
    return len(text.split())


# --- models ------------------------------------------------------------------------------


def test_models_list_contains_echo(client: OpenAI) -> None:
    models = list(client.models.list())
    echo = [m for m in models if m.id == "echo"]
    assert len(echo) == 1
    assert echo[0].owned_by == "wirechat"
    assert echo[0].object == "model"
    assert isinstance(echo[0].created, int)


def test_models_retrieve_echo(client: OpenAI) -> None:
    model = client.models.retrieve("echo")
    assert model.id == "echo"
    assert model.owned_by == "wirechat"
    assert model.object == "model"


def test_models_retrieve_unknown_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


# --- non-streaming ---------------------------------------------------------------------


def test_create_non_stream_echoes_with_usage_and_request_id(client: OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are a parrot."},
        {"role": "user", "content": "Hello, wirechat! How are  you?"},
    ]
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=messages)
    request_id = raw.headers.get("x-request-id")
    assert request_id
    completion = raw.parse()
    assert completion._request_id == request_id
    assert completion.object == "chat.completion"
    assert completion.model == "echo"
    assert completion.id
    assert isinstance(completion.created, int)
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello, wirechat! How are  you?"
    assert choice.message.refusal is None
    assert choice.message.tool_calls is None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4 + 5
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == 14


def test_create_non_stream_request_id_from_client(client: OpenAI) -> None:
    mine = f"e2e-{uuid.uuid4().hex}"
    completion = client.chat.completions.create(
        model="echo", messages=user("hi"), extra_headers={"X-Request-Id": mine}
    )
    assert completion._request_id == mine


def test_n_two_returns_two_choices(client: OpenAI) -> None:
    completion = client.chat.completions.create(model="echo", messages=user("twice over"), n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == ["twice over", "twice over"]
    assert all(c.finish_reason == "stop" for c in completion.choices)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4


def test_max_tokens_two_stops_with_length(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo", messages=user("one two three four"), max_tokens=2
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "one two "
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2


def test_max_completion_tokens_and_stop(client: OpenAI) -> None:
    limited = client.chat.completions.create(
        model="echo", messages=user("alpha beta gamma"), max_completion_tokens=1
    )
    assert limited.choices[0].message.content == "alpha "
    assert limited.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(
        model="echo", messages=user("alpha beta STOP gamma"), stop=["STOP"]
    )
    assert stopped.choices[0].message.content == "alpha beta "
    assert stopped.choices[0].finish_reason == "stop"


# --- streaming -------------------------------------------------------------------------


def test_stream_deltas_join_to_the_text(client: OpenAI) -> None:
    text = "one  word\tat a time\nand more "
    stream = client.chat.completions.create(model="echo", messages=user(text), stream=True)
    chunks = list(stream)
    assert chunks
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert {c.model for c in chunks} == {"echo"}
    assert len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    roles = [c.choices[0].delta.role for c in chunks if c.choices[0].delta.role]
    assert roles == ["assistant"]
    assert chunks[0].choices[0].delta.role == "assistant"
    joined = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert joined == text
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "stop"
    assert finishes[:-1] == [None] * (len(chunks) - 1)
    last = chunks[-1].choices[0].delta
    assert last.content is None and last.role is None and last.tool_calls is None


def test_stream_include_usage_ends_with_usage_chunk(client: OpenAI) -> None:
    text = "count these four words"
    stream = client.chat.completions.create(
        model="echo",
        messages=user(text),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert final.usage.prompt_tokens == 4
    assert final.usage.completion_tokens == 4
    assert final.usage.total_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text


def test_stream_helper_final_completion_and_events(client: OpenAI) -> None:
    text = "the stream helper works"
    with client.chat.completions.stream(model="echo", messages=user(text)) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    kinds = [e.type for e in events]
    assert "chunk" in kinds
    assert "content.delta" in kinds
    assert kinds.count("content.done") == 1
    deltas = "".join(e.delta for e in events if e.type == "content.delta")
    assert deltas == text
    done = next(e for e in events if e.type == "content.done")
    assert done.type == "content.done"
    assert done.content == text
    assert final.choices[0].message.content == text
    assert final.choices[0].finish_reason == "stop"


def test_stream_n_two(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo",
        messages=user("a b"),
        stream=True,
        n=2,
        stream_options={"include_usage": True},
    )
    assert stream.response.headers.get("x-request-id")
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "a b", 1: "a b"}
    assert finishes == {0: "stop", 1: "stop"}
    assert usage is not None
    assert usage.completion_tokens == 4


def test_stream_max_tokens_length(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=user("one two three four"), stream=True, max_tokens=2
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two "
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_tricky_text_round_trips(client: OpenAI) -> None:
    """SSE framing survives content that looks like SSE (reliability.md §2.9, checklist 33)."""
    text = (
        'a\n\ndata: [DONE]\n\nb \r c \u2028 d "quoted" \\ back'
        "\u00e9 \U0001f600 \u4e2d\u6587 event: x"
    )
    stream = client.chat.completions.create(model="echo", messages=user(text), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    reply = client.chat.completions.create(model="echo", messages=user(text))
    assert reply.choices[0].message.content == text


def test_large_reply_stream_and_non_stream(client: OpenAI) -> None:
    text = " ".join(f"word{i}" for i in range(5_000))
    reply = client.chat.completions.create(model="echo", messages=user(text))
    assert reply.choices[0].message.content == text
    assert reply.usage is not None and reply.usage.completion_tokens == 5_000
    stream = client.chat.completions.create(model="echo", messages=user(text), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_history_counts_messages(client: OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "/history"},
    ]
    reply = client.chat.completions.create(model="echo", messages=messages)
    assert reply.choices[0].message.content == "history: 3 messages"


def test_async_client_streaming(server: ServerProcess) -> None:
    text = "async clients stream too"

    async def run() -> tuple[str, int]:
        async with AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model="echo",
                messages=user(text),
                stream=True,
                stream_options={"include_usage": True},
            )
            parts: list[str] = []
            completion_tokens = -1
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    completion_tokens = chunk.usage.completion_tokens
            return "".join(parts), completion_tokens

    joined, tokens = asyncio.run(asyncio.wait_for(run(), 15))
    assert joined == text
    assert tokens == 4


def test_async_client_non_stream_concurrently(server: ServerProcess) -> None:
    async def run() -> list[str | None]:
        async with AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT
        ) as aclient:
            replies = await asyncio.gather(
                *(
                    aclient.chat.completions.create(model="echo", messages=user(f"reply {i}"))
                    for i in range(10)
                )
            )
            return [r.choices[0].message.content for r in replies]

    assert asyncio.run(asyncio.wait_for(run(), 15)) == [f"reply {i}" for i in range(10)]


# --- tool calls ------------------------------------------------------------------------


def test_tool_call_non_stream(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo", messages=user(TOOL_REQUEST), tools=[WEATHER]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


def test_tool_call_stream(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=user(TOOL_REQUEST), tools=[WEATHER], stream=True
    )
    ids: list[str] = []
    names: list[str] = []
    arguments = ""
    finish: str | None = None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                ids.append(delta.id)
            if delta.function is not None:
                if delta.function.name:
                    names.append(delta.function.name)
                arguments += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert len(ids) == 1
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Oslo"}
    assert finish == "tool_calls"


def test_tool_call_stream_helper(client: OpenAI) -> None:
    with client.chat.completions.stream(
        model="echo", messages=user(TOOL_REQUEST), tools=[WEATHER]
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    kinds = [e.type for e in events]
    assert "tool_calls.function.arguments.done" in kinds
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}


def test_tool_result_round_trip(client: OpenAI) -> None:
    first = client.chat.completions.create(
        model="echo", messages=user(TOOL_REQUEST), tools=[WEATHER]
    )
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history: list[Any] = [
        *user(TOOL_REQUEST),
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = client.chat.completions.create(model="echo", messages=history, tools=[WEATHER])
    assert second.choices[0].message.content == "tool get_weather returned: sunny, 21 C"
    assert second.choices[0].finish_reason == "stop"
    # The same through a stream.
    stream = client.chat.completions.create(
        model="echo", messages=history, tools=[WEATHER], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tool get_weather returned: sunny, 21 C"


def test_named_tool_choice_finishes_with_stop(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo",
        messages=user(TOOL_REQUEST),
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert choice.finish_reason == "stop"


def test_tool_choice_none_is_echoed(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="echo", messages=user(TOOL_REQUEST), tools=[WEATHER], tool_choice="none"
    )
    assert completion.choices[0].message.content == TOOL_REQUEST
    assert completion.choices[0].message.tool_calls is None


def test_tool_directive_without_tools_is_echoed(client: OpenAI) -> None:
    completion = client.chat.completions.create(model="echo", messages=user(TOOL_REQUEST))
    assert completion.choices[0].message.content == TOOL_REQUEST
    assert completion.choices[0].finish_reason == "stop"


# --- errors ----------------------------------------------------------------------------


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=user("hi"))
    err = info.value
    assert err.status_code == 404
    assert err.code == "model_not_found"
    assert err.param == "model"
    assert err.response.headers.get("x-request-id")


def test_unknown_model_stream_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=user("hi"), stream=True)
    assert info.value.code == "model_not_found"


def test_error_mid_stream_raises_api_error(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=user("/error-mid 500 first words"), stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert not isinstance(info.value, openai.APIStatusError)
    assert received == ["first "]
    assert info.value.message


def test_error_mid_without_stream_is_a_plain_error(client: OpenAI) -> None:
    # No byte of the response was sent yet: the failure is an HTTP status (502 for a 5xx).
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="echo", messages=user("/error-mid 500 words"))
    assert info.value.status_code == 502
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="echo", messages=user("/error-mid 429 words"))


def test_error_429_is_rate_limit_with_retry_after(client: OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="echo", messages=user("/error 429"))
    err = info.value
    assert err.status_code == 429
    assert err.response.headers.get("retry-after") == "1"
    assert err.response.headers.get("x-request-id")


def test_error_503_is_service_unavailable_with_retry_after(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="echo", messages=user("/error 503"))
    assert info.value.status_code == 503
    assert info.value.response.headers.get("retry-after") == "1"


def test_upstream_500_becomes_502(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="echo", messages=user("/error 500"))
    assert info.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as streamed:
        client.chat.completions.create(model="echo", messages=user("/error 500"), stream=True)
    assert streamed.value.status_code == 502


def test_upstream_4xx_passes_through(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="echo", messages=user("/error 400"))
    assert info.value.status_code == 400


def test_bad_request_from_validation(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="echo", messages=user("hi"), temperature=5)
    assert info.value.param == "temperature"


def test_client_retries_503_honouring_retry_after(server: ServerProcess) -> None:
    rid = f"retry-{uuid.uuid4().hex}"
    pattern = rf"POST /v1/chat/completions 503 .*rid={rid}"
    started = time.monotonic()
    with (
        make_client(server, max_retries=2) as retrying,
        pytest.raises(openai.InternalServerError) as info,
    ):
        retrying.chat.completions.create(
            model="echo", messages=user("/error 503"), extra_headers={"X-Request-Id": rid}
        )
    elapsed = time.monotonic() - started
    assert info.value.status_code == 503
    # One request and two retries, each after the 1 s the server asked for.
    assert server.wait_for_log(pattern, count=3, timeout=2.0), server.log()[-2000:]
    assert server.count(pattern) == 3
    assert 1.8 <= elapsed < 6.0


# --- authentication --------------------------------------------------------------------


def test_static_auth(server_factory: ServerFactory) -> None:
    srv = server_factory("--auth-provider", "static", env={"WORKER_AUTH_TOKEN": "tok1,tok2"})

    with (
        make_client(srv, api_key="wrong") as wrong,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        wrong.chat.completions.create(model="echo", messages=user("hi"))
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.response.headers.get("www-authenticate", "").startswith("Bearer")

    with (
        make_client(srv, api_key="placeholder") as nokey,
        pytest.raises(openai.AuthenticationError) as missing,
    ):
        nokey.chat.completions.create(
            model="echo",
            messages=user("hi"),
            extra_headers={"Authorization": openai.Omit()},
        )
    assert missing.value.status_code == 401
    assert missing.value.code == "invalid_api_key"

    with make_client(srv, api_key="wrong") as wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    for token in ("tok1", "tok2"):
        with make_client(srv, api_key=token) as right:
            reply = right.chat.completions.create(model="echo", messages=user("let me in"))
            assert reply.choices[0].message.content == "let me in"
            assert [m.id for m in right.models.list()] == ["echo"]

    # /health needs no token, and the token never reaches the log.
    health = httpx.get(f"{srv.base_url}/health", timeout=TIMEOUT)
    assert health.status_code == 200
    log = srv.log()
    assert "tok1" not in log and "tok2" not in log


# --- without the /v1 prefix ------------------------------------------------------------


def test_routes_without_v1_prefix(server: ServerProcess) -> None:
    with OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=TIMEOUT) as bare:
        reply = bare.chat.completions.create(model="echo", messages=user("no prefix"))
        assert reply.choices[0].message.content == "no prefix"
        assert "echo" in [m.id for m in bare.models.list()]
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as http:
        response = http.post(
            "/chat/completions", json={"model": "echo", "messages": user("plain httpx")}
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        body: dict[str, Any] = response.json()
        assert body["choices"][0]["message"]["content"] == "plain httpx"
        assert body["choices"][0]["logprobs"] is None
        assert http.get("/models/echo").json()["id"] == "echo"
