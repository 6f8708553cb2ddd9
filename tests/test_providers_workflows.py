"""Workflows: the registry and its loaders, JSON graph validation, and running workflows.

The model is the deterministic ``echo`` (its ``/slow MS text`` directive makes a call take
time, ``/error STATUS`` makes it fail); one test adds a model double that records being
cancelled. Coroutines are driven with ``asyncio.run`` so the tests need no pytest plugin.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from wirechat.engine.chat import ChatRequest, ModelInfo, ProviderError, ProviderItem, TextDelta
from wirechat.providers import EchoProvider, ProviderRouter, ToolError, default_router
from wirechat.providers.tools import default_tools
from wirechat.providers.workflows import (
    Workflow,
    WorkflowContext,
    WorkflowError,
    WorkflowInfo,
    WorkflowRegistry,
    execute,
    graph_workflow,
    workflow,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
Event = dict[str, Any]


def context(
    events: list[Event] | None = None,
    *,
    router: ProviderRouter | None = None,
    inputs: tuple[str, ...] = (),
) -> WorkflowContext:
    return WorkflowContext(
        job_id="job1",
        workflow_id="wf",
        user_id="1",
        router=router or default_router(),
        tools=default_tools(),
        emit=None if events is None else events.append,
        inputs=inputs,
    )


def run(
    item: Workflow, inputs: dict[str, Any], events: list[Event] | None = None, **kwargs: Any
) -> dict[str, Any]:
    return asyncio.run(execute(item, context(events, **kwargs), inputs))


def node(node_id: str, node_type: str, **data: Any) -> dict[str, Any]:
    return {"id": node_id, "type": node_type, "data": data}


def edge(source: str, target: str, handle: str) -> dict[str, Any]:
    return {"source": source, "target": target, "targetHandle": handle}


def graph(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "g", "name": "G", "nodes": nodes, "edges": edges}


def brief(events: list[Event]) -> list[tuple[str, ...]]:
    """Events as (type, node, status-or-output) tuples, for comparing sequences."""
    out: list[tuple[str, ...]] = []
    for event in events:
        if event["type"] == "node_update":
            out.append(("node", event["node_id"], event["status"]))
        elif event["type"] == "output_update":
            out.append(("output", event["node_id"], event["output_name"]))
        else:
            out.append((event["type"], event.get("node_id", "")))
    return out


# --- the registry --------------------------------------------------------------------------


async def greet(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Greet somebody.

    A second paragraph that is no part of the description.
    """
    return {"greeting": f"hello {inputs.get('name', 'you')}"}


