"""The Anthropic Messages API provider against a real HTTP server inside the test.

The upstream is a small HTTP/1.1 server written by hand on ``asyncio.start_server``
(127.0.0.1, ephemeral port): it records every request it receives and answers with the
event sequences Anthropic streams (``event: <name>`` / ``data: <json>``), chunked like the
real API. Streams are driven with ``asyncio.run``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
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
from wirechat.engine.errors import request_error_for
from wirechat.providers.anthropic import AnthropicProvider, _request_body

T = TypeVar("T")
API_KEY = "sk-ant-test-key"
MODEL = "claude-sonnet-4-5"
TEST_TIMEOUT = 15.0
Event = tuple[str, dict[str, Any]]


# --- the upstream ------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int

    def json(self) -> Any:
        return json.loads(self.body)


# A reply writes one response; it returns whether the connection stays open for more.
Reply = Callable[["Upstream", Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Upstream:
    """A fake Anthropic: answers the n-th request with the n-th reply (the last repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self._replies = replies
        self.seen: list[Seen] = []
        self.connections = 0
        self.disconnected = asyncio.Event()
        self.disconnected_at = 0.0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                except asyncio.IncompleteReadError:
                    return  # the client closed an idle connection
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await asyncio.wait_for(reader.readexactly(length), 5)
                seen = Seen(method, target, headers, body, connection)
                self.seen.append(seen)
                reply = self._replies[min(len(self.seen), len(self._replies)) - 1]
                if not await reply(self, seen, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()


def _head(status: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event_bytes(name: str, data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"event: {name}\ndata: {text}\n\n".encode()


SSE_HEADERS = (
    ("content-type", "text/event-stream; charset=utf-8"),
    ("transfer-encoding", "chunked"),
    ("cache-control", "no-cache"),
    ("request-id", "req_011CTestRequest"),
)


def sse(*events: Event, end: str = "complete") -> Reply:
    """A streamed reply. ``end``: ``complete``; ``terminate`` (end the body, keep nothing
    open); ``drop`` (close mid-body); ``stall`` (wait for the client to go away)."""

    async def reply(
        upstream: Upstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        keep = end == "complete"
        headers = SSE_HEADERS if keep else (*SSE_HEADERS, ("connection", "close"))
        writer.write(_head("200 OK", headers))
        for name, data in events:
            # One event per chunk, split in two so the client must reassemble lines.
            raw = _event_bytes(name, data)
            writer.write(_chunk(raw[:7]) + _chunk(raw[7:]))
            await writer.drain()
        if end in ("complete", "terminate"):
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        elif end == "stall":
            received = await asyncio.wait_for(reader.read(1), 10)
            if received == b"":
                upstream.disconnected_at = asyncio.get_running_loop().time()
                upstream.disconnected.set()
        return keep

    return reply


def raw_sse(payload: bytes) -> Reply:
    """A streamed reply of exactly ``payload`` (one chunk), then the end of the body."""

    async def reply(
        upstream: Upstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(_head("200 OK", (*SSE_HEADERS, ("connection", "close"))))
        writer.write(_chunk(payload) + b"0\r\n\r\n")
        await writer.drain()
        return False

    return reply


def json_reply(status: str, body: dict[str, Any], headers: Sequence[tuple[str, str]] = ()) -> Reply:
    async def reply(
        upstream: Upstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        data = json.dumps(body).encode()
        all_headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            *headers,
        ]
        writer.write(_head(status, all_headers) + data)
        await writer.drain()
        return True

    return reply


def error_reply(
    status: str, kind: str, message: str, headers: Sequence[tuple[str, str]] = ()
) -> Reply:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}
    return json_reply(status, body, headers)


@contextlib.asynccontextmanager
async def serving(
    *replies: Reply, **options: Any
) -> AsyncIterator[tuple[Upstream, AnthropicProvider]]:
    async with Upstream(*replies) as upstream:
        provider = AnthropicProvider(api_key=API_KEY, base_url=upstream.url, **options)
        try:
            yield upstream, provider
        finally:
            await provider.aclose()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, TEST_TIMEOUT)

    return asyncio.run(bounded())


async def collect(provider: AnthropicProvider, request: ChatRequest) -> list[ProviderItem]:
    return [item async for item in provider.stream(request)]


async def collect_failure(
    provider: AnthropicProvider, request: ChatRequest
) -> tuple[list[ProviderItem], ProviderError]:
    items: list[ProviderItem] = []
    with pytest.raises(ProviderError) as caught:
        async for item in provider.stream(request):
            items.append(item)
    return items, caught.value


def make_request(*messages: ChatMessage | str, **fields: Any) -> ChatRequest:
    converted = tuple(
        ChatMessage(role="user", content=m) if isinstance(m, str) else m for m in messages
    )
    return ChatRequest(model=fields.pop("model", MODEL), messages=converted, **fields)


# --- recorded-shape event sequences --------------------------------------------------------


def message_start(input_tokens: int = 25, **usage: int) -> Event:
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
            },
        },
    )


def text_start(index: int) -> Event:
    block = {"type": "text", "text": ""}
    return "content_block_start", {
        "type": "content_block_start",
        "index": index,
        "content_block": block,
    }


def text_delta(index: int, text: str) -> Event:
    delta = {"type": "text_delta", "text": text}
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def tool_start(index: int, call_id: str, name: str) -> Event:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return "content_block_start", {
        "type": "content_block_start",
        "index": index,
        "content_block": block,
    }


def json_delta(index: int, partial: str) -> Event:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> Event:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, output_tokens: int) -> Event:
    return (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
    )


