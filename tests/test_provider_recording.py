"""Record/replay of provider streams (providers/recording.py).

The inner provider is the deterministic ``echo`` model; streams are driven with
``asyncio.run`` so the tests need no pytest plugin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
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
from wirechat.providers import ChatProvider, EchoProvider, ProviderRouter
from wirechat.providers.recording import (
    FORMAT,
    RecordingProvider,
    ReplayProvider,
    recording_filename,
    request_key,
)

WEATHER = ToolSpec(
    name="get_weather",
    description="The weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def make_request(*messages: ChatMessage | str, **fields: Any) -> ChatRequest:
    converted = tuple(user(m) if isinstance(m, str) else m for m in messages)
    return ChatRequest(model=fields.pop("model", "echo"), messages=converted, **fields)


def run_stream(
    provider: ChatProvider | ProviderRouter, request: ChatRequest
) -> tuple[list[ProviderItem], ProviderError | None]:
    """The items the stream yields and the ProviderError it ends with (if any)."""

    async def run() -> tuple[list[ProviderItem], ProviderError | None]:
        items: list[ProviderItem] = []
        try:
            async for item in provider.stream(request):
                items.append(item)
        except ProviderError as exc:
            return items, exc
        return items, None

    return asyncio.run(run())


def collect(provider: ChatProvider | ProviderRouter, request: ChatRequest) -> list[ProviderItem]:
    items, error = run_stream(provider, request)
    assert error is None
    return items


def read_recording(directory: Path, request: ChatRequest) -> dict[str, Any]:
    path = directory / recording_filename(request)
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "format"')  # indent=2: readable and diffable
    document: dict[str, Any] = json.loads(text)
    return document


def serialize(items: list[ProviderItem], error: ProviderError | None) -> bytes:
    """Items and error as canonical JSON bytes, for byte-for-byte comparisons."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, TextDelta):
            out.append(["text", item.text])
        elif isinstance(item, ToolCall):
            out.append(["tool_call", item.id, item.name, item.arguments])
        else:
            usage = item.usage
            out.append(
                [
                    "finish",
                    item.reason,
                    None if usage is None else [usage.prompt_tokens, usage.completion_tokens],
                ]
            )
    if error is not None:
        out.append(
            [
                "error",
                error.message,
                error.status,
                error.type,
                error.code,
                error.param,
                error.retry_after,
            ]
        )
    return json.dumps(out, sort_keys=True, separators=(",", ":")).encode()


# The conversations recorded by most tests: (request, ends with an error).
PLAIN = make_request(ChatMessage(role="system", content="be brief"), "Hello there,  world")
TOOL = make_request('/tool get_weather {"city": "Paris"}', tools=(WEATHER,))
ERROR = make_request("/error 429")
ERROR_MID = make_request("/error-mid 500 partial answer")
CONVERSATIONS = [PLAIN, TOOL, ERROR, ERROR_MID]


@pytest.fixture
def recorded(tmp_path: Path) -> dict[str, tuple[list[ProviderItem], ProviderError | None]]:
    """Records every conversation into tmp_path; returns what the live stream produced."""
    recorder = RecordingProvider(EchoProvider(), tmp_path)
    return {request_key(r): run_stream(recorder, r) for r in CONVERSATIONS}


# --- the key -----------------------------------------------------------------------------