def test_add_function_reads_name_docstring_and_attributes() -> None:
    registry = WorkflowRegistry()
    added = registry.add(greet)
    assert added.info == WorkflowInfo(
        id="greet", name="greet", description="Greet somebody.", inputs=()
    )

    async def anything(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
        return None

    anything.workflow_id = "custom"  # type: ignore[attr-defined]
    anything.workflow_inputs = ("a", "b")  # type: ignore[attr-defined]
    custom = registry.add(anything)
    assert (custom.id, custom.name, custom.inputs, custom.description) == (
        "custom",
        "custom",
        ("a", "b"),
        "",
    )

    @workflow(id="decorated", name="Decorated", inputs=["x"])
    async def marked(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
        return None

    assert registry.add(marked).info == WorkflowInfo(
        id="decorated", name="Decorated", description="", inputs=("x",)
    )
    assert [info.id for info in registry.list()] == ["greet", "custom", "decorated"]
    assert registry.get("custom") is custom
    assert registry.get("nope") is None
    assert "greet" in registry and len(registry) == 3
    assert registry.add(added) is added  # the same workflow again is no conflict


def test_add_refuses_non_workflows_and_taken_ids() -> None:
    registry = WorkflowRegistry([greet])

    def not_async(ctx: Any, inputs: Any) -> None:
        return None

    with pytest.raises(WorkflowError, match="not a workflow"):
        registry.add(not_async)  # type: ignore[arg-type]
    with pytest.raises(WorkflowError, match="'greet' is already registered"):
        registry.add(Workflow(id="greet", name="x", description="", inputs=(), run=greet))


def test_python_workflow_result_merges_outputs_and_returned_dict() -> None:
    async def both(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any]:
        ctx.output("text", "a")
        ctx.output("text", "b")
        return {"count": 2}

    item = WorkflowRegistry().add(both)
    assert run(item, {}) == {"text": ["a", "b"], "count": 2}

    async def bad(ctx: WorkflowContext, inputs: dict[str, Any]) -> Any:
        return ["not", "a", "dict"]

    with pytest.raises(TypeError, match="returned list"):
        run(WorkflowRegistry().add(bad), {})


def test_load_module_attr_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wirechat_test_wfmod.py").write_text(
        textwrap.dedent(
            """
            async def one(ctx, inputs):
                '''The first.'''
                ctx.output("out", 1)

            async def two(ctx, inputs):
                return {"two": 2}

            ALL = [one, two]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = WorkflowRegistry()
    assert [w.id for w in registry.load("wirechat_test_wfmod:one")] == ["one"]
    with pytest.raises(WorkflowError, match="id 'one' is already taken"):
        registry.load("wirechat_test_wfmod:ALL")  # all or nothing: 'two' is not added either
    assert registry.get("two") is None
    fresh = WorkflowRegistry()
    assert [w.id for w in fresh.load("wirechat_test_wfmod:ALL")] == ["one", "two"]
    assert run(fresh.get("one"), {}) == {"out": [1]}  # type: ignore[arg-type]

    with pytest.raises(WorkflowError, match="has no attribute 'missing'"):
        registry.load("wirechat_test_wfmod:missing")
    with pytest.raises(WorkflowError, match="cannot import 'no_such_module_xyz'"):
        registry.load("no_such_module_xyz:f")
    with pytest.raises(WorkflowError, match="expected module:attr"):
        registry.load("just_a_name")
    with pytest.raises(WorkflowError, match="not a workflow"):
        registry.load("json:dumps")


def test_load_file_path_spec(tmp_path: Path) -> None:
    path = tmp_path / "my flows.py"
    path.write_text("async def flow(ctx, inputs):\n    return {'ok': True}\n")
    registry = WorkflowRegistry()
    (loaded,) = registry.load(f"{path}:flow")
    assert loaded.id == "flow"
    assert run(loaded, {}) == {"ok": True}
    # The example spec of the README, relative to the repository root.
    examples = WorkflowRegistry().load(f"{EXAMPLES}/workflows.py:WORKFLOWS")
    assert [w.id for w in examples] == ["summarize", "collect"]
    with pytest.raises(WorkflowError, match="cannot import"):
        registry.load(f"{tmp_path}/absent.py:flow")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(WorkflowError, match="boom at import"):
        registry.load(f"{broken}:x")
    assert not any("broken" in name for name in sys.modules if name.startswith("_wirechat"))


def test_load_json_graph_files(tmp_path: Path) -> None:
    registry = WorkflowRegistry()
    (echo,) = registry.load(str(EXAMPLES / "echo_graph.json"))
    assert echo.info == WorkflowInfo(
        id="echo_graph",
        name="Echo graph",
        description="Put the message in a template, ask the echo model, return its reply.",
        inputs=("message",),
    )
    assert run(echo, {"message": "hi"}) == {"reply": ["You said: hi"]}

    unnamed = json.loads((EXAMPLES / "echo_graph.json").read_text())
    del unnamed["id"], unnamed["name"]
    path = tmp_path / "from_file_name.json"
    path.write_text(json.dumps(unnamed))
    assert [w.id for w in registry.load(str(path))] == ["from_file_name"]

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WorkflowError, match=r"bad\.json: cannot read"):
        registry.load(str(tmp_path / "bad.json"))
    with pytest.raises(WorkflowError, match="cannot read"):
        registry.load(str(tmp_path / "absent.json"))
    (tmp_path / "cycle.json").write_text(
        json.dumps(graph([node("a", "template", template="{x}")], [edge("a", "a", "x")]))
    )
    with pytest.raises(WorkflowError, match=r"cycle\.json: node 'a' is on a cycle"):
        registry.load(str(tmp_path / "cycle.json"))


def test_load_entry_points_from_an_installed_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real (if minimal) installed distribution: a .dist-info folder on sys.path.
    (tmp_path / "wirechat_test_plugin.py").write_text(
        "async def plugged(ctx, inputs):\n    return {'plugged': True}\n"
        "def not_a_workflow():\n    pass\n"
    )
    info = tmp_path / "wirechat_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wirechat-test-plugin\n")
    (info / "entry_points.txt").write_text(
        "[wirechat.workflows]\n"
        "plugged = wirechat_test_plugin:plugged\n"
        "broken = wirechat_test_plugin:not_a_workflow\n"
        "missing = wirechat_test_plugin_absent:x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = WorkflowRegistry()
    loaded = registry.load_entry_points()
    assert [w.id for w in loaded] == ["plugged"]  # the broken ones are logged and skipped
    assert run(loaded[0], {}) == {"plugged": True}
    assert registry.load_entry_points("wirechat.no_such_group") == []


# --- graph validation ----------------------------------------------------------------------

GOOD = graph(
    [
        node("in", "input.string", name="message"),
        node("t", "template", template="Say: {text}"),
        node("c", "chat"),
        node("out", "output", name="reply"),
    ],
    [edge("in", "t", "text"), edge("t", "c", "prompt"), edge("c", "out", "value")],
)


def broken(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    change(data)
    return data


INVALID: list[tuple[str, Any, str]] = [
    (
        "unknown type",
        lambda g: g["nodes"].append(node("x", "image.generate")),
        r"node 'x': unknown node type 'image.generate'",
    ),
    (
        "duplicate id",
        lambda g: g["nodes"].append(node("c", "chat")),
        r"node 'c': duplicate node id",
    ),
    (
        "edge from unknown node",
        lambda g: g["edges"].append(edge("ghost", "out", "value")),
        r"into node 'out': the source node 'ghost' does not exist",
    ),
    (
        "edge to unknown node",
        lambda g: g["edges"].append(edge("in", "ghost", "value")),
        r"from node 'in': the target node 'ghost' does not exist",
    ),
    (
        "unknown input handle",
        lambda g: g["edges"].append(edge("in", "c", "temperature")),
        r"node 'c' \(chat\) has no input handle 'temperature'",
    ),
    (
        "unknown template handle",
        lambda g: g["edges"].append(edge("in", "t", "other")),
        r"node 't' \(template\) has no input handle 'other'",
    ),
    (
        "edge out of an output node",
        lambda g: g["edges"].append(edge("out", "c", "system")),
        r"node 'out' \(output\) has no output handle 'output'",
    ),
    (
        "unknown output handle",
        lambda g: g["edges"].append({**edge("in", "c", "system"), "sourceHandle": "text"}),
        r"node 'in' \(input.string\) has no output handle 'text'",
    ),
    (
        "two edges into one handle",
        lambda g: g["edges"].append(edge("in", "c", "prompt")),
        r"node 'c': the input 'prompt' has more than one edge",
    ),
    (
        "missing targetHandle",
        lambda g: g["edges"].append({"source": "in", "target": "c"}),
        r"node 'c': edges\[3\] from 'in' has no targetHandle",
    ),
    (
        "cycle",
        lambda g: (
            g["nodes"].append(node("t2", "template", template="{a}")),
            g["edges"].remove(edge("in", "t", "text")),
            g["edges"].extend([edge("c", "t2", "a"), edge("t2", "t", "text")]),
        ),
        r"node '(t|t2|c)' is on a cycle: '(t|t2|c)' -> ",
    ),
    (
        "chat prompt without edge",
        lambda g: g["edges"].remove(edge("t", "c", "prompt")),
        r"node 'c' \(chat\): the required input 'prompt' has no edge",
    ),
    (
        "output value without edge",
        lambda g: g["edges"].remove(edge("c", "out", "value")),
        r"node 'out' \(output\): the required input 'value' has no edge",
    ),
    (
        "template placeholder without edge",
        lambda g: g["edges"].remove(edge("in", "t", "text")),
        r"node 't' \(template\): the required input 'text' has no edge",
    ),
    (
        "number into chat prompt",
        lambda g: (
            g["nodes"].append(node("n", "input.number", name="count")),
            g["edges"].remove(edge("t", "c", "prompt")),
            g["edges"].append(edge("n", "c", "prompt")),
        ),
        r"node 'c' \(chat\): the input 'prompt' takes a str, but node 'n' \(input.number\) "
        r"gives a number",
    ),
    (
        "input without name",
        lambda g: g["nodes"][0]["data"].pop("name"),
        r"node 'in' \(input.string\): data.name must be a non-empty string",
    ),
    (
        "number default not a number",
        lambda g: g["nodes"].append(node("n", "input.number", name="k", value="3")),
        r"node 'n' \(input.number\): data.value must be a number",
    ),
    (
        "tool without name",
        lambda g: g["nodes"].append(node("tl", "tool")),
        r"node 'tl' \(tool\): data.name must be a non-empty string",
    ),
    (
        "template without template",
        lambda g: g["nodes"][1]["data"].pop("template"),
        r"node 't' \(template\): data.template must be a non-empty string",
    ),
    (
        "node without id",
        lambda g: g["nodes"].append({"type": "chat"}),
        r"nodes\[4\] needs a non-empty string 'id'",
    ),
]


@pytest.mark.parametrize(
    ("change", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_graphs_are_refused_naming_the_node(change: Any, message: str) -> None:
    with pytest.raises(WorkflowError, match=message) as caught:
        graph_workflow(broken(change), source="test.json")
    assert str(caught.value).startswith("workflow graph test.json: ")


def test_graph_level_errors() -> None:
    with pytest.raises(WorkflowError, match="needs a string 'id'"):
        graph_workflow({"nodes": GOOD["nodes"]})
    with pytest.raises(WorkflowError, match="'nodes' must be a non-empty list"):
        graph_workflow({"id": "g", "nodes": []})
    with pytest.raises(WorkflowError, match="'edges' must be a list"):
        graph_workflow({"id": "g", "nodes": GOOD["nodes"], "edges": {}})


def test_cycle_message_names_the_nodes_on_it() -> None:
    data = graph(
        [
            node("start", "input.string", name="s"),
            node("a", "template", template="{x}{y}"),
            node("b", "template", template="{x}"),
            node("c", "template", template="{x}"),
        ],
        [edge("start", "a", "x"), edge("c", "a", "y"), edge("a", "b", "x"), edge("b", "c", "x")],
    )
    with pytest.raises(WorkflowError) as caught:
        graph_workflow(data)
    message = str(caught.value)
    assert "is on a cycle" in message
    cycle = message.split("cycle: ")[1].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"'a'", "'b'", "'c'"}
    assert "'start'" not in message


# --- running graphs ------------------------------------------------------------------------


def test_graph_events_in_order_with_results() -> None:
    events: list[Event] = []
    result = run(graph_workflow(GOOD), {"message": "hi", "unused": 1}, events)
    assert result == {"reply": ["Say: hi"]}
    assert brief(events) == [
        ("node", "in", "running"),
        ("node", "in", "completed"),
        ("node", "t", "running"),
        ("node", "t", "completed"),
        ("node", "c", "running"),
        ("node", "c", "completed"),
        ("node", "out", "running"),
        ("output", "out", "reply"),
        ("node", "out", "completed"),
    ]
    assert events[5] == {
        "type": "node_update",
        "node_id": "c",
        "node_name": "c",
        "node_type": "chat",
        "status": "completed",
        "result": {"output": "Say: hi"},
        "job_id": "job1",
        "workflow_id": "wf",
    }
    assert events[7] == {
        "type": "output_update",
        "node_id": "out",
        "node_name": "reply",
        "output_name": "reply",
        "value": "Say: hi",
        "output_type": "str",
        "metadata": {},
        "job_id": "job1",
        "workflow_id": "wf",
    }


def test_independent_branches_run_concurrently() -> None:
    data = graph(
        [
            node("a", "input.string", name="a", value="/slow 200 left"),
            node("b", "input.string", name="b", value="/slow 200 right"),
            node("ca", "chat", title="Left model"),
            node("cb", "chat"),
            node("join", "template", template="{x}+{y}"),
            node("out", "output", name="both"),
        ],
        [
            edge("a", "ca", "prompt"),
            edge("b", "cb", "prompt"),
            edge("ca", "join", "x"),
            edge("cb", "join", "y"),
            edge("join", "out", "value"),
        ],
    )
    events: list[Event] = []
    started = time.monotonic()
    result = run(graph_workflow(data), {}, events)
    elapsed = time.monotonic() - started
    assert result == {"both": ["left+right"]}
    assert 0.19 < elapsed < 0.38, elapsed  # serially it would take 0.4 s
    steps = brief(events)
    # Both models are running before either completes.
    assert steps.index(("node", "cb", "running")) < steps.index(("node", "ca", "completed"))
    assert steps.index(("node", "join", "running")) > max(
        steps.index(("node", "ca", "completed")), steps.index(("node", "cb", "completed"))
    )
    assert next(e for e in events if e["node_id"] == "ca")["node_name"] == "Left model"


def test_tool_and_number_nodes() -> None:
    data = graph(
        [
            node("n", "input.number", name="n", value=2),
            node("expr", "template", template="{n} * 21"),
            node("calc", "tool", name="calculator"),
            node("fixed", "tool", name="calculator", args={"expression": "1 + 1"}),
            node("out", "output", name="answer"),
            node("out2", "output", name="fixed"),
        ],
        [
            edge("n", "expr", "n"),
            edge("expr", "calc", "expression"),
            edge("calc", "out", "value"),
            edge("fixed", "out2", "value"),
        ],
    )
    item = graph_workflow(data)
    assert item.inputs == ("n",)
    assert run(item, {}) == {"answer": [42], "fixed": [2]}
    assert run(item, {"n": "3"}) == {"answer": [63], "fixed": [2]}  # a string is converted
    with pytest.raises(WorkflowError, match="node 'n': input 'n' needs a number"):
        run(item, {"n": "many"})


def test_input_without_value_or_default_fails_naming_the_node() -> None:
    with pytest.raises(WorkflowError, match="node 'in': no value for the input 'message'"):
        run(graph_workflow(GOOD), {})


def test_chat_node_with_system_and_model() -> None:
    data = graph(
        [
            node("in", "input.string", name="q"),
            node("sys", "input.string", name="s", value="be brief"),
            node("c", "chat", model="echo"),
            node("out", "output", name="a"),
        ],
        [edge("in", "c", "prompt"), edge("sys", "c", "system"), edge("c", "out", "value")],
    )
    assert run(graph_workflow(data), {"q": "/history"}) == {"a": ["history: 1 messages"]}


def test_failing_node_reports_error_and_cancels_the_other_branch() -> None:
    data = graph(
        [
            node("slow", "input.string", name="a", value="/slow 2000 late"),
            node("bad", "input.string", name="b", value="/error 503"),
            node("c1", "chat"),
            node("c2", "chat"),
            node("o1", "output", name="o1"),
            node("o2", "output", name="o2"),
        ],
        [
            edge("slow", "c1", "prompt"),
            edge("bad", "c2", "prompt"),
            edge("c1", "o1", "value"),
            edge("c2", "o2", "value"),
        ],
    )
    events: list[Event] = []
    started = time.monotonic()
    with pytest.raises(ProviderError, match="Injected upstream error 503"):
        run(graph_workflow(data), {}, events)
    assert time.monotonic() - started < 1.0  # the slow branch was cancelled, not awaited
    errors = [e for e in events if e["type"] == "node_update" and e["status"] == "error"]
    assert errors == [
        {
            "type": "node_update",
            "node_id": "c2",
            "node_name": "c2",
            "node_type": "chat",
            "status": "error",
            "error": "Injected upstream error 503",
            "job_id": "job1",
            "workflow_id": "wf",
        }
    ]
    assert ("node", "c1", "completed") not in brief(events)
    assert not any(e.get("node_id") in ("o1", "o2") for e in events)


class CancelRecordingModel:
    """A model double ``stuck``: never answers, records whether it was cancelled."""

    name = "test"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    def serves(self, model: str) -> bool:
        return model == "stuck"

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id="stuck", owned_by="test")]

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        yield TextDelta(text="never")


def test_cancelling_a_graph_reaches_the_running_node() -> None:
    model = CancelRecordingModel()
    router = ProviderRouter([EchoProvider(), model])
    data = graph(
        [node("in", "input.string", name="q"), node("c", "chat", model="stuck")],
        [edge("in", "c", "prompt")],
    )
    events: list[Event] = []

    async def main() -> None:
        task = asyncio.create_task(
            execute(graph_workflow(data), context(events, router=router), {"q": "x"})
        )
        await asyncio.wait_for(model.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert model.cancelled
    assert brief(events)[-1] == ("node", "c", "running")  # no error for a cancel


# --- the context ---------------------------------------------------------------------------


def test_context_events_default_to_the_workflow_or_the_current_node() -> None:
    events: list[Event] = []

    async def flow(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
        ctx.progress(1, 3)
        ctx.output("plain", {"type": "image", "uri": "x"})
        with ctx.node("n1", "Step one", "custom") as handle:
            ctx.progress(2, 3)
            ctx.output("inside", 1.5)
            handle.result = {"done": True}
        ctx.progress(3, 3, node_id="explicit")

    run(Workflow(id="wf", name="wf", description="", inputs=(), run=flow), {}, events)
    tags = {"job_id": "job1", "workflow_id": "wf"}
    assert events == [
        {"type": "node_progress", "node_id": "wf", "progress": 1, "total": 3, "chunk": ""} | tags,
        {
            "type": "output_update",
            "node_id": "wf",
            "node_name": "plain",
            "output_name": "plain",
            "value": {"type": "image", "uri": "x"},
            "output_type": "image",
            "metadata": {},
        }
        | tags,
        {
            "type": "node_update",
            "node_id": "n1",
            "node_name": "Step one",
            "node_type": "custom",
            "status": "running",
        }
        | tags,
        {"type": "node_progress", "node_id": "n1", "progress": 2, "total": 3, "chunk": ""} | tags,
        {
            "type": "output_update",
            "node_id": "n1",
            "node_name": "Step one",
            "output_name": "inside",
            "value": 1.5,
            "output_type": "float",
            "metadata": {},
        }
        | tags,
        {
            "type": "node_update",
            "node_id": "n1",
            "node_name": "Step one",
            "node_type": "custom",
            "status": "completed",
            "result": {"done": True},
        }
        | tags,
        {"type": "node_progress", "node_id": "explicit", "progress": 3, "total": 3, "chunk": ""}
        | tags,
    ]


def test_node_block_error_is_reported_and_reraised() -> None:
    events: list[Event] = []

    async def flow(ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
        with ctx.node("n", "N", "step"):
            raise KeyError("x" * 2000)

    with pytest.raises(KeyError):
        run(Workflow(id="wf", name="wf", description="", inputs=(), run=flow), {}, events)
    assert [e["status"] for e in events] == ["running", "error"]
    assert len(events[1]["error"]) == 1000


def test_chat_and_tool_through_the_context() -> None:
    async def main() -> tuple[str, str, Any]:
        ctx = context()
        one = await ctx.chat("echo", "just text")
        many = await ctx.chat(
            "echo",
            [{"role": "system", "content": "s"}, {"role": "user", "content": "/history"}],
        )
        return one, many, await ctx.tool("calculator", {"expression": "6 * 7"})

    assert asyncio.run(main()) == ("just text", "history: 1 messages", 42)

    async def failing() -> None:
        ctx = context()
        with pytest.raises(ValueError, match="not a chat message"):
            await ctx.chat("echo", [{"role": "robot", "content": "x"}])
        with pytest.raises(ProviderError) as caught:
            await ctx.chat("no-such-model", "x")
        assert caught.value.status == 404
        with pytest.raises(ToolError, match="unknown tool"):
            await ctx.tool("nope", {})

    asyncio.run(failing())


def test_input_streams_keep_early_values_and_end() -> None:
    async def main() -> list[Any]:
        ctx = context(inputs=("text",))
        assert ctx.feed_input("text", "early") is None  # before the workflow opened it
        assert ctx.feed_input("other", 1) == "Invalid input name"
        stream = ctx.input_stream("text")
        assert ctx.feed_input("text", "late") is None
        assert ctx.end_input("text") is None
        assert ctx.end_input("text") is None  # idempotent
        assert ctx.feed_input("text", "too late") == "Input stream already ended"
        got = [value async for value in stream]
        # Opening an undeclared stream makes its name valid.
        opened = ctx.input_stream("extra")
        assert ctx.feed_input("extra", 5) is None
        ctx.end_input("extra")
        return got + [value async for value in opened]

    assert asyncio.run(main()) == ["early", "late", 5]


def test_cancelled_flag() -> None:
    ctx = context()
    assert not ctx.cancelled
    ctx.request_cancel()
    assert ctx.cancelled