PING: Event = ("ping", {"type": "ping"})
MESSAGE_STOP: Event = ("message_stop", {"type": "message_stop"})

TEXT_REPLY: tuple[Event, ...] = (
    message_start(25, cache_creation_input_tokens=0, cache_read_input_tokens=10),
    text_start(0),
    PING,
    text_delta(0, "Hello"),
    PING,
    text_delta(0, ", world"),
    block_stop(0),
    message_delta("end_turn", 12),
    MESSAGE_STOP,
)

TOOL_REPLY: tuple[Event, ...] = (
    message_start(310),
    text_start(0),
    text_delta(0, "Let me check."),
    block_stop(0),
    tool_start(1, "toolu_01A09q90qw90lq917835lq9", "get_weather"),
    json_delta(1, ""),
    json_delta(1, '{"city": "O'),
    PING,
    json_delta(1, 'slo", "unit"'),
    json_delta(1, ': "celsius"}'),
    block_stop(1),
    tool_start(2, "toolu_01B7rBcLc1Ni4fYF1aqEaYdm", "get_time"),
    json_delta(2, ""),
    block_stop(2),
    message_delta("tool_use", 89),
    MESSAGE_STOP,
)


# --- streaming replies ----------------------------------------------------------------------


def test_text_reply_streams_deltas_and_finish_with_usage() -> None:
    async def main() -> tuple[list[ProviderItem], list[Seen]]:
        async with serving(sse(*TEXT_REPLY), max_tokens_default=1024) as (upstream, provider):
            return await collect(provider, make_request("Hi")), upstream.seen

    items, seen = run(main())
    assert items == [
        TextDelta(text="Hello"),
        TextDelta(text=", world"),
        Finish(reason="stop", usage=Usage(prompt_tokens=35, completion_tokens=12)),
    ]
    (request,) = seen
    assert request.method == "POST"
    assert request.target == "/v1/messages"
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "text/event-stream"
    assert request.json() == {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "stream": True,
    }