def test_request_key_is_the_sha256_of_the_documented_canonical_json() -> None:
    request = make_request(
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="user", content=[{"type": "text", "text": "héllo"}], name="ann"),
        ChatMessage(
            role="assistant",
            tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"city":"X"}'),),
        ),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        tools=(WEATHER,),
    )
    canonical = {
        "model": "echo",
        "messages": [
            {"role": "system", "content": "sys", "name": None, "tool_calls": []},
            {
                "role": "user",
                "content": [{"type": "text", "text": "héllo"}],
                "name": "ann",
                "tool_calls": [],
            },
            {
                "role": "assistant",
                "content": None,
                "name": None,
                "tool_calls": [{"name": "get_weather", "arguments": '{"city":"X"}'}],
            },
            {"role": "tool", "content": "sunny", "name": None, "tool_calls": []},
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert request_key(request) == hashlib.sha256(text.encode()).hexdigest()


def test_request_key_ignores_tool_call_ids_and_unkeyed_fields_only() -> None:
    def conversation(call_id: str, **fields: Any) -> ChatRequest:
        call = ToolCall(id=call_id, name="get_weather", arguments="{}")
        return make_request(
            "/tool get_weather",
            ChatMessage(role="assistant", tool_calls=(call,)),
            ChatMessage(role="tool", content="sunny", tool_call_id=call_id),
            **{"tools": (WEATHER,), **fields},
        )

    key = request_key(conversation("call_a"))
    assert len(key) == 64 and int(key, 16) >= 0
    assert request_key(conversation("call_b")) == key
    # Recorded but not keyed: sampling and limits.
    assert request_key(conversation("call_a", max_tokens=3, options={"temperature": 0})) == key
    assert request_key(conversation("call_a", model="other")) != key
    assert request_key(conversation("call_a", tools=())) != key
    assert request_key(make_request("a")) != request_key(make_request("b"))
    assert request_key(make_request("a")) != request_key(
        make_request(ChatMessage(role="system", content="a"))
    )


# --- recording ---------------------------------------------------------------------------


def test_recording_passes_the_stream_through_unchanged(tmp_path: Path) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path)
    assert collect(recorder, PLAIN) == collect(EchoProvider(), PLAIN)
    assert recorder.name == "wirechat"
    assert recorder.serves("echo") and not recorder.serves("gpt-4o")
    assert asyncio.run(recorder.list_models()) == asyncio.run(EchoProvider().list_models())


def test_recording_file_has_the_documented_fields(tmp_path: Path, recorded: Any) -> None:
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(recording_filename(r) for r in CONVERSATIONS)
    assert all(name.startswith("echo-") and len(name) == len("echo-") + 16 + 5 for name in files)

    document = read_recording(tmp_path, PLAIN)
    assert list(document) == [
        "format",
        "key",
        "model",
        "provider",
        "request",
        "items",
        "error",
        "cancelled",
        "recorded_at",
    ]
    assert document["format"] == FORMAT == "wirechat-recording/1"
    assert document["key"] == request_key(PLAIN)
    assert document["model"] == "echo" and document["provider"] == "wirechat"
    assert document["request"] == {
        "model": "echo",
        "messages": [
            {
                "role": "system",
                "content": "be brief",
                "name": None,
                "tool_calls": [],
                "tool_call_id": None,
            },
            {
                "role": "user",
                "content": "Hello there,  world",
                "name": None,
                "tool_calls": [],
                "tool_call_id": None,
            },
        ],
        "tools": [],
        "tool_choice": None,
        "max_tokens": None,
        "stop": [],
        "options": {},
    }
    items = document["items"]
    assert [(i["type"], i.get("text")) for i in items] == [
        ("text", "Hello "),
        ("text", "there,  "),
        ("text", "world"),
        ("finish", None),
    ]
    assert items[-1]["reason"] == "stop"
    assert items[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3}
    assert all(isinstance(i["t"], float) and 0 <= i["t"] < 1 for i in items)
    assert document["error"] is None and document["cancelled"] is False
    recorded_at = document["recorded_at"]
    assert recorded_at.endswith("+00:00") and recorded_at[:4].isdigit()


def test_recording_of_a_tool_call_and_of_errors(tmp_path: Path, recorded: Any) -> None:
    (call, _finish), _ = recorded[request_key(TOOL)]
    assert isinstance(call, ToolCall)
    tool_items = read_recording(tmp_path, TOOL)["items"]
    assert tool_items[0] == {
        "t": tool_items[0]["t"],
        "type": "tool_call",
        "id": call.id,
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    }
    assert tool_items[1]["reason"] == "tool_calls"
    assert read_recording(tmp_path, TOOL)["request"]["tools"] == [
        {"name": WEATHER.name, "description": WEATHER.description, "parameters": WEATHER.parameters}
    ]

    # The error went through to the consumer, and into the file.
    items, error = recorded[request_key(ERROR)]
    assert items == [] and error is not None and error.status == 429
    document = read_recording(tmp_path, ERROR)
    assert document["items"] == []
    assert document["error"] == {
        "t": document["error"]["t"],
        "message": "Injected upstream error 429",
        "status": 429,
        "type": None,
        "code": None,
        "param": None,
        "retry_after": 1.0,
    }
    assert document["cancelled"] is False

    document = read_recording(tmp_path, ERROR_MID)
    assert [i["text"] for i in document["items"]] == ["partial "]
    assert document["error"]["status"] == 500
    assert document["error"]["message"] == "Injected upstream error 500 after the first token"
    assert document["error"]["retry_after"] is None


def test_rerecording_overwrites_the_file_atomically(tmp_path: Path) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path / "new" / "dir")
    collect(recorder, PLAIN)
    first = read_recording(recorder.directory, PLAIN)
    time.sleep(0.002)
    collect(recorder, PLAIN)
    second = read_recording(recorder.directory, PLAIN)
    # One file, no temp file left behind, and it is the newer recording.
    assert [p.name for p in recorder.directory.iterdir()] == [recording_filename(PLAIN)]
    assert second["recorded_at"] > first["recorded_at"]
    assert second["items"][0]["text"] == first["items"][0]["text"]


