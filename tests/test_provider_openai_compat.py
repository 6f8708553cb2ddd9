"""``OpenAICompatProvider`` against real peers on 127.0.0.1.

Two upstreams: a second wirechat process (the embedded ``echo`` model and its directives),
and a small HTTP/1.1 server written by hand in this file for what a well-behaved server
never sends (comments, ``event:`` lines, CRLF, split tool-call arguments, broken streams,
error bodies, a slow stream to cancel). Everything runs under ``asyncio.run`` with a bound.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import running_server
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
from wirechat.engine.errors import request_error_for
from wirechat.providers.openai_compat import OpenAICompatProvider, _SSEParser

TIMEOUT = 10.0
T = TypeVar("T")

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather of a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)


def run(coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ask(text: str, *, model: str = "echo", **fields: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=(ChatMessage(role="user", content=text),), **fields)


async def collect(
    provider: OpenAICompatProvider, request: ChatRequest
) -> tuple[list[ProviderItem], ProviderError | None]:
    items: list[ProviderItem] = []
    try:
        async for item in provider.stream(request):
            items.append(item)
    except ProviderError as error:
        return items, error
    return items, None


def talk(
    base_url: str, request: ChatRequest, **options: Any
) -> tuple[list[ProviderItem], ProviderError | None]:
    """One stream through a fresh provider."""

    async def go() -> tuple[list[ProviderItem], ProviderError | None]:
        provider = OpenAICompatProvider(name="up", base_url=base_url, **options)
        try:
            return await collect(provider, request)
        finally:
            await provider.aclose()

    return run(go())


def text_of(items: list[ProviderItem]) -> str:
    return "".join(item.text for item in items if isinstance(item, TextDelta))


# --- a second wirechat as the upstream ----------------------------------------------------


@pytest.fixture(scope="module")
def upstream(server_dir: Path) -> Iterator[str]:
    """``wirechat serve --port 0 --db :memory:``; its base URL with ``/v1``."""
    log_path = Path(tempfile.mkdtemp(prefix="openai-compat-", dir=server_dir)) / "upstream.log"
    with running_server(["--db", ":memory:"], log_path=log_path) as srv:
        yield f"{srv.base_url}/v1"


def test_list_models_from_wirechat(upstream: str) -> None:
    async def go() -> tuple[list[ModelInfo], bool, bool, bool]:
        provider = OpenAICompatProvider(name="up", base_url=upstream)
        try:
            before = provider.serves("echo")
            models = await provider.list_models()
            return models, before, provider.serves("echo"), provider.serves("gpt-4o")
        finally:
            await provider.aclose()

    models, before, after, other = run(go())
    assert [(m.id, m.owned_by) for m in models] == [("echo", "up")]
    assert models[0].created > 0
    assert (before, after, other) == (False, True, False)


def test_text_stream(upstream: str) -> None:
    items, error = talk(upstream, ask("hello brave new world"))
    assert error is None
    assert items[:-1] == [TextDelta(text=t) for t in ("hello ", "brave ", "new ", "world")]
    assert items[-1] == Finish(reason="stop", usage=Usage(prompt_tokens=4, completion_tokens=4))


def test_tool_call(upstream: str) -> None:
    items, error = talk(upstream, ask('/tool get_weather {"city":"Oslo"}', tools=(WEATHER,)))
    assert error is None
    calls = [item for item in items if isinstance(item, ToolCall)]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].id.startswith("call_")
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert not any(isinstance(item, TextDelta) for item in items)
    assert isinstance(items[-1], Finish) and items[-1].reason == "tool_calls"
    assert items[-1].usage is not None


def test_tool_result_round(upstream: str) -> None:
    call = ToolCall(id="call_123", name="get_weather", arguments='{"city":"Oslo"}')
    request = ChatRequest(
        model="echo",
        messages=(
            ChatMessage(role="user", content='/tool get_weather {"city":"Oslo"}'),
            ChatMessage(role="assistant", content=None, tool_calls=(call,)),
            ChatMessage(role="tool", content="sunny, 21 C", tool_call_id="call_123"),
        ),
        tools=(WEATHER,),
    )
    items, error = talk(upstream, request)
    assert error is None
    assert text_of(items) == "tool get_weather returned: sunny, 21 C"
    assert isinstance(items[-1], Finish) and items[-1].reason == "stop"


def test_developer_role_and_content_parts(upstream: str) -> None:
    request = ChatRequest(
        model="echo",
        messages=(
            ChatMessage(role="developer", content="be brief"),
            ChatMessage(
                role="user",
                content=[{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}],
                name="ann",
            ),
        ),
    )
    items, error = talk(upstream, request)
    assert error is None
    assert text_of(items) == "two parts"


def test_error_429_before_first_token(upstream: str) -> None:
    items, error = talk(upstream, ask("/error 429"))
    assert items == []
    assert error is not None
    assert error.status == 429
    assert error.retry_after == 1.0
    assert error.type == "rate_limit_error"
    mapped = request_error_for(error)
    assert mapped.status == 429
    assert ("retry-after", "1") in mapped.headers


def test_error_500_before_first_token(upstream: str) -> None:
    items, error = talk(upstream, ask("/error 500"))
    assert items == []
    assert error is not None
    # The upstream wirechat already answers its provider's 500 with a 502 (PROTOCOL.md §2);
    # the status is passed on as the upstream sent it (a plain 500: see the raw tests).
    assert error.status == 502
    assert error.message == "Injected upstream error 500"
    assert error.retry_after is None
    assert request_error_for(error).status == 502


def test_error_in_the_middle(upstream: str) -> None:
    items, error = talk(upstream, ask("/error-mid 500"))
    assert items == [TextDelta(text="partial ")]
    assert error is not None
    assert "Injected upstream error 500" in error.message


def test_unknown_model(upstream: str) -> None:
    items, error = talk(upstream, ask("hi", model="no-such-model"))
    assert items == []
    assert error is not None
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "no-such-model" in error.message


def test_max_tokens_and_stop_pass_through(upstream: str) -> None:
    items, error = talk(upstream, ask("one two three four five", max_tokens=2))
    assert error is None
    assert text_of(items) == "one two "
    assert items[-1] == Finish(reason="length", usage=Usage(prompt_tokens=5, completion_tokens=2))

    items, error = talk(upstream, ask("one two STOP three", stop=("STOP",)))
    assert error is None
    assert text_of(items) == "one two "
    assert isinstance(items[-1], Finish) and items[-1].reason == "stop"


def test_options_pass_through(upstream: str) -> None:
    options = {"temperature": 0.5, "seed": 7, "top_p": 0.9, "response_format": {"type": "text"}}
    items, error = talk(upstream, ask("fine", options=options, user="u-1"))
    assert error is None
    assert text_of(items) == "fine"
    # The upstream validates what it gets: an out-of-range option proves the option got there.
    items, error = talk(upstream, ask("fine", options={"temperature": 5}))
    assert items == []
    assert error is not None
    assert (error.status, error.param) == (400, "temperature")


# --- a raw upstream of our own -------------------------------------------------------------


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Handler = Callable[[RawRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawUpstream:
    """HTTP/1.1 by hand: ``handler`` answers a request and says whether to keep the
    connection open for the next one."""

    handler: Handler
    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                start, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = start.split(" ", 2)
                headers = {}
                for line in lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                request = RawRequest(method, path, headers, json.loads(raw) if raw else None)
                self.requests.append(request)
                if not await self.handler(request, reader, writer):
                    break
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def status_line(
    status: int = 200, *headers: tuple[str, str], content_type: str = "text/event-stream"
) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n").encode()


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(obj: Any, *, sep: str = "\n") -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}{sep}{sep}"


def delta_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def sse(body: str | bytes, *, piece: int = 0, end: bool = True) -> Handler:
    """Answer with ``body`` as a chunked SSE stream, in pieces of ``piece`` bytes if given;
    ``end=False`` drops the connection instead of ending the body."""
    data = body.encode() if isinstance(body, str) else body
    size = piece or len(data) or 1

    async def handle(
        request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(status_line(200, ("transfer-encoding", "chunked")) + b"\r\n")
        for offset in range(0, len(data), size):
            writer.write(chunked(data[offset : offset + size]))
            await writer.drain()
            if piece:
                await asyncio.sleep(0.001)
        if not end:
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    return handle


def answer(status: int, body: Any, *headers: tuple[str, str], raw: bool = False) -> Handler:
    """A whole response: ``body`` as JSON (or as bytes when ``raw``)."""
    data = body if raw else json.dumps(body).encode()
    kind = "text/html" if raw else "application/json"

    async def handle(
        request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = status_line(status, ("content-length", str(len(data))), *headers, content_type=kind)
        writer.write(head + b"\r\n" + data)
        await writer.drain()
        return True

    return handle


def talk_raw(
    handler: Handler, request: ChatRequest, **options: Any
) -> tuple[list[ProviderItem], ProviderError | None, list[RawRequest]]:
    async def go() -> tuple[list[ProviderItem], ProviderError | None, list[RawRequest]]:
        async with RawUpstream(handler) as upstream:
            provider = OpenAICompatProvider(name="up", base_url=upstream.base_url, **options)
            try:
                items, error = await collect(provider, request)
            finally:
                await provider.aclose()
            return items, error, upstream.requests

    return run(go())


QUIRKY_STREAM = (
    ": keep-alive\r\n\r\n"
    "event: message\r\nid: 1\r\nretry: 100\r\n"
    + "data:" + json.dumps(delta_chunk({"role": "assistant", "content": ""})) + "\r\n\r\n"
    + event(delta_chunk({"content": "Hel"}), sep="\r\n")
    # One JSON object over two data lines; U+2028 must not split a line.
    + 'data: {"choices":[{"index":0,\r\ndata: "delta":{"content":"lo\u2028✓"}}]}\r\r'
    + event({"choices": [{"index": 1, "delta": {"content": "IGNORED"}}]})
    + event(delta_chunk({"tool_calls": [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}))
    + event(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}))
    + event(delta_chunk({"tool_calls": [
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz"'}}]}), sep="\r\n")
    + event(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}))
    + ": still here\n\n"
    + event(delta_chunk({"tool_calls": [{"index": 1, "function": {"arguments": ':"UTC"}'}}]}))
    + event(delta_chunk({}, "tool_calls"), sep="\r\n")
    + event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    + "data: [DONE]\r\n\r\n"
)  # fmt: skip
QUIRKY_ITEMS: list[ProviderItem] = [
    TextDelta(text="Hel"),
    TextDelta(text="lo\u2028✓"),
    ToolCall(id="call_a", name="get_weather", arguments='{"city":"Oslo"}'),
    ToolCall(id="call_b", name="get_time", arguments='{"tz":"UTC"}'),
    Finish(reason="tool_calls", usage=Usage(prompt_tokens=5, completion_tokens=7)),
]


def test_quirky_stream_and_the_request_sent() -> None:
    call = ToolCall(id="call_0", name="get_weather", arguments='{"city":"Rome"}')
    parts = [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
    ]
    request = ChatRequest(
        model="m1",
        messages=(
            ChatMessage(role="developer", content="be brief"),
            ChatMessage(role="user", content=parts, name="ann"),
            ChatMessage(role="assistant", content=None, tool_calls=(call,)),
            ChatMessage(role="tool", content="sunny", tool_call_id="call_0"),
        ),
        tools=(WEATHER, ToolSpec(name="get_time")),
        tool_choice="auto",
        max_tokens=50,
        stop=("END",),
        options={"temperature": 0.2, "seed": 7, "parallel_tool_calls": True},
        user="u1",
    )
    items, error, requests = talk_raw(
        sse(QUIRKY_STREAM, piece=11),
        request,
        api_key="sk-test",
        headers={"X-Extra": "1"},
    )
    assert error is None
    assert items == QUIRKY_ITEMS
    [sent] = requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["x-extra"] == "1"
    assert sent.body == {
        "temperature": 0.2,
        "seed": 7,
        "parallel_tool_calls": True,
        "model": "m1",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": parts, "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "call_0"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": WEATHER.description,
                    "parameters": WEATHER.parameters,
                },
            },
            {
                "type": "function",
                "function": {"name": "get_time", "description": "", "parameters": {}},
            },
        ],
        "tool_choice": "auto",
        "max_tokens": 50,
        "stop": ["END"],
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_sse_parser_at_every_split_point() -> None:
    data = QUIRKY_STREAM.encode()
    whole = _SSEParser()
    expected = whole.feed(data) + whole.close()
    assert len(expected) == 12
    assert expected[2].startswith(b'{"choices":[{"index":0,\n"delta"')
    for cut in range(1, len(data)):
        parser = _SSEParser()
        assert parser.feed(data[:cut]) + parser.feed(data[cut:]) + parser.close() == expected
    parser = _SSEParser()
    single = [payload for i in range(len(data)) for payload in parser.feed(data[i : i + 1])]
    assert single + parser.close() == expected


def test_request_without_tools_drops_tool_fields() -> None:
    body = event(delta_chunk({"content": "ok"})) + event(delta_chunk({}, "stop"))
    request = ask(
        "hi",
        tool_choice="none",
        max_tokens=9,
        options={"parallel_tool_calls": False, "max_completion_tokens": 100},
    )
    # Also: a body that ends after a finish_reason but without [DONE] is complete.
    items, error, [sent] = talk_raw(sse(body), request)
    assert error is None
    assert items == [TextDelta(text="ok"), Finish(reason="stop", usage=None)]
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        assert key not in sent.body
    assert (sent.body["max_tokens"], sent.body["max_completion_tokens"]) == (9, 9)


def test_non_json_event_is_malformed() -> None:
    body = event(delta_chunk({"content": "a"})) + "data: {not json\n\n" + "data: [DONE]\n\n"
    items, error, _ = talk_raw(sse(body), ask("hi"))
    assert items == [TextDelta(text="a")]
    assert error is not None
    assert (error.status, error.code) == (502, "malformed_upstream_stream")
    assert error.message.startswith("malformed upstream stream")
    assert request_error_for(error).status == 502


def test_stream_without_done_or_finish_is_malformed() -> None:
    items, error, _ = talk_raw(sse(event(delta_chunk({"content": "a"}))), ask("hi"))
    assert items == [TextDelta(text="a")]
    assert error is not None
    assert error.status == 502
    assert error.message.startswith("malformed upstream stream")


def test_connection_dropped_mid_body() -> None:
    items, error, _ = talk_raw(sse(event(delta_chunk({"content": "a"})), end=False), ask("hi"))
    assert items == [TextDelta(text="a")]
    assert error is not None
    assert (error.status, error.code) == (502, "upstream_disconnected")


def test_error_event_mid_stream() -> None:
    failure = {"message": "Engine crashed", "type": "server_error", "param": None, "code": "boom"}
    body = event(delta_chunk({"content": "a"})) + event({"error": failure}) + "data: [DONE]\n\n"
    items, error, _ = talk_raw(sse(body), ask("hi"))
    assert items == [TextDelta(text="a")]
    assert error is not None
    assert (error.message, error.type, error.code) == ("Engine crashed", "server_error", "boom")


def test_error_event_first_with_integer_code() -> None:
    # vLLM's shape: the HTTP status as an integer code, inside a 200 stream.
    failure = {"message": "Too many", "type": "RateLimitError", "param": None, "code": 429}
    items, error, _ = talk_raw(sse(event({"error": failure})), ask("hi"))
    assert items == []
    assert error is not None
    assert (error.status, error.code, error.message) == (429, None, "Too many")


@pytest.mark.parametrize(
    ("handler", "status", "message", "kind", "code", "retry_after"),
    [
        pytest.param(
            answer(
                503,
                {"error": {"message": "Overloaded", "type": "service_unavailable", "code": "x"}},
                ("retry-after", "7"),
            ),
            503, "Overloaded", "service_unavailable", "x", 7.0,
            id="503-retry-after",
        ),
        pytest.param(
            answer(500, {"error": {"message": "Oops", "type": "server_error", "code": None}}),
            500, "Oops", "server_error", None, None,
            id="500",
        ),
        pytest.param(
            answer(429, {"error": {"message": "Slow down"}}, ("retry-after-ms", "1500")),
            429, "Slow down", None, None, 1.5,
            id="429-retry-after-ms",
        ),
        pytest.param(
            answer(404, {"error": "model 'x' not found"}),
            404, "model 'x' not found", None, None, None,
            id="404-error-string",
        ),
        pytest.param(
            answer(400, {"object": "error", "message": "Bad", "type": "BadRequestError",
                         "param": None, "code": 400}),
            400, "Bad", "BadRequestError", None, None,
            id="400-flat-vllm",
        ),
        pytest.param(
            answer(422, {"detail": [{"loc": ["body", "x"], "msg": "field required"}]}),
            422, '[{"loc": ["body", "x"], "msg": "field required"}]', None, None, None,
            id="422-fastapi",
        ),
        pytest.param(
            answer(502, b"<html><body>\n  <h1>502 Bad Gateway</h1>\n</body></html>", raw=True),
            502, "Upstream up answered HTTP 502 X: <html><body> <h1>502 Bad Gateway</h1>"
            " </body></html>", None, None, None,
            id="502-html",
        ),
    ],
)  # fmt: skip
def test_error_status_before_the_stream(
    handler: Handler,
    status: int,
    message: str,
    kind: str | None,
    code: str | None,
    retry_after: float | None,
) -> None:
    items, error, _ = talk_raw(handler, ask("hi"))
    assert items == []
    assert error is not None
    assert (error.status, error.message, error.type, error.code) == (status, message, kind, code)
    assert error.retry_after == retry_after
    assert request_error_for(error).status == (502 if status >= 500 and status != 503 else status)


def test_503_retry_after_reaches_the_client() -> None:
    handler = answer(503, {"error": {"message": "Busy", "type": "x"}}, ("Retry-After", "7"))
    _, error, _ = talk_raw(handler, ask("hi"))
    assert error is not None
    mapped = request_error_for(error)
    assert mapped.status == 503
    assert ("retry-after", "7") in mapped.headers


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    _, error, _ = talk_raw(
        answer(429, {"error": {"message": "Later"}}, ("retry-after", when)), ask("hi")
    )
    assert error is not None and error.retry_after is not None
    assert 25 < error.retry_after <= 30


def test_json_completion_when_the_upstream_ignores_stream() -> None:
    completion = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {"id": "call_x", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                    ],
                },
                "finish_reason": "stop",  # Ollama says "stop" after calling a tool
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }  # fmt: skip
    items, error, _ = talk_raw(answer(200, completion), ask("hi", tools=(WEATHER,)))
    assert error is None
    assert items == [
        TextDelta(text="Let me check."),
        ToolCall(id="call_x", name="get_weather", arguments='{"city":"Oslo"}'),
        Finish(reason="tool_calls", usage=Usage(prompt_tokens=3, completion_tokens=4)),
    ]


def test_upstream_refusing_stream_options() -> None:
    refusal = answer(400, {"error": {"message": "Unknown field stream_options", "type": "x"}})
    ok = sse(event(delta_chunk({"content": "ok"}, "stop")) + "data: [DONE]\n\n")

    async def handle(
        request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        chosen = refusal if "stream_options" in request.body else ok
        return await chosen(request, reader, writer)

    async def go() -> tuple[list[list[ProviderItem]], list[RawRequest]]:
        async with RawUpstream(handle) as upstream:
            provider = OpenAICompatProvider(name="up", base_url=upstream.base_url)
            try:
                results = [await collect(provider, ask("hi")) for _ in range(2)]
            finally:
                await provider.aclose()
        assert all(error is None for _, error in results)
        return [items for items, _ in results], upstream.requests

    streams, requests = run(go())
    assert streams == [[TextDelta(text="ok"), Finish(reason="stop")]] * 2
    assert ["stream_options" in r.body for r in requests] == [True, False, False]


def test_keep_alive_reuses_the_connection() -> None:
    body = event(delta_chunk({"content": "ok"}, "stop")) + "data: [DONE]\n\n"

    async def go() -> tuple[int, int]:
        async with RawUpstream(sse(body)) as upstream:
            provider = OpenAICompatProvider(name="up", base_url=upstream.base_url)
            try:
                for _ in range(3):
                    _, error = await collect(provider, ask("hi"))
                    assert error is None
            finally:
                await provider.aclose()
            return upstream.connections, len(upstream.requests)

    assert run(go()) == (1, 3)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_connection_refused() -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    items, error = talk(base_url, ask("hi"))
    assert items == []
    assert error is not None
    assert (error.status, error.type, error.code) == (502, "upstream_error", "upstream_unreachable")
    assert request_error_for(error).status == 502

    async def listing(models: tuple[str, ...]) -> list[ModelInfo] | ProviderError:
        provider = OpenAICompatProvider(name="up", base_url=base_url, models=models)
        try:
            return await provider.list_models()
        except ProviderError as error:
            return error
        finally:
            await provider.aclose()

    failed = run(listing(()))
    assert isinstance(failed, ProviderError) and failed.status == 502
    assert run(listing(("a", "b"))) == [
        ModelInfo(id="a", owned_by="up"),
        ModelInfo(id="b", owned_by="up"),
    ]


def test_list_models_from_a_raw_upstream() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "created": 5, "owned_by": "someone"},
            {"id": "a", "object": "model"},
            {"id": "b", "object": "model", "created": "yesterday"},
        ],
    }

    async def go() -> tuple[list[ModelInfo], list[bool], list[RawRequest]]:
        async with RawUpstream(answer(200, listing)) as upstream:
            provider = OpenAICompatProvider(
                name="up", base_url=upstream.base_url + "/", api_key="k", models=("c", "a")
            )
            try:
                models = await provider.list_models()
            finally:
                await provider.aclose()
            served = [provider.serves(m) for m in ("a", "b", "c", "d")]
            return models, served, upstream.requests

    models, served, [sent] = run(go())
    assert models == [
        ModelInfo(id="a", owned_by="up", created=5),
        ModelInfo(id="b", owned_by="up"),
        ModelInfo(id="c", owned_by="up"),
    ]
    assert served == [True, True, True, False]
    assert (sent.method, sent.path, sent.headers["authorization"]) == (
        "GET",
        "/v1/models",
        "Bearer k",
    )


def test_list_models_error_status() -> None:
    handler = answer(401, {"error": {"message": "Bad key", "code": "invalid_api_key"}})

    async def go() -> ProviderError:
        async with RawUpstream(handler) as upstream:
            provider = OpenAICompatProvider(name="up", base_url=upstream.base_url)
            try:
                await provider.list_models()
            except ProviderError as error:
                return error
            finally:
                await provider.aclose()
        raise AssertionError("no error")

    error = run(go())
    assert (error.status, error.code, error.message) == (401, "invalid_api_key", "Bad key")


@pytest.mark.parametrize("how", ["cancel", "aclose"])
def test_cancellation_closes_the_upstream_response(how: str) -> None:
    async def go() -> float:
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()

        async def slow(
            request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> bool:
            writer.write(status_line(200, ("transfer-encoding", "chunked")) + b"\r\n")
            writer.write(chunked(event(delta_chunk({"content": "first"})).encode()))
            await writer.drain()
            # A slow model: nothing more until the client goes away.
            try:
                while await reader.read(1024):
                    pass
            except ConnectionError:
                pass
            closed.set()
            return False

        async with RawUpstream(slow) as upstream:
            provider = OpenAICompatProvider(name="up", base_url=upstream.base_url)
            try:
                stream = provider.stream(ask("hi"))
                assert isinstance(stream, AsyncGenerator)
                if how == "cancel":
                    first = asyncio.Event()
                    items: list[ProviderItem] = []

                    async def consume() -> None:
                        async for item in stream:
                            items.append(item)
                            first.set()

                    task = asyncio.create_task(consume())
                    await asyncio.wait_for(first.wait(), 5)
                    assert items == [TextDelta(text="first")]
                    start = loop.time()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    assert await stream.__anext__() == TextDelta(text="first")
                    start = loop.time()
                    await stream.aclose()
                await asyncio.wait_for(closed.wait(), 1.0)
                return loop.time() - start
            finally:
                await provider.aclose()

    assert run(go()) < 1.0


def test_provider_survives_a_new_event_loop(upstream: str) -> None:
    # Built outside any loop; each loop closes its pool at the end, as the server does.
    provider = OpenAICompatProvider(name="up", base_url=upstream)

    async def once() -> tuple[list[ProviderItem], ProviderError | None]:
        try:
            return await collect(provider, ask("again"))
        finally:
            await provider.aclose()

    for _ in range(2):
        items, error = run(once())
        assert error is None and text_of(items) == "again"


def test_invalid_base_url() -> None:
    for bad in ("ftp://example.com/v1", "127.0.0.1:8000/v1", "http:///v1"):
        with pytest.raises(ValueError):
            OpenAICompatProvider(name="up", base_url=bad)