def test_tool_use_reply_and_translated_conversation() -> None:
    weather = ToolSpec(
        name="get_weather",
        description="Current weather",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    clock = ToolSpec(name="get_time")
    request = make_request(
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="developer", content=[{"type": "text", "text": "Use metric units."}]),
        "Hi",
        ChatMessage(
            role="user",
            content=[
                {"type": "text", "text": "What's the weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        ),
        ChatMessage(
            role="assistant",
            content="Checking.",
            tool_calls=(
                ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}'),
                ToolCall(id="call_2", name="get_time", arguments=""),
            ),
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content="12°C"),
        ChatMessage(role="tool", tool_call_id="call_2", content="noon"),
        "And tomorrow?",
        tools=(weather, clock),
        tool_choice="required",
        max_tokens=300,
        stop=("\n\nHuman:",),
        options={"temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7},
        user="user-42",
    )

    async def main() -> tuple[list[ProviderItem], list[Seen]]:
        async with serving(sse(*TOOL_REPLY)) as (upstream, provider):
            return await collect(provider, request), upstream.seen

    items, seen = run(main())
    assert items == [
        TextDelta(text="Let me check."),
        ToolCall(
            id="toolu_01A09q90qw90lq917835lq9",
            name="get_weather",
            arguments='{"city": "Oslo", "unit": "celsius"}',
        ),
        ToolCall(id="toolu_01B7rBcLc1Ni4fYF1aqEaYdm", name="get_time", arguments="{}"),
        Finish(reason="tool_calls", usage=Usage(prompt_tokens=310, completion_tokens=89)),
    ]
    body = seen[0].json()
    assert body["system"] == "Be brief.\n\nUse metric units."
    assert body["max_tokens"] == 300
    assert body["stop_sequences"] == ["\n\nHuman:"]
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.2, 0.9, 40)
    assert "seed" not in body
    assert body["metadata"] == {"user_id": "user-42"}
    assert body["tool_choice"] == {"type": "any"}
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["messages"] == [
        {
            "role": "user",  # two user messages merged: Anthropic requires alternation
            "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "What's the weather here?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",  # both tool results and the next user turn: ONE message
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "12°C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


def test_max_tokens_stop_is_length() -> None:
    events = (
        message_start(8),
        text_start(0),
        text_delta(0, "One two"),
        block_stop(0),
        message_delta("max_tokens", 5),
        MESSAGE_STOP,
    )

    async def main() -> tuple[list[ProviderItem], list[Seen]]:
        async with serving(sse(*events)) as (upstream, provider):
            return await collect(provider, make_request("Count", max_tokens=5)), upstream.seen

    items, seen = run(main())
    assert items[-1] == Finish(reason="length", usage=Usage(prompt_tokens=8, completion_tokens=5))
    assert seen[0].json()["max_tokens"] == 5


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", None),
    ],
)
def test_stop_reason_mapping(stop_reason: str, finish: FinishReason | None) -> None:
    events = (message_start(1), message_delta(stop_reason, 0), MESSAGE_STOP)

    async def main() -> list[ProviderItem]:
        async with serving(sse(*events)) as (_, provider):
            return await collect(provider, make_request("Hi"))

    assert run(main()) == [Finish(reason=finish, usage=Usage(prompt_tokens=1))]


def test_finished_response_is_read_to_its_end_so_the_connection_is_reused() -> None:
    async def main() -> Upstream:
        async with serving(sse(*TEXT_REPLY)) as (upstream, provider):
            for _ in range(3):
                assert len(await collect(provider, make_request("Hi"))) == 3
            return upstream

    upstream = run(main())
    assert [seen.connection for seen in upstream.seen] == [1, 1, 1]


# --- failures ----------------------------------------------------------------------------


def test_http_429_passes_through_with_retry_after() -> None:
    reply = error_reply(
        "429 Too Many Requests",
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
        headers=[("retry-after", "7")],
    )

    async def main() -> tuple[list[ProviderItem], ProviderError]:
        async with serving(reply) as (_, provider):
            return await collect_failure(provider, make_request("Hi"))

    items, error = run(main())
    assert items == []
    assert (error.status, error.type, error.retry_after) == (429, "rate_limit_error", 7.0)
    assert error.message == "Number of request tokens has exceeded your per-minute rate limit"
    client = request_error_for(error)
    assert client.status == 429
    assert ("retry-after", "7") in client.headers


def test_http_529_overloaded_becomes_503_with_retry_after() -> None:
    reply = error_reply("529 Overloaded", "overloaded_error", "Overloaded")

    async def main() -> tuple[list[ProviderItem], ProviderError]:
        async with serving(reply) as (_, provider):
            return await collect_failure(provider, make_request("Hi"))

    _, error = run(main())
    assert (error.status, error.type, error.retry_after) == (503, "overloaded_error", 1.0)
    client = request_error_for(error)
    assert client.status == 503
    assert ("retry-after", "1") in client.headers


def test_http_400_passes_message_and_type_through() -> None:
    reply = error_reply(
        "400 Bad Request", "invalid_request_error", "prompt is too long: 210000 tokens > 200000"
    )

    async def main() -> ProviderError:
        async with serving(reply) as (_, provider):
            return (await collect_failure(provider, make_request("Hi")))[1]

    error = run(main())
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert error.message == "prompt is too long: 210000 tokens > 200000"


def test_http_error_without_json_body() -> None:
    async def reply(
        upstream: Upstream, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(_head("502 Bad Gateway", [("content-length", "7")]) + b"upstrea")
        await writer.drain()
        return True

    async def main() -> ProviderError:
        async with serving(reply) as (_, provider):
            return (await collect_failure(provider, make_request("Hi")))[1]

    error = run(main())
    assert error.status == 502
    assert "502" in error.message


@pytest.mark.parametrize(("kind", "status"), [("overloaded_error", 503), ("api_error", 502)])
def test_mid_stream_error_event(kind: str, status: int) -> None:
    error_event: Event = ("error", {"type": "error", "error": {"type": kind, "message": "Boom"}})
    events = (message_start(3), text_start(0), text_delta(0, "Partial"), error_event)

    async def main() -> tuple[list[ProviderItem], ProviderError]:
        async with serving(sse(*events)) as (_, provider):
            return await collect_failure(provider, make_request("Hi"))

    items, error = run(main())
    assert items == [TextDelta(text="Partial")]
    assert (error.status, error.type, error.message) == (status, kind, "Boom")


def test_stream_that_ends_without_message_stop_is_502() -> None:
    events = (message_start(3), text_start(0), text_delta(0, "Partial"))

    async def main() -> tuple[list[ProviderItem], ProviderError]:
        async with serving(sse(*events, end="terminate")) as (_, provider):
            return await collect_failure(provider, make_request("Hi"))

    items, error = run(main())
    assert items == [TextDelta(text="Partial")]
    assert error.status == 502
    assert "message_stop" in error.message


def test_connection_dropped_mid_body_is_502() -> None:
    events = (message_start(3), text_start(0), text_delta(0, "Partial"))

    async def main() -> tuple[list[ProviderItem], ProviderError]:
        async with serving(sse(*events, end="drop")) as (_, provider):
            return await collect_failure(provider, make_request("Hi"))

    items, error = run(main())
    assert items == [TextDelta(text="Partial")]
    assert error.status == 502
    assert error.code is None


def test_event_that_is_not_json_is_502() -> None:
    payload = _event_bytes(*message_start(3)) + b"event: content_block_start\ndata: {nope\n\n"

    async def main() -> ProviderError:
        async with serving(raw_sse(payload)) as (_, provider):
            return (await collect_failure(provider, make_request("Hi")))[1]

    error = run(main())
    assert error.status == 502
    assert "not JSON" in error.message


def test_connection_refused_is_502_upstream_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is closed now: nothing listens on it.

    async def main() -> ProviderError:
        provider = AnthropicProvider(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}")
        try:
            return (await collect_failure(provider, make_request("Hi")))[1]
        finally:
            await provider.aclose()

    error = run(main())
    assert (error.status, error.code) == (502, "upstream_unreachable")
    assert request_error_for(error).status == 502


# --- cancellation ----------------------------------------------------------------------------


def test_cancelled_consumer_closes_the_upstream_connection_within_a_second() -> None:
    events = (message_start(3), text_start(0), text_delta(0, "First"))

    async def main() -> float:
        loop = asyncio.get_running_loop()
        first = asyncio.Event()
        async with serving(sse(*events, end="stall")) as (upstream, provider):

            async def consume() -> None:
                async for _ in provider.stream(make_request("Hi")):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 5)
            await asyncio.sleep(0.05)  # the task now waits for the next upstream bytes
            cancelled_at = loop.time()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            await asyncio.wait_for(upstream.disconnected.wait(), 1.0)
            return upstream.disconnected_at - cancelled_at

    assert run(main()) < 1.0


def test_closed_stream_closes_the_upstream_connection_within_a_second() -> None:
    events = (message_start(3), text_start(0), text_delta(0, "First"))

    async def main() -> float:
        loop = asyncio.get_running_loop()
        async with serving(sse(*events, end="stall")) as (upstream, provider):
            stream = provider.stream(make_request("Hi"))
            assert await asyncio.wait_for(anext(stream), 5) == TextDelta(text="First")
            closed_at = loop.time()
            await asyncio.wait_for(stream.aclose(), 5)  # type: ignore[attr-defined]
            await asyncio.wait_for(upstream.disconnected.wait(), 1.0)
            return upstream.disconnected_at - closed_at

    assert run(main()) < 1.0


# --- model listing -------------------------------------------------------------------------


def test_list_models_follows_pages_and_learns_the_ids() -> None:
    first = json_reply(
        "200 OK",
        {
            "data": [
                {"type": "model", "id": "claude-opus-4-1", "created_at": "2025-08-05T00:00:00Z"},
                {"type": "model", "id": "claude-sonnet-4-5", "created_at": "2025-09-29T00:00:00Z"},
            ],
            "has_more": True,
            "first_id": "claude-opus-4-1",
            "last_id": "claude-sonnet-4-5",
        },
    )
    second = json_reply(
        "200 OK",
        {
            "data": [{"type": "model", "id": "custom-model", "created_at": "2024-01-01T00:00:00Z"}],
            "has_more": False,
            "first_id": "custom-model",
            "last_id": "custom-model",
        },
    )

    async def main() -> tuple[list[ModelInfo], list[Seen], bool, bool]:
        async with serving(first, second, name="claude") as (upstream, provider):
            before = provider.serves("custom-model")
            models = await provider.list_models()
            return models, upstream.seen, before, provider.serves("custom-model")

    models, seen, before, after = run(main())
    assert models == [
        ModelInfo(id="claude-opus-4-1", owned_by="claude", created=1_754_352_000),
        ModelInfo(id="claude-sonnet-4-5", owned_by="claude", created=1_759_104_000),
        ModelInfo(id="custom-model", owned_by="claude", created=1_704_067_200),
    ]
    assert [s.target for s in seen] == [
        "/v1/models?limit=1000",
        "/v1/models?limit=1000&after_id=claude-sonnet-4-5",
    ]
    assert all(s.method == "GET" and s.headers["x-api-key"] == API_KEY for s in seen)
    assert all(s.headers["anthropic-version"] == "2023-06-01" for s in seen)
    assert (before, after) == (False, True)


def test_list_models_falls_back_to_configured_models() -> None:
    reply = error_reply("401 Unauthorized", "authentication_error", "invalid x-api-key")

    async def main() -> list[ModelInfo]:
        async with serving(reply, models=["claude-haiku-4-5"]) as (_, provider):
            return await provider.list_models()

    assert run(main()) == [ModelInfo(id="claude-haiku-4-5", owned_by="anthropic")]


def test_list_models_without_configured_models_raises() -> None:
    reply = error_reply("401 Unauthorized", "authentication_error", "invalid x-api-key")

    async def main() -> ProviderError:
        async with serving(reply) as (_, provider):
            with pytest.raises(ProviderError) as caught:
                await provider.list_models()
            return caught.value

    error = run(main())
    assert (error.status, error.type, error.message) == (
        401,
        "authentication_error",
        "invalid x-api-key",
    )


def test_serves() -> None:
    provider = AnthropicProvider(api_key=None, models=["my-alias"])
    assert provider.serves("claude-3-5-haiku-latest")
    assert provider.serves("my-alias")
    assert not provider.serves("gpt-4o")
    assert AnthropicProvider(api_key=None, catch_all=True).serves("gpt-4o")
    assert provider.name == "anthropic"


# --- request translation details (pure) -------------------------------------------------


def body_for(*messages: ChatMessage | str, **fields: Any) -> dict[str, Any]:
    return _request_body(make_request(*messages, **fields), 4096)


WEATHER = ToolSpec(name="get_weather", parameters={"properties": {"city": {"type": "string"}}})


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any] | None) -> None:
    body = body_for("Hi", tools=(WEATHER,), tool_choice=choice)
    assert body.get("tool_choice") == expected
    # A schema without a type gets Anthropic's required "object".
    assert body["tools"][0]["input_schema"]["type"] == "object"