def test_model_names_are_sanitized_into_the_directory(tmp_path: Path) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path)
    request = make_request("hi", model="../../etc/My Model:v1")
    collect(recorder, request)  # echo answers whatever model it is handed
    (path,) = tmp_path.iterdir()
    assert path.name == f"etc_My_Model_v1-{request_key(request)[:16]}.json"
    assert json.loads(path.read_text())["model"] == "../../etc/My Model:v1"


class CrashingProvider:
    """A language-model double that says one word and then fails with a plain bug."""

    name = "crashy"

    def serves(self, model: str) -> bool:
        return True

    async def list_models(self) -> list[ModelInfo]:
        return []

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        yield TextDelta(text="one ")
        raise RuntimeError("boom")


def test_a_crashing_provider_is_recorded_as_the_500_the_transport_reports(tmp_path: Path) -> None:
    recorder = RecordingProvider(CrashingProvider(), tmp_path)

    async def run() -> None:
        async for _ in recorder.stream(PLAIN):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())
    document = read_recording(tmp_path, PLAIN)
    assert document["provider"] == "crashy"
    assert document["error"]["status"] == 500
    assert document["error"]["message"] == "The model failed"
    items, error = run_stream(ReplayProvider(tmp_path), PLAIN)
    assert items == [TextDelta(text="one ")]
    assert error is not None and error.status == 500


# --- cancellation ------------------------------------------------------------------------

SLOW_CUT = make_request("/slow 30 a b c d e f")


def test_a_cancelled_stream_is_recorded_as_cancelled(tmp_path: Path) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path)

    async def run() -> list[ProviderItem]:
        items: list[ProviderItem] = []

        async def consume() -> None:
            async for item in recorder.stream(SLOW_CUT):
                items.append(item)

        task = asyncio.create_task(consume())
        while not items:
            await asyncio.sleep(0.005)
        task.cancel()  # lands inside the inner stream's sleep
        with pytest.raises(asyncio.CancelledError):
            await task
        return items

    items = asyncio.run(run())
    document = read_recording(tmp_path, SLOW_CUT)
    assert document["cancelled"] is True and document["error"] is None
    assert [i["text"] for i in document["items"]] == [
        i.text for i in items if isinstance(i, TextDelta)
    ]
    assert not any(i["type"] == "finish" for i in document["items"])

    # Replayed: the same items, then the end, without a Finish.
    replayed = collect(ReplayProvider(tmp_path), SLOW_CUT)
    assert replayed == items


def test_a_stream_closed_early_is_cancelled_and_closes_the_inner_stream(tmp_path: Path) -> None:
    closed: list[bool] = []

    class Tracking(EchoProvider):
        async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
            try:
                async for item in super().stream(request):
                    yield item
            finally:
                closed.append(True)

    recorder = RecordingProvider(Tracking(), tmp_path)

    async def take_first() -> ProviderItem:
        stream = recorder.stream(make_request("one two three"))
        first = await anext(aiter(stream))
        await stream.aclose()  # type: ignore[attr-defined]
        return first

    assert asyncio.run(take_first()) == TextDelta(text="one ")
    assert closed == [True]
    document = read_recording(tmp_path, make_request("one two three"))
    assert document["cancelled"] is True
    assert [i["text"] for i in document["items"]] == ["one "]


def test_a_stream_closed_right_after_its_finish_is_complete(tmp_path: Path) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path)

    async def until_finish() -> None:
        stream = recorder.stream(PLAIN)
        async for item in stream:
            if isinstance(item, Finish):
                break
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(until_finish())
    document = read_recording(tmp_path, PLAIN)
    assert document["cancelled"] is False
    assert document["items"][-1]["type"] == "finish"


# --- replay ------------------------------------------------------------------------------


def test_replay_reproduces_items_and_errors(tmp_path: Path, recorded: Any) -> None:
    replay = ReplayProvider(tmp_path)
    assert len(replay) == len(CONVERSATIONS)
    for request in CONVERSATIONS:
        live_items, live_error = recorded[request_key(request)]
        items, error = run_stream(replay, request)
        assert items == live_items  # ToolCall ids included
        if live_error is None:
            assert error is None
        else:
            assert error is not None
            assert (error.message, error.status, error.retry_after, error.type, error.code) == (
                live_error.message,
                live_error.status,
                live_error.retry_after,
                live_error.type,
                live_error.code,
            )
    (call, _), _ = run_stream(replay, TOOL)
    assert isinstance(call, ToolCall) and call.id.startswith("call_")


