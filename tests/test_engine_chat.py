"""The NodeTool chat session on the engine's ``/chat`` WebSocket, driven through bytes.

The test plays the thread store, the tools and the providers by answering the effects the
engine asks for (``OpenThread`` → ``thread_opened``, ``CallProvider`` → ``provider_*``,
``RunTool`` → ``tool_finished``, ``SaveMessages`` → ``messages_saved``); every frame the
server writes is parsed by a wsproto client and decoded with ``json`` / ``msgpack``.

Specs: PROTOCOL.md §4 and §6; reference/nodetool-spec.md §3.3-§3.7 and §3.10.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from wirechat.engine import (
    ChatMessage,
    EngineConfig,
    Finish,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolSpec,
)
from wirechat.engine.events import (
    CallProvider,
    CancelProvider,
    CancelTool,
    OpenThread,
    RunTool,
    SaveMessages,
)
from ws_peer import OP_TEXT, T0, Got, WsPeer, frame, only

CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluate an arithmetic expression",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
)
CLOCK = ToolSpec(name="current_time", description="The time now", parameters={"type": "object"})
CONFIG = EngineConfig(ws_ping_interval=1e6, server_tools=(CALCULATOR, CLOCK))
CALC_CALL = ToolCall(id="call_1", name="calculator", arguments='{"expression": "2*7"}')
SELECTION_TOOL = {
    "name": "get_selection",
    "description": "The nodes selected in the editor",
    "parameters": {"type": "object", "properties": {}},
}


def peer_for(config: EngineConfig = CONFIG) -> WsPeer:
    peer = WsPeer(config).open()
    peer.take_effects()
    return peer


def send(peer: WsPeer, payload: dict[str, Any], *, binary: bool = False) -> None:
    if binary:
        peer.send_msgpack(payload)
    else:
        peer.send_json(payload)


def start(peer: WsPeer, content: str = "hi", *, binary: bool = False, **fields: Any) -> OpenThread:
    """Send a chat message; return the ``OpenThread`` it caused."""
    send(peer, {"type": "message", "role": "user", "content": content, **fields}, binary=binary)
    return only(e for e in peer.take_effects() if isinstance(e, OpenThread))


def open_turn(
    peer: WsPeer, content: str = "hi", *, binary: bool = False, **fields: Any
) -> tuple[OpenThread, CallProvider]:
    """Start a turn and answer its ``OpenThread`` with just the user message."""
    op = start(peer, content, binary=binary, **fields)
    peer.opened(op.op_id, list(op.append))
    call = only(e for e in peer.take_effects() if isinstance(e, CallProvider))
    return op, call


def finish_turn(peer: WsPeer, stream_id: int, *items: Any) -> SaveMessages:
    """Answer a provider call with ``items`` and no tool call; return the save."""
    peer.answer(stream_id, *items)
    return only(e for e in peer.take_effects() if isinstance(e, SaveMessages))


def subset(frame_: dict[str, Any], **expected: Any) -> bool:
    return all(k in frame_ and frame_[k] == v for k, v in expected.items())


def types_of(got: list[Got]) -> list[str]:
    return [g.type for g in got]


# --- a plain turn ------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_plain_turn(binary: bool) -> None:
    peer = peer_for()
    earlier = [
        ChatMessage(role="user", content="earlier question"),
        ChatMessage(role="assistant", content="earlier answer"),
    ]
    send(peer, {"type": "message", "role": "user", "content": "Say hello"}, binary=binary)
    op = only(peer.of_type(OpenThread))
    assert op.append == (ChatMessage(role="user", content="Say hello"),)
    assert op.user_id == "1"
    thread_id = op.thread_id
    assert isinstance(thread_id, str) and len(thread_id) >= 16
    # Nothing goes out (no echo of the user message) and no model call before the store.
    assert peer.got == [] and not peer.of_type(CallProvider)

    history = [*earlier, *op.append]
    peer.opened(op.op_id, history, now=T0 + 1)
    call = only(peer.of_type(CallProvider))
    assert call.request.messages == tuple(history)
    assert call.request.model == CONFIG.default_model
    assert call.request.tools == ()
    assert call.user_id == "1"
    assert peer.got == []

    peer.chunk(call.stream_id, TextDelta(text="Hel"))
    peer.chunk(call.stream_id, TextDelta(text=""))  # an empty delta sends nothing
    peer.chunk(call.stream_id, TextDelta(text="lo"))
    peer.chunk(call.stream_id, Finish(reason="stop"))
    chunks = peer.take()
    assert [g.encoding for g in chunks] == ["msgpack" if binary else "json"] * 2
    for got, text in zip(chunks, ["Hel", "lo"], strict=True):
        assert subset(
            got.frame,
            type="chunk",
            content=text,
            content_type="text",
            done=False,
            thread_id=thread_id,
        ), got.frame

    peer.done(call.stream_id)
    (done,) = peer.take()
    assert done.frame == {"type": "chunk", "content": "", "done": True, "thread_id": thread_id}
    save = only(peer.of_type(SaveMessages))
    assert save.thread_id == thread_id and save.user_id == "1"
    assert save.messages[-1] == ChatMessage(role="assistant", content="Hello")
    # The final message waits for the save to be durable.
    peer.timer(T0 + 2)
    assert peer.take() == []

    peer.saved(save.op_id)
    (final,) = peer.take()
    assert final.encoding == ("msgpack" if binary else "json")
    assert subset(
        final.frame,
        type="message",
        role="assistant",
        content="Hello",
        thread_id=thread_id,
        model=CONFIG.default_model,
    ), final.frame
    assert not final.frame.get("tool_calls")
    # Exactly one done chunk in the whole turn; a repeated answer changes nothing.
    peer.saved(save.op_id)
    peer.done(call.stream_id)
    assert peer.take() == []
    dones = [g for g in peer.got if g.type == "chunk" and g.frame.get("done")]
    assert len(dones) == 1
    assert peer.server_close is None and not peer.transport_closed()


def test_given_thread_id_model_and_provider_are_kept() -> None:
    peer = peer_for()
    op, call = open_turn(peer, thread_id="thread-abc", model="gpt-4o-mini", provider="openai")
    assert op.thread_id == "thread-abc"
    assert call.request.model == "gpt-4o-mini"
    assert call.request.provider == "openai"
    save = finish_turn(peer, call.stream_id, TextDelta(text="ok"))
    assert save.thread_id == "thread-abc"
    peer.saved(save.op_id)
    final = peer.take()[-1].frame
    assert subset(final, thread_id="thread-abc", model="gpt-4o-mini", provider="openai")
    assert all(g.frame.get("thread_id") == "thread-abc" for g in peer.got)


@pytest.mark.parametrize("thread_id", [None, "", 42])
def test_missing_or_unusable_thread_id_gets_a_fresh_one(thread_id: Any) -> None:
    peer = peer_for()
    fields = {} if thread_id is None else {"thread_id": thread_id}
    first = start(peer, "one", **fields)
    peer.send_json({"type": "stop"})
    second = start(peer, "two", **fields)
    assert isinstance(first.thread_id, str) and first.thread_id
    assert first.thread_id != second.thread_id


@pytest.mark.parametrize("kind", [None, "message", "chat_message"])
def test_chat_message_frame_types(kind: str | None) -> None:
    peer = peer_for()
    payload: dict[str, Any] = {"role": "user", "content": "hi"}
    if kind is not None:
        payload["type"] = kind
    peer.send_json(payload)
    assert only(peer.of_type(OpenThread)).append[0].content == "hi"


def test_content_parts_become_openai_parts() -> None:
    peer = peer_for()
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image": {"type": "image", "uri": "https://example.org/p.png"}},
    ]
    peer.send_json({"type": "message", "role": "user", "content": content})
    (message,) = only(peer.of_type(OpenThread)).append
    assert message.role == "user"
    assert message.content == [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.org/p.png"}},
    ]


@pytest.mark.parametrize("fields", [{}, {"content": None}, {"content": 5}])
def test_message_without_content_gets_error(fields: dict[str, Any]) -> None:
    peer = peer_for()
    peer.send_json({"type": "message", "role": "user", **fields})
    (got,) = peer.take()
    assert got.type == "error"
    assert not peer.take_effects()


def test_two_turns_on_one_socket() -> None:
    peer = peer_for()
    for text in ("first", "second"):
        _, call = open_turn(peer, text, thread_id="t")
        save = finish_turn(peer, call.stream_id, TextDelta(text=text.upper()))
        peer.saved(save.op_id)
        assert subset(peer.take()[-1].frame, type="message", content=text.upper())


# --- server tools ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_server_tool_round(binary: bool) -> None:
    peer = peer_for()
    op, call = open_turn(peer, "What is 2*7?", binary=binary, tools=["calculator"])
    tid = op.thread_id
    assert call.request.tools == (CALCULATOR,)
    peer.answer(call.stream_id, TextDelta(text="Let me compute. "), CALC_CALL, Finish())
    got = peer.take()
    assert types_of(got) == ["chunk", "message", "tool_call"]
    assert all(g.encoding == ("msgpack" if binary else "json") for g in got)
    assistant = got[1].frame
    assert subset(assistant, role="assistant", thread_id=tid)
    (tc,) = assistant["tool_calls"]
    assert subset(tc, id="call_1", name="calculator", args={"expression": "2*7"})
    assert got[2].frame == {
        "type": "tool_call",
        "tool_call_id": "call_1",
        "name": "calculator",
        "args": {"expression": "2*7"},
        "thread_id": tid,
    }
    run = only(e for e in peer.take_effects() if isinstance(e, RunTool))
    assert (run.name, run.arguments, run.user_id) == ("calculator", {"expression": "2*7"}, "1")
    assert not peer.of_type(SaveMessages)

    peer.tool_done(run.op_id, True, 14)
    got = peer.take()
    assert types_of(got) == ["tool_result", "message"]
    assert subset(
        got[0].frame, tool_call_id="call_1", name="calculator", ok=True, result=14, thread_id=tid
    )
    tool_msg = got[1].frame
    assert subset(tool_msg, role="tool", tool_call_id="call_1", name="calculator", thread_id=tid)
    assert json.loads(tool_msg["content"]) == 14

    second = only(e for e in peer.take_effects() if isinstance(e, CallProvider))
    history = second.request.messages
    assert history[0] == ChatMessage(role="user", content="What is 2*7?")
    assert history[1].role == "assistant"
    assert history[1].tool_calls == (CALC_CALL,)
    assert history[2].role == "tool" and history[2].tool_call_id == "call_1"
    assert json.loads(history[2].text) == 14
    assert len(history) == 3
    assert second.request.tools == (CALCULATOR,)  # round 1 of 10: still offered

    save = finish_turn(peer, second.stream_id, TextDelta(text="It is 14."))
    assert [m.role for m in save.messages] == ["assistant", "tool", "assistant"]
    assert save.messages[-1].content == "Let me compute. It is 14."
    peer.saved(save.op_id)
    got = peer.take()
    assert types_of(got) == ["chunk", "chunk", "message"]
    assert got[1].frame["done"] is True
    assert subset(got[2].frame, role="assistant", content="Let me compute. It is 14.")
    # Every frame of the turn carries its thread_id.
    assert all(g.frame.get("thread_id") == tid for g in peer.got)


def test_failing_server_tool_is_reported_and_told_to_the_model() -> None:
    peer = peer_for()
    op, call = open_turn(peer, tools=["calculator"])
    peer.answer(call.stream_id, CALC_CALL)
    run = only(peer.of_type(RunTool))
    peer.take()
    peer.tool_done(run.op_id, False, None, "boom")
    got = peer.take()
    assert types_of(got) == ["tool_result", "message"]
    result = got[0].frame
    assert subset(result, ok=False, error="boom", tool_call_id="call_1", thread_id=op.thread_id)
    assert "boom" in got[1].frame["content"]
    second = peer.last(CallProvider)
    assert second.stream_id != call.stream_id
    told = second.request.messages[-1]
    assert told.role == "tool" and "boom" in (told.content or "")


def test_two_tool_calls_in_one_round_run_in_order() -> None:
    peer = peer_for()
    _, call = open_turn(peer, tools=["calculator", "current_time"])
    clock_call = ToolCall(id="call_2", name="current_time", arguments="{}")
    peer.answer(call.stream_id, CALC_CALL, clock_call)
    got = peer.take()
    assert types_of(got) == ["message", "tool_call"]
    assert [c["id"] for c in got[0].frame["tool_calls"]] == ["call_1", "call_2"]
    first = only(peer.of_type(RunTool))
    assert first.name == "calculator"
    peer.tool_done(first.op_id, True, 14)
    assert types_of(peer.take()) == ["tool_result", "message", "tool_call"]
    second = peer.last(RunTool)
    assert second.name == "current_time" and second.arguments == {}
    peer.tool_done(second.op_id, True, "2024-01-01T00:00:00Z")
    assert types_of(peer.take()) == ["tool_result", "message"]
    follow = peer.last(CallProvider)
    assert [m.role for m in follow.request.messages] == ["user", "assistant", "tool", "tool"]
    assert [m.tool_call_id for m in follow.request.messages[2:]] == ["call_1", "call_2"]


def test_unknown_tool_in_message_is_an_error_without_effects() -> None:
    peer = peer_for()
    peer.send_json({"type": "message", "content": "hi", "tools": ["calculator", "rm_rf"]})
    (got,) = peer.take()
    assert got.type == "error" and "rm_rf" in got.frame["message"]
    assert peer.take_effects() == []
    # The socket stays usable.
    open_turn(peer, tools=["calculator"])


@pytest.mark.parametrize("enabled", [[], ["current_time"]])
def test_model_calling_a_tool_not_offered_gets_not_found(enabled: list[str]) -> None:
    peer = peer_for()
    _, call = open_turn(peer, tools=enabled)
    peer.answer(call.stream_id, CALC_CALL)  # calculator exists on the server but was not enabled
    assert not peer.of_type(RunTool)
    got = peer.take()
    assert types_of(got) == ["message", "tool_call", "tool_result", "message"]
    result = got[2].frame
    assert result["ok"] is False and "not found" in result["error"]
    assert peer.last(CallProvider).stream_id != call.stream_id  # the turn goes on


def test_tool_arguments_that_are_not_an_object() -> None:
    peer = peer_for()
    _, call = open_turn(peer, tools=["calculator"])
    peer.answer(call.stream_id, ToolCall(id="c", name="calculator", arguments="not json"))
    run = only(peer.of_type(RunTool))
    assert run.arguments == {}
    tool_call = [g.frame for g in peer.take() if g.type == "tool_call"]
    assert tool_call[0]["args"] == {}


def test_tool_rounds_are_capped() -> None:
    config = EngineConfig(ws_ping_interval=1e6, server_tools=(CALCULATOR,), max_tool_rounds=2)
    peer = peer_for(config)
    _, call = open_turn(peer, tools=["calculator"])
    offered = []
    for n in range(2):
        offered.append(call.request.tools)
        peer.answer(call.stream_id, ToolCall(id=f"c{n}", name="calculator", arguments="{}"))
        peer.tool_done(peer.last(RunTool).op_id, True, n)
        call = peer.last(CallProvider)
    assert offered == [(CALCULATOR,), (CALCULATOR,)]
    assert call.request.tools == ()  # the third call offers no tools
    assert len(peer.of_type(CallProvider)) == 3
    save = finish_turn(peer, call.stream_id, TextDelta(text="done"))
    peer.saved(save.op_id)
    assert peer.take()[-1].frame["content"] == "done"


# --- client tools ---------------------------------------------------------------------------


def client_tool_turn(peer: WsPeer) -> tuple[OpenThread, CallProvider]:
    peer.send_json({"type": "client_tools_manifest", "tools": [SELECTION_TOOL]})
    assert peer.take() == []  # the manifest has no reply
    op, call = open_turn(peer)
    (spec,) = call.request.tools
    assert (spec.name, spec.parameters) == ("get_selection", SELECTION_TOOL["parameters"])
    peer.answer(call.stream_id, ToolCall(id="call_ui", name="get_selection", arguments="{}"))
    got = peer.take()
    assert types_of(got) == ["message", "tool_call"]
    assert got[1].frame == {
        "type": "tool_call",
        "tool_call_id": "call_ui",
        "name": "get_selection",
        "args": {},
        "thread_id": op.thread_id,
    }
    assert not peer.of_type(RunTool)
    return op, call


def test_client_tool_result_continues_the_turn() -> None:
    peer = peer_for()
    op, _ = client_tool_turn(peer)
    peer.take_effects()
    peer.send_json({"type": "tool_result", "tool_call_id": "wrong", "ok": True, "result": 1})
    assert peer.take() == [] and peer.take_effects() == []
    peer.send_json(
        {"type": "tool_result", "tool_call_id": "call_ui", "ok": True, "result": {"node": "n7"}}
    )
    got = peer.take()
    assert types_of(got) == ["tool_result", "message"]
    assert subset(got[0].frame, ok=True, result={"node": "n7"}, thread_id=op.thread_id)
    follow = only(e for e in peer.take_effects() if isinstance(e, CallProvider))
    assert json.loads(follow.request.messages[-1].text) == {"node": "n7"}
    # A repeated result for the same call is ignored.
    peer.send_json({"type": "tool_result", "tool_call_id": "call_ui", "ok": True, "result": 2})
    assert peer.take() == [] and peer.take_effects() == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"ok": False, "error": "denied"}, "denied"),
        ({"result": {"x": 1}}, "Frontend tool execution failed"),  # ok is required
        ({"ok": "true", "result": 1}, "Frontend tool execution failed"),
    ],
)
def test_client_tool_failure_is_told_to_the_model(reply: dict[str, Any], expected: str) -> None:
    peer = peer_for()
    client_tool_turn(peer)
    peer.send_json({"type": "tool_result", "tool_call_id": "call_ui", **reply})
    result = peer.take()[0].frame
    assert result["ok"] is False and result["error"] == expected
    assert expected in (peer.last(CallProvider).request.messages[-1].content or "")


def test_client_tool_timeout() -> None:
    config = EngineConfig(ws_ping_interval=1e6, client_tool_timeout=60.0)
    peer = peer_for(config)
    peer.now = T0 + 5
    client_tool_turn(peer)
    assert peer.deadline() == T0 + 65
    peer.timer(T0 + 64.9)
    assert peer.take() == []
    peer.timer(T0 + 65)
    got = peer.take()
    assert types_of(got) == ["tool_result", "message"]
    result = got[0].frame
    assert result["ok"] is False and "timed out" in result["error"]
    assert "get_selection" in result["error"]
    follow = peer.last(CallProvider)
    assert "timed out" in (follow.request.messages[-1].content or "")
    # A result arriving after the timeout is ignored.
    peer.send_json({"type": "tool_result", "tool_call_id": "call_ui", "ok": True, "result": 1})
    assert peer.take() == []


@pytest.mark.parametrize("tools", [None, "calc", {"name": "x"}])
def test_manifest_without_a_tools_list_is_an_error(tools: Any) -> None:
    peer = peer_for()
    payload: dict[str, Any] = {"type": "client_tools_manifest"}
    if tools is not None:
        payload["tools"] = tools
    peer.send_json(payload)
    (got,) = peer.take()
    assert got.type == "error"
    _, call = open_turn(peer)
    assert call.request.tools == ()


# --- stop, supersession and control frames -----------------------------------------------


def test_stop_while_generating() -> None:
    peer = peer_for()
    op, call = open_turn(peer)
    peer.chunk(call.stream_id, TextDelta(text="par"))
    peer.take()
    peer.send_json({"type": "stop"})
    (stopped,) = peer.take()
    assert subset(
        stopped.frame,
        type="generation_stopped",
        message="Generation stopped by user",
        thread_id=op.thread_id,
    )
    assert [e.stream_id for e in peer.of_type(CancelProvider)] == [call.stream_id]
    peer.chunk(call.stream_id, TextDelta(text="tial"))
    peer.done(call.stream_id)
    peer.failed(call.stream_id, ProviderError("late"))
    assert peer.take() == []
    assert not peer.of_type(SaveMessages)
    # The socket serves the next turn.
    _, call2 = open_turn(peer, "again")
    save = finish_turn(peer, call2.stream_id, TextDelta(text="fine"))
    peer.saved(save.op_id)
    assert [g.type for g in peer.got].count("generation_stopped") == 1


def test_stop_with_no_turn() -> None:
    peer = peer_for()
    peer.send_json({"type": "stop"})
    (stopped,) = peer.take()
    assert subset(stopped.frame, type="generation_stopped", message="Generation stopped by user")
    assert peer.take_effects() == []


def test_stop_while_opening_the_thread() -> None:
    peer = peer_for()
    op = start(peer)
    peer.send_msgpack({"type": "stop"})
    (stopped,) = peer.take()
    assert stopped.encoding == "msgpack"
    assert subset(stopped.frame, type="generation_stopped", thread_id=op.thread_id)
    peer.opened(op.op_id, list(op.append))  # the store answers late: no model call
    assert not peer.of_type(CallProvider)
    assert peer.take() == []


def test_stop_while_a_server_tool_runs_cancels_it() -> None:
    peer = peer_for()
    _, call = open_turn(peer, tools=["calculator"])
    peer.answer(call.stream_id, CALC_CALL)
    run = only(peer.of_type(RunTool))
    peer.take()
    peer.send_json({"type": "stop"})
    assert types_of(peer.take()) == ["generation_stopped"]
    assert [e.op_id for e in peer.of_type(CancelTool)] == [run.op_id]
    peer.tool_done(run.op_id, True, 14)
    assert peer.take() == []
    assert len(peer.of_type(CallProvider)) == 1


def test_stop_while_waiting_for_a_client_tool() -> None:
    peer = peer_for()
    client_tool_turn(peer)
    peer.send_json({"type": "stop"})
    assert types_of(peer.take()) == ["generation_stopped"]
    peer.send_json({"type": "tool_result", "tool_call_id": "call_ui", "ok": True, "result": 1})
    assert peer.take() == []
    assert len(peer.of_type(CallProvider)) == 1
    assert peer.deadline() == T0 + 1e6  # only the keep-alive timer is left


def test_new_message_mid_turn_supersedes_it() -> None:
    peer = peer_for()
    old, call = open_turn(peer, "first", thread_id="t-old")
    peer.chunk(call.stream_id, TextDelta(text="a"))
    peer.take()
    peer.send_json({"type": "message", "content": "second", "thread_id": "t-new"})
    (stopped,) = peer.take()
    assert subset(stopped.frame, type="generation_stopped", thread_id="t-old")
    assert [e.stream_id for e in peer.of_type(CancelProvider)] == [call.stream_id]
    new = peer.last(OpenThread)
    assert new.op_id != old.op_id
    assert (new.thread_id, new.append[0].content) == ("t-new", "second")
    peer.chunk(call.stream_id, TextDelta(text="stale"))
    peer.done(call.stream_id)
    assert peer.take() == []
    peer.opened(new.op_id, list(new.append))
    new_call = peer.last(CallProvider)
    save = finish_turn(peer, new_call.stream_id, TextDelta(text="B"))
    peer.saved(save.op_id)
    assert all(g.frame.get("thread_id") == "t-new" for g in peer.take())


@pytest.mark.parametrize("now", [T0, T0 + 12.5])
def test_ping_gets_pong_with_now(now: float) -> None:
    peer = peer_for()
    peer.now = now
    peer.send_json({"type": "ping", "ts": 1})
    assert peer.take_frames() == [{"type": "pong", "ts": now}]
    assert peer.take_effects() == []


def test_client_pong_is_ignored_and_starts_no_turn() -> None:
    peer = peer_for()
    peer.send_json({"type": "pong", "ts": 1.0})
    assert peer.take() == [] and peer.take_effects() == []
    # Nor does it disturb a running turn (nodetool-spec §3.3's bogus-turn bug).
    _, call = open_turn(peer)
    peer.send_json({"type": "pong"})
    assert peer.take() == [] and peer.take_effects() == []
    peer.chunk(call.stream_id, TextDelta(text="still here"))
    assert peer.take_frames()[0]["content"] == "still here"


def test_unknown_frame_type_mid_turn_is_an_error_and_the_turn_goes_on() -> None:
    peer = peer_for()
    _, call = open_turn(peer)
    peer.send_json({"type": "subscribe", "content": "x"})
    (got,) = peer.take()
    assert got.type == "error" and isinstance(got.frame["message"], str)
    assert peer.take_effects() == []
    peer.chunk(call.stream_id, TextDelta(text="x"))
    assert types_of(peer.take()) == ["chunk"]


@pytest.mark.parametrize("field", ["thread_id", "model", "provider", "content"])
def test_lone_surrogate_from_json_then_msgpack_never_raises(field: str) -> None:
    # JSON can carry a lone surrogate ("\\ud800"), MessagePack (UTF-8) cannot. Strings from
    # a JSON frame (thread id, model, provider) are echoed in later frames, which use the
    # encoding of the client's most recent frame. Either policy is fine: refuse the frame
    # with an error frame, or accept it and keep every later frame encodable. Nothing may
    # raise out of the engine (DESIGN.md; reliability §2.7 "lone surrogate").
    peer = peer_for()
    message = {"type": "message", "content": "hi", field: "x\ud800"}
    peer.send_text(json.dumps(message, ensure_ascii=True))
    opened = peer.of_type(OpenThread)
    if not opened:
        assert types_of(peer.take()) == ["error"]
        return
    op = only(opened)
    peer.opened(op.op_id, list(op.append))
    call = only(peer.of_type(CallProvider))
    peer.send_msgpack({"type": "ping"})
    peer.chunk(call.stream_id, TextDelta(text="ok"))
    save = finish_turn(peer, call.stream_id)
    peer.saved(save.op_id)
    assert [g.encoding for g in peer.got] == ["msgpack"] * len(peer.got)
    assert types_of(peer.got) == ["pong", "chunk", "chunk", "message"]


# --- failures -------------------------------------------------------------------------------


def test_provider_failure_mid_turn() -> None:
    peer = peer_for()
    op, call = open_turn(peer)
    peer.chunk(call.stream_id, TextDelta(text="half"))
    peer.take()
    peer.failed(call.stream_id, ProviderError("upstream exploded", status=502))
    (error,) = peer.take()
    assert subset(error.frame, type="error", message="upstream exploded", thread_id=op.thread_id)
    assert not peer.of_type(SaveMessages)
    # No done chunk, no final message; the socket serves the next turn.
    peer.done(call.stream_id)
    assert peer.take() == []
    _, call2 = open_turn(peer, "retry")
    save = finish_turn(peer, call2.stream_id, TextDelta(text="ok"))
    peer.saved(save.op_id)
    assert peer.take()[-1].frame["content"] == "ok"


def test_store_failure_on_open() -> None:
    peer = peer_for()
    op = start(peer, thread_id="someone-elses")
    peer.store_failed(op.op_id, "Thread someone-elses not found")
    (error,) = peer.take()
    assert error.type == "error" and "not found" in error.frame["message"]
    assert error.frame.get("thread_id") == "someone-elses"
    assert not peer.of_type(CallProvider)
    peer.opened(op.op_id, [])  # a late answer changes nothing
    assert not peer.of_type(CallProvider)
    open_turn(peer)  # the socket stays usable


def test_store_failure_on_save() -> None:
    peer = peer_for()
    _, call = open_turn(peer)
    save = finish_turn(peer, call.stream_id, TextDelta(text="x"))
    peer.take()
    peer.store_failed(save.op_id, "disk full")
    (error,) = peer.take()
    assert subset(error.frame, type="error", message="disk full")
    peer.saved(save.op_id)
    assert peer.take() == []
    open_turn(peer)


def test_provider_first_item_timeout() -> None:
    config = EngineConfig(ws_ping_interval=1e6, provider_first_item_timeout=30.0)
    peer = peer_for(config)
    op, call = open_turn(peer)
    assert peer.deadline() == T0 + 30
    peer.timer(T0 + 29.9)
    assert peer.take() == [] and not peer.of_type(CancelProvider)
    peer.timer(T0 + 30)
    assert [e.stream_id for e in peer.of_type(CancelProvider)] == [call.stream_id]
    (error,) = peer.take()
    assert subset(error.frame, type="error", thread_id=op.thread_id)
    peer.chunk(call.stream_id, TextDelta(text="late"))
    assert peer.take() == []
    assert peer.server_close is None
    open_turn(peer)


def test_provider_idle_timeout_between_items() -> None:
    config = EngineConfig(
        ws_ping_interval=1e6, provider_first_item_timeout=30.0, provider_idle_timeout=10.0
    )
    peer = peer_for(config)
    _, call = open_turn(peer)
    peer.chunk(call.stream_id, TextDelta(text="a"), now=T0 + 20)
    assert peer.deadline() == T0 + 30
    peer.chunk(call.stream_id, TextDelta(text="b"), now=T0 + 29)
    assert peer.deadline() == T0 + 39
    peer.timer(T0 + 39)
    assert [e.stream_id for e in peer.of_type(CancelProvider)] == [call.stream_id]
    assert peer.take()[-1].type == "error"


# --- the socket going away and shutdown -------------------------------------------------


def test_eof_while_a_server_tool_runs_cancels_it() -> None:
    peer = peer_for()
    _, call = open_turn(peer, tools=["calculator"])
    peer.answer(call.stream_id, CALC_CALL)
    run = only(peer.of_type(RunTool))
    peer.eof()
    assert peer.transport_closed()
    assert [e.op_id for e in peer.of_type(CancelTool)] == [run.op_id]
    peer.tool_done(run.op_id, True, 1)
    assert len(peer.of_type(CallProvider)) == 1


def test_shutdown_closes_an_idle_socket_1001() -> None:
    peer = peer_for()
    peer.shutdown()
    assert peer.close_code() == 1001
    assert not peer.transport_closed()
    peer.answer_close()
    assert peer.transport_closed()


def test_shutdown_idle_socket_drops_after_close_timeout() -> None:
    config = EngineConfig(ws_ping_interval=1e6, ws_close_timeout=4.0, shutdown_grace=30.0)
    peer = peer_for(config)
    peer.shutdown()
    assert peer.close_code() == 1001
    assert peer.deadline() == T0 + 4.0
    peer.timer(T0 + 4.0)
    assert peer.transport_closed()


def test_shutdown_starts_no_new_turn() -> None:
    # After our 1001 the client may still send a message before reading the Close: it must
    # not start work on a server that is going away.
    peer = peer_for()
    peer.shutdown()
    assert peer.close_code() == 1001
    peer.feed(frame(OP_TEXT, b'{"type":"message","content":"late"}'))
    assert not peer.of_type(OpenThread)
    assert peer.got == []


def test_shutdown_lets_a_busy_turn_finish_then_closes_1001() -> None:
    config = EngineConfig(ws_ping_interval=1e6, shutdown_grace=30.0)
    peer = peer_for(config)
    _, call = open_turn(peer)
    peer.shutdown(now=T0 + 1)
    assert peer.server_close is None
    peer.chunk(call.stream_id, TextDelta(text="fin"), now=T0 + 2)
    save = finish_turn(peer, call.stream_id)
    assert peer.server_close is None
    peer.saved(save.op_id)
    got = peer.take()
    assert types_of(got) == ["chunk", "chunk", "message"]
    assert got[-1].frame["content"] == "fin"
    assert peer.close_code() == 1001
    assert not peer.of_type(CancelProvider)
    peer.answer_close()
    assert peer.transport_closed()


def test_shutdown_grace_deadline_cancels_and_closes_1001() -> None:
    config = EngineConfig(ws_ping_interval=1e6, shutdown_grace=30.0)
    peer = peer_for(config)
    op, call = open_turn(peer)
    peer.shutdown(now=T0 + 1)
    assert peer.deadline() == T0 + 31
    peer.chunk(call.stream_id, TextDelta(text="slow"), now=T0 + 10)
    peer.take_frames()
    peer.timer(T0 + 31)
    assert peer.close_code() == 1001
    # The cut turn is told apart from a finished one: an error frame comes before the Close.
    (cut,) = peer.take_frames()
    assert subset(cut, type="error", error_type="server_shutdown", thread_id=op.thread_id)
    assert [e.stream_id for e in peer.of_type(CancelProvider)] == [call.stream_id]
    assert peer.transport_closed()
    assert peer.deadline() is None
    peer.done(call.stream_id)  # late: nothing more is written


def test_a_workflow_turn_is_the_keys_generation_and_its_job_is_not_charged_again() -> None:
    """A /chat turn with a workflow_id is admitted like any turn; the job it starts runs
    inside it, so StartJob carries no key (its model calls would otherwise count twice, and
    a key allowed one stream at a time could never run a workflow from /chat)."""
    from wirechat.engine import AuthMode, StaticKey
    from wirechat.engine.chat import WorkflowSpec
    from wirechat.engine.events import StartJob
    from wirechat.engine.limits import KeyLimits

    key = StaticKey.from_token("sk-one", name="one", limits=KeyLimits(concurrent_streams=1))
    config = EngineConfig(
        ws_ping_interval=1e6,
        auth_mode=AuthMode.STATIC,
        static_keys=(key,),
        workflows=(WorkflowSpec(id="wf", name="W", description="", inputs=()),),
    )
    peer = WsPeer(config).open("/chat", [("Authorization", "Bearer sk-one")])
    peer.take_effects()
    peer.send_json({"type": "message", "content": "go", "workflow_id": "wf", "thread_id": "t"})
    opening = only(e for e in peer.take_effects() if isinstance(e, OpenThread))
    assert peer.admission.inflight == 1  # the turn holds the key's one stream
    peer.opened(opening.op_id, [ChatMessage(role="user", content="go")])
    start = only(e for e in peer.take_effects() if isinstance(e, StartJob))
    assert start.workflow_id == "wf" and start.user_id == "one" and start.key is None