def test_tool_choice_none_omits_tools() -> None:
    body = body_for("Hi", tools=(WEATHER,), tool_choice="none")
    assert "tools" not in body
    assert "tool_choice" not in body


def test_parallel_tool_calls_false() -> None:
    body = body_for("Hi", tools=(WEATHER,), options={"parallel_tool_calls": False})
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_empty_assistant_message_is_dropped_and_neighbours_merge() -> None:
    body = body_for("One", ChatMessage(role="assistant", content=""), "Two")
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}],
        }
    ]


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
        [{"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}],
        [{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}],
        [{"type": "file", "file": {"file_id": "file-abc"}}],
    ],
)
def test_untranslatable_content_is_400(content: list[dict[str, Any]]) -> None:
    with pytest.raises(ProviderError) as caught:
        body_for(ChatMessage(role="user", content=content))
    assert caught.value.status == 400
    assert caught.value.param == "messages.[0].content.[0]"


def test_pdf_file_part_becomes_document() -> None:
    part = {
        "type": "file",
        "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
    }
    body = body_for(ChatMessage(role="user", content=[part]))
    assert body["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
        }
    ]


def test_tool_call_arguments_that_are_not_an_object_are_400() -> None:
    call = ToolCall(id="call_1", name="f", arguments="[1, 2]")
    with pytest.raises(ProviderError) as caught:
        body_for("Hi", ChatMessage(role="assistant", tool_calls=(call,)))
    assert caught.value.status == 400
    assert caught.value.param == "messages.[1].tool_calls.[0].function.arguments"


def test_base_url_with_v1_suffix() -> None:
    async def main() -> list[Seen]:
        async with Upstream(sse(*TEXT_REPLY)) as upstream:
            provider = AnthropicProvider(api_key=API_KEY, base_url=upstream.url + "/v1/")
            try:
                await collect(provider, make_request("Hi"))
            finally:
                await provider.aclose()
            return upstream.seen

    assert run(main())[0].target == "/v1/messages"