def test_replay_is_byte_identical_across_runs(tmp_path: Path, recorded: Any) -> None:
    def everything(provider: ReplayProvider) -> bytes:
        return b"\n".join(serialize(*run_stream(provider, r)) for r in CONVERSATIONS)

    first = everything(ReplayProvider(tmp_path))
    assert first == everything(ReplayProvider(tmp_path))
    provider = ReplayProvider(tmp_path)
    assert everything(provider) == everything(provider) == first


def test_unmatched_request_is_a_404_recording_not_found(tmp_path: Path, recorded: Any) -> None:
    replay = ReplayProvider(tmp_path)
    for request in (
        make_request("never recorded"),
        make_request('/tool get_weather {"city": "Paris"}'),  # tools differ
        make_request("Hello there,  world"),  # system message missing
    ):
        items, error = run_stream(replay, request)
        assert items == [] and error is not None
        assert error.status == 404
        assert error.type == "invalid_request_error"
        assert error.code == "recording_not_found"
        assert error.message == "No recording matches this request (model, messages, tools)"


def test_list_models_and_serves(tmp_path: Path, recorded: Any) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path)
    collect(recorder, make_request("hi", model="gpt-4o"))
    collect(recorder, make_request("hi again", model="gpt-4o"))
    replay = ReplayProvider(tmp_path)
    assert replay.name == "replay"
    assert asyncio.run(replay.list_models()) == [
        ModelInfo(id="echo", owned_by="replay", created=0),
        ModelInfo(id="gpt-4o", owned_by="replay", created=0),
    ]
    assert replay.serves("echo") and replay.serves("gpt-4o") and not replay.serves("gpt-5")

    # Behind the router: recorded models are served, others are the router's 404.
    router = ProviderRouter([replay])
    assert collect(router, make_request("hi", model="gpt-4o"))[0] == TextDelta(text="hi")
    _, error = run_stream(router, make_request("hi", model="gpt-5"))
    assert error is not None and error.code == "model_not_found"


def test_replay_of_an_empty_directory_and_of_a_missing_one(tmp_path: Path) -> None:
    replay = ReplayProvider(tmp_path)
    assert len(replay) == 0 and asyncio.run(replay.list_models()) == []
    assert not replay.serves("echo")
    with pytest.raises(FileNotFoundError):
        ReplayProvider(tmp_path / "missing")


# --- timing ------------------------------------------------------------------------------

SLOW = make_request("/slow 50 a b c")


def timed(provider: ChatProvider, request: ChatRequest) -> list[tuple[float, ProviderItem]]:
    async def run() -> list[tuple[float, ProviderItem]]:
        started = time.monotonic()
        return [(time.monotonic() - started, item) async for item in provider.stream(request)]

    return asyncio.run(run())


def test_timing_reproduces_the_recorded_delays(tmp_path: Path) -> None:
    live = timed(RecordingProvider(EchoProvider(), tmp_path), SLOW)
    offsets = [i["t"] for i in read_recording(tmp_path, SLOW)["items"]]
    assert [item for _, item in live][:3] == [TextDelta(text=w) for w in ("a ", "b ", "c")]
    # /slow sleeps 50 ms before every word; the Finish follows the last word at once.
    for index, t in enumerate(offsets[:3]):
        assert 0.05 * (index + 1) - 0.005 <= t <= 0.05 * (index + 1) + 0.1
    assert offsets[3] - offsets[2] < 0.05

    replayed = timed(ReplayProvider(tmp_path, timing=True), SLOW)
    assert [item for _, item in replayed] == [item for _, item in live]
    for (at, _), t in zip(replayed, offsets, strict=True):
        assert t - 0.005 <= at <= t + 0.1

    fast = timed(ReplayProvider(tmp_path), SLOW)
    assert [item for _, item in fast] == [item for _, item in live]
    assert fast[-1][0] < 0.05


def test_timing_places_a_recorded_error_at_its_offset(tmp_path: Path) -> None:
    document = {
        "format": FORMAT,
        "model": "echo",
        "request": {"messages": [{"role": "user", "content": "late failure"}]},
        "items": [{"t": 0.0, "type": "text", "text": "early "}],
        "error": {"t": 0.08, "message": "gone", "status": 503, "retry_after": 2},
    }
    (tmp_path / "hand-written.json").write_text(json.dumps(document))

    async def run() -> tuple[float, ProviderError]:
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            async for _ in ReplayProvider(tmp_path, timing=True).stream(
                make_request("late failure")
            ):
                pass
        return time.monotonic() - started, caught.value

    elapsed, error = asyncio.run(run())
    assert 0.075 <= elapsed <= 0.2
    assert (error.message, error.status, error.retry_after, error.code) == ("gone", 503, 2.0, None)


