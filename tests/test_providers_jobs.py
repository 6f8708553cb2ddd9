"""The job runner: lifecycle events, snapshots, cancellation, isolation, retention, limits.

Jobs run the example workflows and small test workflows with the deterministic ``echo``
model (``/slow MS text`` makes a call take time, ``/error STATUS`` makes it fail).
Coroutines are driven with ``asyncio.run`` so the tests need no pytest plugin.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from wirechat.engine.config import StaticKey
from wirechat.engine.limits import Admission, KeyLimits, Ticket
from wirechat.providers import ToolError, default_router
from wirechat.providers.jobs import MAX_WORKFLOW_DEPTH, JobManager
from wirechat.providers.tools import ToolRegistry, default_tools
from wirechat.providers.workflows import (
    JobLimits,
    WorkflowContext,
    WorkflowRegistry,
    graph_workflow,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
Event = dict[str, Any]


async def boom(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
    """Fails after one progress event."""
    ctx.progress(1, 2)
    raise RuntimeError("it broke")


async def custom(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
    """Sends its own events: a log line goes out, a job_update is the runner's alone."""
    ctx.emit({"type": "log_update", "node_id": "x", "content": "hello", "severity": "info"})
    ctx.emit({"type": "job_update", "status": "completed"})


async def sleeper(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Sleeps ``seconds`` (default 0.2) inside one node."""
    with ctx.node("sleep", "Sleep", "sleep"):
        await asyncio.sleep(float(inputs.get("seconds", 0.2)))
    return {"slept": True}


def slow_chat_graph() -> dict[str, Any]:
    return {
        "id": "slow_chat",
        "nodes": [
            {"id": "in", "type": "input.string", "data": {"name": "message"}},
            {"id": "model", "type": "chat", "data": {"title": "Model"}},
            {"id": "out", "type": "output", "data": {"name": "reply"}},
        ],
        "edges": [
            {"source": "in", "target": "model", "targetHandle": "prompt"},
            {"source": "model", "target": "out", "targetHandle": "value"},
        ],
    }


def registry() -> WorkflowRegistry:
    workflows = WorkflowRegistry([boom, custom, sleeper, graph_workflow(slow_chat_graph())])
    workflows.load(f"{EXAMPLES}/workflows.py:WORKFLOWS")
    workflows.load(str(EXAMPLES / "echo_graph.json"))
    return workflows


def drive(test: Callable[[JobManager], Awaitable[None]], **options: Any) -> None:
    """Run ``test`` with a fresh manager on a fresh loop, closing the manager after."""

    async def main() -> None:
        manager = JobManager(registry(), default_router(), default_tools(), **options)
        try:
            await test(manager)
        finally:
            await manager.aclose()

    asyncio.run(main())


def follow(manager: JobManager, job_id: str, user: str = "1") -> list[Event]:
    events: list[Event] = []
    assert manager.subscribe(job_id, user, events.append) is not None
    return events


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- lifecycle -----------------------------------------------------------------------------


def test_python_job_lifecycle_events_in_order() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("j1", "summarize", {"message": "hello world"}, "1")
        events = follow(manager, "j1")
        assert manager.status("j1", "1") == {
            "status": "starting",
            "job_id": "j1",
            "workflow_id": "summarize",
        }
        final = await manager.wait("j1")
        tags = {"job_id": "j1", "workflow_id": "summarize"}
        assert events[:4] == [
            {"type": "job_update", "status": "running"} | tags,
            {"type": "node_progress", "node_id": "summarize", "progress": 1, "total": 2}
            | {"chunk": ""}
            | tags,
            {"type": "node_progress", "node_id": "summarize", "progress": 2, "total": 2}
            | {"chunk": ""}
            | tags,
            {
                "type": "output_update",
                "node_id": "summarize",
                "node_name": "summary",
                "output_name": "summary",
                "value": "hello world",
                "output_type": "str",
                "metadata": {},
            }
            | tags,
        ]
        assert events[4] is final and len(events) == 5
        assert final["status"] == "completed"
        assert final["result"] == {"summary": ["hello world"]}
        assert re.fullmatch(r"Workflow j1 completed in \d+\.\d\d seconds", final["message"])
        assert manager.status("j1", "1") == {
            "status": "completed",
            "job_id": "j1",
            "workflow_id": "summarize",
            "result": {"summary": ["hello world"]},
        }
        assert manager.jobs("1") == [
            {"job_id": "j1", "workflow_id": "summarize", "status": "completed"}
        ]

    drive(test)


def test_graph_job_result_and_snapshots() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("g1", "slow_chat", {"message": "/slow 200 slow reply"}, "1")
        events = follow(manager, "g1")
        await until(lambda: any(e.get("node_id") == "model" for e in events))
        assert manager.status("g1", "1")["status"] == "running"  # type: ignore[index]
        snapshot = manager.snapshot("g1", "1")
        assert snapshot is not None
        assert [(e["type"], e.get("node_id"), e["status"]) for e in snapshot] == [
            ("job_update", None, "running"),
            ("node_update", "in", "completed"),
            ("node_update", "model", "running"),
        ]
        assert all(e["job_id"] == "g1" and e["workflow_id"] == "slow_chat" for e in snapshot)
        final = await manager.wait("g1")
        assert final["result"] == {"reply": ["slow reply"]}
        done = manager.snapshot("g1", "1")
        assert done is not None
        assert [(e["type"], e.get("node_id"), e["status"]) for e in done] == [
            ("node_update", "in", "completed"),
            ("node_update", "model", "completed"),
            ("node_update", "out", "completed"),
            ("job_update", None, "completed"),
        ]
        assert done[-1] == final
        # A subscription to a finished job is valid and silent.
        unsubscribe = manager.subscribe("g1", "1", lambda event: pytest.fail("no events"))
        assert unsubscribe is not None
        unsubscribe()

    drive(test)


def test_example_graph_job() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("e", "echo_graph", {"message": "hi", "messages": []}, "1")
        final = await manager.wait("e")
        assert final["result"] == {"reply": ["You said: hi"]}

    drive(test)


def test_failing_node_gives_node_error_then_job_error_then_failed() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("f", "slow_chat", {"message": "/error 503"}, "1")
        events = follow(manager, "f")
        final = await manager.wait("f")
        tail = [(e["type"], e.get("node_id"), e["status"]) for e in events[-3:]]
        assert tail == [
            ("node_update", "model", "error"),
            ("job_update", None, "error"),
            ("job_update", None, "failed"),
        ]
        assert events[-3]["error"] == "Injected upstream error 503"
        assert events[-2]["error"] == "Injected upstream error 503"
        assert final is events[-1]
        assert final["error"] == "ProviderError: Injected upstream error 503"
        assert manager.status("f", "1") == {
            "status": "failed",
            "job_id": "f",
            "workflow_id": "slow_chat",
            "error": "ProviderError: Injected upstream error 503",
        }
        assert not any(e["type"] == "output_update" for e in events)

    drive(test)


def test_failing_python_workflow() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("b", "boom", {}, "1")
        events = follow(manager, "b")
        final = await manager.wait("b")
        assert [(e["type"], e.get("status")) for e in events] == [
            ("job_update", "running"),
            ("node_progress", None),
            ("job_update", "error"),
            ("job_update", "failed"),
        ]
        assert events[2]["error"] == "it broke"
        assert final["error"] == "RuntimeError: it broke"

    drive(test)


def test_workflow_events_pass_but_job_updates_are_the_runners() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("c", "custom", {}, "1")
        events = follow(manager, "c")
        final = await manager.wait("c")
        assert [(e["type"], e.get("status")) for e in events] == [
            ("job_update", "running"),
            ("log_update", None),
            ("job_update", "completed"),
        ]
        assert events[1]["job_id"] == "c" and events[1]["content"] == "hello"
        assert final["result"] == {}

    drive(test)


# --- cancellation --------------------------------------------------------------------------


def test_cancel_reaches_the_running_node() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("c", "slow_chat", {"message": "/slow 5000 never"}, "1")
        events = follow(manager, "c")
        await until(lambda: any(e.get("node_id") == "model" for e in events))
        started = time.monotonic()
        assert manager.cancel("c", "1") is True
        final = await manager.wait("c")
        assert time.monotonic() - started < 1.0  # the 5 s model call did not run out
        assert final == {"type": "job_update", "status": "cancelled"} | {
            "job_id": "c",
            "workflow_id": "slow_chat",
        }
        assert events[-1] is final
        model = [e["status"] for e in events if e.get("node_id") == "model"]
        assert model == ["running"]  # neither completed nor failed: cancelled
        assert not any(e.get("node_id") == "out" for e in events)
        assert manager.cancel("c", "1") is False  # already finished
        assert manager.status("c", "1")["status"] == "cancelled"  # type: ignore[index]

    drive(test)


def test_cancel_a_python_workflow_sets_the_flag_and_cancels_the_await() -> None:
    seen: list[bool] = []

    async def watcher(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(ctx.cancelled)
            raise

    async def test(manager: JobManager) -> None:
        manager._workflows.add(watcher)
        manager.start("w", "watcher", {}, "1")
        await asyncio.sleep(0.02)
        assert manager.cancel("w", "1")
        assert (await manager.wait("w"))["status"] == "cancelled"
        assert seen == [True]

    drive(test)


def test_cancel_before_the_job_ran_at_all() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("early", "summarize", {"message": "x"}, "1")
        events = follow(manager, "early")
        assert manager.cancel("early", "1")
        final = await manager.wait("early")
        assert final["status"] == "cancelled"
        assert events == [final]

    drive(test)


# --- users, retention, limits --------------------------------------------------------------


def test_other_users_cannot_see_or_touch_a_job() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("mine", "collect", {}, "alice")
        assert manager.subscribe("mine", "bob", lambda e: None) is None
        assert manager.snapshot("mine", "bob") is None
        assert manager.status("mine", "bob") is None
        assert manager.cancel("mine", "bob") is False
        assert manager.jobs("bob") == []
        assert manager.stream_input("mine", "bob", "text", "x") == "No active job/context"
        assert manager.end_input_stream("mine", "bob", "text") == "No active job/context"
        assert manager.jobs("alice") == [
            {"job_id": "mine", "workflow_id": "collect", "status": "starting"}
        ]
        # Unknown jobs answer the same way.
        assert manager.subscribe("nope", "alice", lambda e: None) is None
        assert manager.status("nope", "alice") is None
        assert manager.cancel("nope", "alice") is False
        assert manager.end_input_stream("mine", "alice", "text") == {"workflow_id": "collect"}
        assert (await manager.wait("mine"))["status"] == "completed"

    drive(test)


def test_finished_jobs_are_forgotten_after_retention() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("r", "summarize", {"message": "x"}, "1")
        await manager.wait("r")
        assert manager.status("r", "1") is not None
        await asyncio.sleep(0.15)
        assert manager.status("r", "1") is None
        assert manager.snapshot("r", "1") is None
        assert manager.jobs("1") == []
        with pytest.raises(KeyError):
            await manager.wait("r")

    drive(test, retention=0.05)


def test_max_concurrent_queues_jobs_as_starting() -> None:
    async def test(manager: JobManager) -> None:
        started = time.monotonic()
        manager.start("a", "sleeper", {"seconds": 0.15}, "1")
        manager.start("b", "sleeper", {"seconds": 0.15}, "1")
        events_b = follow(manager, "b")
        await until(lambda: manager.status("a", "1")["status"] == "running")  # type: ignore[index]
        await asyncio.sleep(0.05)
        assert manager.status("b", "1")["status"] == "starting"  # type: ignore[index]
        assert manager.snapshot("b", "1") == [
            {"type": "job_update", "status": "starting", "job_id": "b", "workflow_id": "sleeper"}
        ]
        assert events_b == []  # no event while it waits for a slot
        await manager.wait("b")
        assert time.monotonic() - started >= 0.29  # one after the other
        assert events_b[0]["status"] == "running"
        assert (await manager.wait("a"))["result"] == {"slept": True}

    drive(test, max_concurrent=1)


def test_cancel_a_queued_job() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("a", "sleeper", {"seconds": 0.3}, "1")
        manager.start("b", "sleeper", {}, "1")
        events_b = follow(manager, "b")
        await asyncio.sleep(0.05)
        assert manager.cancel("b", "1")
        assert (await manager.wait("b"))["status"] == "cancelled"
        assert [e["status"] for e in events_b] == ["cancelled"]  # it never ran
        assert manager.status("a", "1")["status"] == "running"  # type: ignore[index]

    drive(test, max_concurrent=1)


def test_concurrent_jobs_run_in_parallel_up_to_the_cap() -> None:
    async def test(manager: JobManager) -> None:
        started = time.monotonic()
        for index in range(4):
            manager.start(f"p{index}", "sleeper", {"seconds": 0.2}, "1")
        for index in range(4):
            await manager.wait(f"p{index}")
        assert time.monotonic() - started < 0.35

    drive(test)


# --- streamed inputs -----------------------------------------------------------------------


def test_stream_input_and_end_input_stream() -> None:
    async def test(manager: JobManager) -> None:
        manager.start("s", "collect", {}, "1")
        # Accepted before the job even runs: nothing is lost to the race.
        ok = {"workflow_id": "collect"}
        assert manager.stream_input("s", "1", "text", "one ") == ok
        await asyncio.sleep(0.02)
        assert manager.stream_input("s", "1", "text", "two ") == ok
        assert manager.stream_input("s", "1", "nope", "x") == "Invalid input name"
        assert manager.status("s", "1")["status"] == "running"  # type: ignore[index]
        assert manager.stream_input("s", "1", "text", "three") == ok
        assert manager.end_input_stream("s", "1", "text") == ok
        assert manager.stream_input("s", "1", "text", "more") == "Input stream already ended"
        final = await manager.wait("s")
        assert final["result"] == {"text": ["one two three"], "words": 3}
        assert manager.stream_input("s", "1", "text", "x") == "No active job/context"
        assert manager.end_input_stream("s", "1", "text") == "No active job/context"
        assert manager.stream_input("unknown", "1", "text", "x") == "No active job/context"

    drive(test)


# --- subscribers ---------------------------------------------------------------------------


def test_subscribers_run_on_the_loop_thread_and_can_unsubscribe() -> None:
    async def test(manager: JobManager) -> None:
        loop_thread = threading.get_ident()
        threads: set[int] = set()
        first: list[Event] = []
        second: list[Event] = []

        def failing(event: Event) -> None:
            threads.add(threading.get_ident())
            raise RuntimeError("a broken subscriber")

        manager.start("u", "summarize", {"message": "x"}, "1")
        assert manager.subscribe("u", "1", failing) is not None
        unsubscribe = manager.subscribe("u", "1", first.append)
        assert unsubscribe is not None
        follow_second = manager.subscribe("u", "1", second.append)
        assert follow_second is not None

        def stop_after_running(event: Event) -> None:
            if event.get("status") == "running":
                unsubscribe()  # drops `first` before it sees the next event

        manager.subscribe("u", "1", stop_after_running)
        final = await manager.wait("u")
        assert threads == {loop_thread}
        assert [e["type"] for e in first] == ["job_update"]
        assert second[-1] is final and len(second) == 5  # the failing one broke nothing

    drive(test)


# --- errors of the API itself --------------------------------------------------------------


def test_start_errors() -> None:
    async def test(manager: JobManager) -> None:
        with pytest.raises(KeyError):
            manager.start("x", "no_such_workflow", {}, "1")
        manager.start("x", "summarize", {"message": "m"}, "1")
        with pytest.raises(ValueError, match="already in use"):
            manager.start("x", "summarize", {}, "1")
        with pytest.raises(KeyError):
            await manager.wait("never-started")
        await manager.wait("x")

    drive(test)
    with pytest.raises(ValueError):
        JobManager(WorkflowRegistry(), default_router(), default_tools(), max_concurrent=0)


def test_aclose_cancels_running_jobs_and_refuses_new_ones() -> None:
    async def main() -> None:
        manager = JobManager(registry(), default_router(), default_tools())
        manager.start("long", "slow_chat", {"message": "/slow 5000 x"}, "1")
        events = follow(manager, "long")
        await until(lambda: any(e.get("node_id") == "model" for e in events))
        started = time.monotonic()
        await manager.aclose()
        assert time.monotonic() - started < 1.0
        assert events[-1]["status"] == "cancelled"
        with pytest.raises(RuntimeError, match="closed"):
            manager.start("late", "summarize", {}, "1")

    asyncio.run(main())


# --- workflows as tools --------------------------------------------------------------------


def test_workflow_tools_run_workflows_to_the_end() -> None:
    async def test(manager: JobManager) -> None:
        tools = {tool.name: tool for tool in manager.workflow_tools()}
        assert set(tools) == {
            "workflow_boom",
            "workflow_custom",
            "workflow_sleeper",
            "workflow_slow_chat",
            "workflow_summarize",
            "workflow_collect",
            "workflow_echo_graph",
        }
        summarize = tools["workflow_summarize"]
        assert summarize.description.startswith("Summarize a message")
        assert summarize.parameters == {
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
        }
        registry = ToolRegistry(tools.values())
        assert await registry.run("workflow_summarize", {"message": "tool call"}) == {
            "summary": ["tool call"]
        }
        assert await registry.run("workflow_echo_graph", {"message": "x"}) == {
            "reply": ["You said: x"]
        }
        with pytest.raises(ToolError):
            await registry.run("workflow_summarize", {"message": 5})  # inputs are strings
        with pytest.raises(RuntimeError, match="it broke"):
            await registry.run("workflow_boom", {})
        assert manager.jobs("1") == []  # tool runs are no jobs

    drive(test)


def test_workflow_tools_nested_and_bounded() -> None:
    async def outer(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"inner": await ctx.tool("workflow_summarize", {"message": "nested"})}

    async def forever(ctx: WorkflowContext, inputs: dict[str, Any]) -> Any:
        return await ctx.tool("workflow_forever", {})

    async def main() -> None:
        workflows = registry()
        workflows.add(outer)
        workflows.add(forever)
        tools = default_tools()
        manager = JobManager(workflows, default_router(), tools)
        for tool in manager.workflow_tools():
            tools.add(tool)
        try:
            manager.start("n", "outer", {}, "1")
            final = await manager.wait("n")
            assert final["result"] == {"inner": {"summary": ["nested"]}}
            manager.start("deep", "forever", {}, "1")
            final = await manager.wait("deep")
            assert final["status"] == "failed"
            assert final["error"] == (
                f"ToolError: workflows nested more than {MAX_WORKFLOW_DEPTH} deep"
            )
        finally:
            await manager.aclose()

    asyncio.run(main())


# --- a job's model calls are generations -----------------------------------------------------


async def chatty(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any]:
    first = await ctx.chat("echo", "one two three")
    second = await ctx.chat("echo", "four five")
    return {"text": f"{first}|{second}"}


def run_chatty(key: StaticKey | None, admission: Admission) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        manager = JobManager(WorkflowRegistry([chatty]), default_router(), default_tools())
        try:
            manager.start("c", "chatty", {}, "1", JobLimits(admission, key))
            return await manager.wait("c")
        finally:
            await manager.aclose()

    return asyncio.run(main())


def test_a_jobs_model_calls_are_charged_to_the_key_that_started_it() -> None:
    admission = Admission(max_inflight=8)
    key = StaticKey.from_token("sk-a", limits=KeyLimits(tokens_per_minute=100))
    final = run_chatty(key, admission)
    assert final["status"] == "completed"
    assert final["result"] == {"text": "one two three|four five"}
    assert admission.inflight == 0  # every ticket went back
    headers = dict(admission.headers(key.key_id, key.limits, time.time()))
    # 3 + 3 words, then 2 + 2: echo's usage of the two calls
    assert headers[b"x-ratelimit-remaining-tokens"] == b"90"


def test_a_jobs_model_call_over_the_keys_rate_limit_fails_the_job_with_a_429() -> None:
    admission = Admission(max_inflight=8)
    key = StaticKey.from_token("sk-b", limits=KeyLimits(requests_per_minute=1))
    final = run_chatty(key, admission)
    assert final["status"] == "failed"
    assert "ProviderError" in final["error"] and "Rate limit" in final["error"]
    assert admission.inflight == 0


def test_a_job_may_not_call_a_model_its_key_may_not_use() -> None:
    admission = Admission(max_inflight=8)
    key = StaticKey.from_token("sk-c", limits=KeyLimits(models=("gpt-*",)))
    final = run_chatty(key, admission)
    assert final["status"] == "failed"
    assert "may not use the model `echo`" in final["error"]


def test_a_jobs_model_calls_count_against_the_servers_in_flight_limit() -> None:
    admission = Admission(max_inflight=1)
    held = admission.admit(None, None, time.time())  # the one slot is taken
    final = run_chatty(None, admission)
    assert final["status"] == "failed" and "limit of 1 generations" in final["error"]
    assert isinstance(held, Ticket)
    admission.release(held)
    assert run_chatty(None, admission)["status"] == "completed"
