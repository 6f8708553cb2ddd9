"""Example Python workflows for wirechat; they run with the embedded ``echo`` model.

Serve them with ``wirechat serve --workflow examples/workflows.py:summarize`` (one) or
``--workflow examples/workflows.py:WORKFLOWS`` (all of them).
"""

from __future__ import annotations

from typing import Any

from wirechat.providers.workflows import WorkflowContext, workflow


@workflow(inputs=("message",))
async def summarize(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Summarize a message with a model (``echo`` repeats it, which is summary enough)."""
    message = str(inputs.get("message", ""))
    ctx.progress(1, 2)
    summary = await ctx.chat("echo", message)
    ctx.progress(2, 2)
    ctx.output("summary", summary)
    return None


@workflow(inputs=("text",))
async def collect(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Collect the pieces streamed to the input ``text`` until it ends, then join them.

    Feed it over ``/predict`` with ``stream_input`` (``input: "text"``) and end it with
    ``end_input_stream``. The result's ``words`` counts the words of the whole text.
    """
    pieces: list[str] = []
    async for piece in ctx.input_stream("text"):
        pieces.append(str(piece))
    text = "".join(pieces)
    ctx.output("text", text)
    return {"words": len(text.split())}


WORKFLOWS = [summarize, collect]
