"""Workflows the end-to-end tests need beyond the examples: slow, gated, failing.

Load them all with ``--workflow tests/workflows_for_tests.py:WORKFLOWS``. None of them needs
the network: models are the embedded ``echo``.

* ``slow_chat``: one node awaiting ``echo``'s ``/slow`` reply (8 words, 200 ms each), so a
  cancel lands while the node awaits the model.
* ``ticker``: a node that counts ``ticks`` (default 50) every ``delay`` seconds (default
  0.05) and checks ``ctx.cancelled`` between ticks.
* ``gated``: a node that reports it is running, then waits until the client ends the input
  stream ``go`` (``end_input_stream``); the test decides when it finishes, so nothing in a
  test depends on timing.
* ``raising``: a node that raises ``RuntimeError("kaboom")``.
* ``count_messages``: outputs how many ``messages`` (a ``/chat`` turn's history) it was
  given and the ``message`` itself.
* ``failing_graph``: a JSON graph whose ``tool`` node calls ``calculator`` with an
  expression it refuses.
"""

from __future__ import annotations

import asyncio
from typing import Any

from wirechat.providers.workflows import WorkflowContext, graph_workflow, workflow

SLOW_PROMPT = "/slow 200 a b c d e f g h"


@workflow(inputs=("message",))
async def slow_chat(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Ask echo for a slow reply (1.6 s)."""
    with ctx.node("slow", "Slow model", "test.slow"):
        reply = await ctx.chat("echo", SLOW_PROMPT)
    ctx.output("reply", reply)
    return None


@workflow(inputs=("ticks", "delay"))
async def ticker(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Count ticks, checking ``ctx.cancelled`` between them."""
    ticks = int(inputs.get("ticks", 50))
    delay = float(inputs.get("delay", 0.05))
    done = 0
    with ctx.node("tick", "Ticker", "test.ticker") as node:
        for index in range(1, ticks + 1):
            if ctx.cancelled:
                break
            await asyncio.sleep(delay)
            done = index
            ctx.progress(index, ticks)
        node.result = {"ticks": done}
    ctx.output("ticks", done)
    return None


@workflow(inputs=("go",))
async def gated(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Wait for the end of the input stream ``go``; output what was fed to it."""
    fed: list[Any] = []
    with ctx.node("gate", "Gate", "test.gate") as node:
        async for value in ctx.input_stream("go"):
            fed.append(value)
            ctx.progress(len(fed), 0)
        node.result = {"fed": len(fed)}
    ctx.output("fed", fed)
    return {"count": len(fed)}


@workflow()
async def raising(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """A node that raises."""
    with ctx.node("boom", "Boom", "test.raise"):
        raise RuntimeError("kaboom")


@workflow(inputs=("message", "messages"))
async def count_messages(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Say how long the history is."""
    messages = inputs.get("messages")
    count = len(messages) if isinstance(messages, list) else -1
    ctx.output("answer", f"{count} messages, last: {inputs.get('message')}")
    return None


failing_graph = graph_workflow(
    {
        "id": "failing_graph",
        "name": "Failing graph",
        "description": "A tool node whose tool fails.",
        "nodes": [
            {"id": "expr", "type": "input.string", "data": {"name": "expression", "value": ""}},
            {"id": "calc", "type": "tool", "data": {"name": "calculator", "title": "Calc"}},
            {"id": "out", "type": "output", "data": {"name": "value"}},
        ],
        "edges": [
            {"source": "expr", "target": "calc", "targetHandle": "expression"},
            {"source": "calc", "target": "out", "targetHandle": "value"},
        ],
    },
    source="failing_graph",
)

WORKFLOWS = [slow_chat, ticker, gated, raising, count_messages, failing_graph]