# --- tool rounds -------------------------------------------------------------------------


def test_a_conversation_with_a_tool_round_still_matches_on_replay(tmp_path: Path) -> None:
    recorder = RecordingProvider(EchoProvider(), tmp_path)

    def round_two(call: ToolCall) -> ChatRequest:
        return make_request(
            TOOL.messages[0],
            ChatMessage(role="assistant", tool_calls=(call,)),
            ChatMessage(role="tool", content="sunny, 21C", tool_call_id=call.id),
            tools=(WEATHER,),
        )

    # Recording: round one calls the tool (random id), round two answers it.
    (recorded_call, _) = collect(recorder, TOOL)
    assert isinstance(recorded_call, ToolCall)
    recorded_reply = collect(recorder, round_two(recorded_call))
    reply_text = "".join(i.text for i in recorded_reply if isinstance(i, TextDelta))
    assert reply_text == "tool get_weather returned: sunny, 21C"

    replay = ReplayProvider(tmp_path)
    # A client driven by the replay gets the recorded id back and continues with it.
    (replayed_call, _) = collect(replay, TOOL)
    assert replayed_call == recorded_call
    assert collect(replay, round_two(replayed_call)) == recorded_reply

    # A conversation whose ids came from a different live run matches just as well.
    (live_call, _) = collect(EchoProvider(), TOOL)
    assert isinstance(live_call, ToolCall) and live_call.id != recorded_call.id
    assert collect(replay, round_two(live_call)) == recorded_reply


# --- loading -----------------------------------------------------------------------------


def test_invalid_files_are_skipped_with_a_warning(
    tmp_path: Path, recorded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    valid = read_recording(tmp_path, PLAIN)
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "other-format.json").write_text(json.dumps({**valid, "format": "x/2"}))
    bad_item = {**valid, "items": [{"t": 0, "type": "image"}]}
    (tmp_path / "bad-item.json").write_text(json.dumps(bad_item))
    bad_reason = {**valid, "items": [{"t": 0, "type": "finish", "reason": "bored"}]}
    (tmp_path / "bad-reason.json").write_text(json.dumps(bad_reason))
    (tmp_path / "no-request.json").write_text(json.dumps({**valid, "request": None}))
    (tmp_path / "note.txt").write_text("not a recording")
    (tmp_path / ".echo-x.json.1.ab.tmp").write_text("{")

    with caplog.at_level(logging.WARNING, logger="wirechat.providers"):
        replay = ReplayProvider(tmp_path)
    skipped = {
        record.args[0].name  # type: ignore[index,union-attr]
        for record in caplog.records
        if record.getMessage().startswith("skipping recording")
    }
    assert skipped == {
        "broken.json",
        "list.json",
        "binary.json",
        "other-format.json",
        "bad-item.json",
        "bad-reason.json",
        "no-request.json",
    }
    assert len(replay) == len(CONVERSATIONS)
    assert collect(replay, PLAIN) == recorded[request_key(PLAIN)][0]


def test_a_hand_edited_recording_replays_what_it_now_says(tmp_path: Path) -> None:
    collect(RecordingProvider(EchoProvider(), tmp_path), PLAIN)
    path = tmp_path / recording_filename(PLAIN)
    document = json.loads(path.read_text())
    document["request"]["messages"][1]["content"] = "What is the weather?"
    document["items"] = [
        {"t": 0.0, "type": "text", "text": "Sunny."},
        {"t": 0.0, "type": "finish", "reason": "stop", "usage": None},
    ]
    path.write_text(json.dumps(document, indent=2))

    replay = ReplayProvider(tmp_path)
    edited = make_request(PLAIN.messages[0], "What is the weather?")
    assert collect(replay, edited) == [TextDelta(text="Sunny."), Finish(reason="stop", usage=None)]
    _, error = run_stream(replay, PLAIN)
    assert error is not None and error.code == "recording_not_found"


def test_finish_usage_round_trips(tmp_path: Path) -> None:
    collect(RecordingProvider(EchoProvider(), tmp_path), PLAIN)
    items = collect(ReplayProvider(tmp_path), PLAIN)
    assert items[-1] == Finish(reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=3))
