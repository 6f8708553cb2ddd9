"""The job runner: workflows run as asyncio tasks that outlive the connection that started them.

Rules of this module:

* Every method is called on the event loop thread, and every subscriber callback is called
  there too: synchronously, in event order, never from inside a method of this class that
  the engine called (events come from the job's own task).
* A job belongs to the user who started it. Every method checks the owner, and another
  user's job looks exactly like an unknown one (``None`` / ``False``).
* Lifecycle (NodeTool's, nodetool-spec.md §4.3): ``starting`` (waiting for one of the
  ``max_concurrent`` slots; no event) -> ``job_update running`` -> the workflow's events ->
  ``completed`` (with ``result`` and ``message``) | ``error`` then ``failed`` | ``cancelled``.
  The terminal ``job_update`` is the job's last event; after it nothing more is delivered.
* A cancel cancels the job's task, so ``CancelledError`` reaches the running node; the
  ``cancelled`` update is sent once the task has actually stopped.
* A finished job is kept ``retention`` seconds for ``status``, ``snapshot`` and ``wait``,
  then forgotten.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .registry import ProviderRouter
from .tools import Tool, ToolError, ToolRegistry
from .workflows import (
    MAX_ERROR_CHARS,
    JobLimits,
    Workflow,
    WorkflowContext,
    WorkflowRegistry,
    execute,
)

__all__ = ["MAX_WORKFLOW_DEPTH", "TERMINAL_STATUSES", "JobManager"]

logger = logging.getLogger("wirechat.providers")

Event = dict[str, Any]
Callback = Callable[[Event], None]

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# A workflow offered as a tool may call workflow tools itself; this bounds the recursion.
MAX_WORKFLOW_DEPTH = 8
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("wirechat_workflow_depth", default=0)
_TOOL_NAME_JUNK = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(eq=False)
class _Job:
    job_id: str
    workflow: Workflow
    user_id: str
    params: dict[str, Any]
    ctx: WorkflowContext = field(init=False)
    status: str = "starting"
    task: asyncio.Task[None] | None = None
    subscribers: dict[int, Callback] = field(default_factory=dict)
    nodes: dict[str, Event] = field(default_factory=dict)  # node id -> latest node_update
    final: Event | None = None  # the terminal job_update
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expiry: asyncio.TimerHandle | None = None


class JobManager:
    """Runs workflow jobs; see the module docstring for the rules."""

    def __init__(
        self,
        workflows: WorkflowRegistry,
        router: ProviderRouter,
        tools: ToolRegistry,
        *,
        max_concurrent: int = 16,
        retention: float = 600.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._workflows = workflows
        self._router = router
        self._tools = tools
        self._slots = asyncio.Semaphore(max_concurrent)
        self._retention = retention
        self._jobs: dict[str, _Job] = {}
        self._keys = itertools.count()
        self._closed = False
        self._finished: dict[str, int] = dict.fromkeys(sorted(TERMINAL_STATUSES), 0)

    # --- commands --------------------------------------------------------------------------

    def start(
        self,
        job_id: str,
        workflow_id: str,
        params: dict[str, Any],
        user_id: str,
        limits: JobLimits | None = None,
    ) -> None:
        """Start ``workflow_id`` with ``params`` as its inputs, as a task of its own. With
        ``limits``, each of its model calls (``ctx.chat``) is admitted as a generation.

        Nothing runs before the caller yields to the loop, so a :meth:`subscribe` right after
        this call sees every event, from ``job_update running`` on.

        Raises:
            KeyError: no such workflow.
            ValueError: ``job_id`` is already in use.
            RuntimeError: the manager is closed.
        """
        workflow = self._workflows.get(workflow_id)
        if workflow is None:
            raise KeyError(workflow_id)
        if job_id in self._jobs:
            raise ValueError(f"job id {job_id!r} is already in use")
        if self._closed:
            raise RuntimeError("the job manager is closed")
        job = _Job(job_id=job_id, workflow=workflow, user_id=user_id, params=dict(params))
        job.ctx = WorkflowContext(
            job_id=job_id,
            workflow_id=workflow.id,
            user_id=user_id,
            router=self._router,
            tools=self._tools,
            emit=lambda event: self._workflow_event(job, event),
            inputs=workflow.inputs,
            limits=limits,
        )
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"wirechat-job-{job_id}")
        task.add_done_callback(lambda done: self._task_done(job, done))
        job.task = task
        self._jobs[job_id] = job

    def subscribe(self, job_id: str, user_id: str, callback: Callback) -> Callable[[], None] | None:
        """Call ``callback`` with every later event of the job; returns the unsubscribe.

        None when the job is unknown or another user's. A finished job has no later events.
        Callbacks must not mutate the event dicts (every subscriber gets the same one).
        """
        job = self._owned(job_id, user_id)
        if job is None:
            return None
        if job.final is not None:
            return _nothing
        key = next(self._keys)
        job.subscribers[key] = callback

        def unsubscribe() -> None:
            job.subscribers.pop(key, None)

        return unsubscribe

    def snapshot(self, job_id: str, user_id: str) -> list[Event] | None:
        """The job's state as events, for ``reconnect_job``.

        Running (or starting): ``job_update`` with the current status, then the latest
        ``node_update`` of each node. Finished: the nodes' updates, then the final
        ``job_update`` (with ``result`` or ``error``), so the terminal event is always last.
        """
        job = self._owned(job_id, user_id)
        if job is None:
            return None
        nodes = [dict(event) for event in job.nodes.values()]
        if job.final is not None:
            return [*nodes, dict(job.final)]
        return [self._job_update(job, job.status), *nodes]

    def cancel(self, job_id: str, user_id: str) -> bool:
        """Ask the job to stop; False when unknown, another user's or already finished."""
        job = self._owned(job_id, user_id)
        if job is None or job.final is not None:
            return False
        job.ctx.request_cancel()
        if job.task is not None:
            job.task.cancel()
        return True

    def status(self, job_id: str, user_id: str) -> dict[str, Any] | None:
        """``{"status", "job_id", "workflow_id"}``, plus ``result`` or ``error`` once finished."""
        job = self._owned(job_id, user_id)
        if job is None:
            return None
        answer = self._job_update(job, job.status)
        del answer["type"]
        if job.final is not None:
            answer.update((k, job.final[k]) for k in ("result", "error") if k in job.final)
        return answer

    def jobs(self, user_id: str) -> list[dict[str, Any]]:
        """``[{job_id, workflow_id, status}]`` of the user's known jobs, oldest first."""
        return [
            {"job_id": job.job_id, "workflow_id": job.workflow.id, "status": job.status}
            for job in self._jobs.values()
            if job.user_id == user_id
        ]

    def stream_input(
        self, job_id: str, user_id: str, name: str, value: Any
    ) -> str | dict[str, Any]:
        """Feed ``value`` to the job's input stream ``name``: ``{"workflow_id"}`` of the
        job, or the error text."""
        job = self._owned(job_id, user_id)
        if job is None or job.final is not None:
            return "No active job/context"
        error = job.ctx.feed_input(name, value)
        return error if error is not None else {"workflow_id": job.workflow.id}

    def end_input_stream(self, job_id: str, user_id: str, name: str) -> str | dict[str, Any]:
        """End the job's input stream ``name``: ``{"workflow_id"}`` of the job, or the
        error text."""
        job = self._owned(job_id, user_id)
        if job is None or job.final is not None:
            return "No active job/context"
        error = job.ctx.end_input(name)
        return error if error is not None else {"workflow_id": job.workflow.id}

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """For metrics: jobs not finished by status (``starting``, ``running``), and jobs
        finished since the manager was made by final status (forgotten ones included)."""
        active = {"starting": 0, "running": 0}
        for job in self._jobs.values():
            if job.final is None:
                active[job.status] = active.get(job.status, 0) + 1
        return active, dict(self._finished)

    async def wait(self, job_id: str) -> dict[str, Any]:
        """The final ``job_update`` of the job, once it has finished (any user's job).

        Raises:
            KeyError: no such job (or it was forgotten).
        """
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        await job.done.wait()
        assert job.final is not None
        return job.final

    async def aclose(self) -> None:
        """Cancel every running job, wait until they stop, and drop the retention timers."""
        self._closed = True
        tasks = []
        for job in list(self._jobs.values()):
            if job.task is not None and not job.task.done():
                job.ctx.request_cancel()
                job.task.cancel()
                tasks.append(job.task)
        if tasks:
            await asyncio.wait(tasks)
        for job in self._jobs.values():
            if job.expiry is not None:
                job.expiry.cancel()
        self._jobs.clear()

    def workflow_tools(self, *, user_id: str = "1") -> list[Tool]:
        """One tool per registered workflow, ``workflow_<id>``: it runs the workflow to its end
        with the arguments as inputs (all strings) and returns the result dict. The runs are
        not jobs: they take no slot and send no events (the tool call is the event).
        """
        made: dict[str, Tool] = {}
        for item in self._workflows:
            name = _TOOL_NAME_JUNK.sub("_", f"workflow_{item.id}")[:64]
            if name in made:
                logger.warning("workflow %r: the tool name %s is taken; not offered", item.id, name)
                continue
            made[name] = Tool(
                name=name,
                description=item.description or f"Run the workflow {item.name}",
                parameters={
                    "type": "object",
                    "properties": {key: {"type": "string"} for key in item.inputs},
                    "required": list(item.inputs),
                },
                func=self._tool_runner(item, user_id),
            )
        return list(made.values())

    # --- internals -------------------------------------------------------------------------

    def _owned(self, job_id: str, user_id: str) -> _Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.user_id == user_id else None

    @staticmethod
    def _job_update(job: _Job, status: str, **extra: Any) -> Event:
        event: Event = {"type": "job_update", "status": status, **extra}
        event["job_id"] = job.job_id
        event["workflow_id"] = job.workflow.id
        return event

    async def _run(self, job: _Job) -> None:
        try:
            async with self._slots:
                job.status = "running"
                self._emit(job, self._job_update(job, "running"))
                started = time.monotonic()
                result = await execute(job.workflow, job.ctx, job.params)
        except asyncio.CancelledError:
            self._finish(job, self._job_update(job, "cancelled"))
            raise
        except Exception as error:
            if job.ctx.cancelled:
                self._finish(job, self._job_update(job, "cancelled"))
                return
            logger.info("job %s (%s) failed: %r", job.job_id, job.workflow.id, error)
            text = str(error) or type(error).__name__
            self._emit(job, self._job_update(job, "error", error=text[:MAX_ERROR_CHARS]))
            failure = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
            self._finish(job, self._job_update(job, "failed", error=failure))
            return
        if job.ctx.cancelled:  # the workflow caught the cancel and returned
            self._finish(job, self._job_update(job, "cancelled"))
            return
        seconds = time.monotonic() - started
        message = f"Workflow {job.job_id} completed in {seconds:.2f} seconds"
        self._finish(job, self._job_update(job, "completed", result=result, message=message))

    def _task_done(self, job: _Job, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never ran _run's handlers.
        if task.cancelled():
            self._finish(job, self._job_update(job, "cancelled"))
            return
        error = task.exception()
        if error is not None:
            failure = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
            self._finish(job, self._job_update(job, "failed", error=failure))

    def _workflow_event(self, job: _Job, event: Event) -> None:
        # job_update is the runner's word alone: a workflow must not end its own job early.
        if event.get("type") == "job_update":
            logger.warning("job %s: a workflow may not send job_update; dropped", job.job_id)
            return
        self._emit(job, event)

    def _emit(self, job: _Job, event: Event) -> None:
        if job.final is not None:
            return  # after the terminal update nothing more goes out
        if event.get("type") == "node_update":
            job.nodes[str(event.get("node_id"))] = event
        self._deliver(job, job.subscribers, event)

    def _finish(self, job: _Job, event: Event) -> None:
        if job.final is not None:
            return
        job.final = event
        job.status = event["status"]
        self._finished[job.status] = self._finished.get(job.status, 0) + 1
        subscribers, job.subscribers = job.subscribers, {}
        self._deliver(job, subscribers, event)
        job.done.set()
        job.expiry = asyncio.get_running_loop().call_later(self._retention, self._forget, job)

    @staticmethod
    def _deliver(job: _Job, subscribers: dict[int, Callback], event: Event) -> None:
        for key, callback in list(subscribers.items()):
            if key not in subscribers:
                continue  # unsubscribed by an earlier callback of this same event
            try:
                callback(event)
            except Exception:
                logger.exception("a subscriber of job %s failed", job.job_id)

    def _forget(self, job: _Job) -> None:
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]

    def _tool_runner(self, item: Workflow, user_id: str) -> Callable[..., Any]:
        async def run_workflow(**inputs: Any) -> dict[str, Any]:
            depth = _depth.get()
            if depth >= MAX_WORKFLOW_DEPTH:
                raise ToolError(f"workflows nested more than {MAX_WORKFLOW_DEPTH} deep")
            token = _depth.set(depth + 1)
            try:
                ctx = WorkflowContext(
                    job_id=uuid.uuid4().hex,
                    workflow_id=item.id,
                    user_id=user_id,
                    router=self._router,
                    tools=self._tools,
                    inputs=item.inputs,
                )
                return await execute(item, ctx, inputs)
            finally:
                _depth.reset(token)

        return run_workflow


def _nothing() -> None:
    return None
