"""Workflows: Python async functions and JSON graphs, run by the job runner (``jobs.py``).

Rules of this module:

* A workflow is an id, a name, a description, the names of its inputs and one coroutine
  function ``run(ctx, inputs) -> dict | None``. A Python workflow *is* that function; a JSON
  graph is validated whole and compiled into one (:func:`graph_workflow`).
* A running workflow reaches the outside world only through its :class:`WorkflowContext`:
  models (``ctx.chat``, through the ProviderRouter), tools (``ctx.tool``), events
  (``ctx.progress``, ``ctx.output``, ``ctx.node``) and streamed inputs (``ctx.input_stream``).
  Events are plain dicts with NodeTool's field names (nodetool-spec.md §5), tagged with
  ``job_id`` and ``workflow_id`` and handed synchronously, in order, to the context's sink.
* Cancellation is asyncio's: the job task is cancelled and ``CancelledError`` reaches the
  node that is awaiting. Nothing here swallows it. ``ctx.cancelled`` is for code that must
  notice a cancel without an ``await`` in between (a cleanup handler, a loop over threads).
* A graph is rejected when it is loaded, never half-way through a run, for everything that
  can be known without running it; every :class:`WorkflowError` names the node.

JSON graph format::

    {"id": "echo_graph", "name": "Echo", "description": "...",
     "nodes": [{"id": "n1", "type": "input.string", "data": {"name": "message"}}, ...],
     "edges": [{"source": "n1", "sourceHandle": "output",
                "target": "n2", "targetHandle": "text"}, ...]}

``id`` defaults to the file name without ``.json``, ``name`` to the id. ``sourceHandle``
defaults to ``"output"``, the only output handle there is. Unknown keys are ignored, and
every node's ``data`` may carry a ``title`` (its ``node_name`` in events). Node types:

=================  ==========================================  ===============  ===========
type               data                                        input handles    output
=================  ==========================================  ===============  ===========
``input.string``   ``name`` (the input), ``value`` (default)   --               str
``input.number``   ``name``, ``value`` (default)               --               number
``template``       ``template``: text with ``{handle}`` slots  one per slot *    str
``chat``           ``model`` (default ``echo``), ``system``    ``prompt`` *,    str (reply)
                                                               ``system``
``tool``           ``name`` (a server tool), ``args`` (dict)   any: an argument any (result)
``output``         ``name`` (the result key)                   ``value`` *      --
=================  ==========================================  ===============  ===========

(* required: a graph without an edge into it is rejected.) An input node takes its value
from the job's inputs by ``name``, else from ``data.value``; inputs no node names are
ignored (a ``/chat`` turn passes ``message`` and ``messages``). A placeholder is
``{identifier}``; other braces are literal. A value that is not a string becomes JSON text
where a string is needed; a ``number`` can never feed a ``str`` handle (rejected at load).
Independent branches run concurrently: one task per node, awaiting its predecessors.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import hashlib
import heapq
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import re
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wirechat.engine.chat import ChatMessage, ChatRequest, Finish, ProviderError, TextDelta
from wirechat.engine.config import StaticKey
from wirechat.engine.limits import Admission, Ticket

from .registry import ProviderRouter
from .tools import ToolRegistry

__all__ = [
    "MAX_ERROR_CHARS",
    "NODE_TYPES",
    "NodeHandle",
    "Workflow",
    "WorkflowContext",
    "WorkflowError",
    "WorkflowInfo",
    "WorkflowRegistry",
    "execute",
    "graph_workflow",
    "workflow",
]

logger = logging.getLogger("wirechat.providers")

# NodeTool truncates error texts to 1000 characters (nodetool-spec.md §4.3).
MAX_ERROR_CHARS = 1000
NODE_TYPES = ("input.string", "input.number", "template", "chat", "tool", "output")

Event = dict[str, Any]
RunFunction = Callable[["WorkflowContext", dict[str, Any]], Awaitable[dict[str, Any] | None]]
F = TypeVar("F", bound=Callable[..., Any])

_STR, _NUMBER, _ANY = "str", "number", "any"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_END = object()  # closes an input stream
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# The node whose block is running, per task: the default node of progress and output events.
_current_node: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "wirechat_workflow_node", default=None
)


class WorkflowError(ValueError):
    """An invalid workflow definition (the message names the node) or spec to load."""


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    """What a client may know about a workflow (``GET /workflows``)."""

    id: str
    name: str
    description: str
    inputs: tuple[str, ...]


@dataclass
class Workflow:
    """A runnable workflow: ``run(ctx, inputs)`` returns a dict merged into the result, or None."""

    id: str
    name: str
    description: str
    inputs: tuple[str, ...]
    run: RunFunction

    @property
    def info(self) -> WorkflowInfo:
        return WorkflowInfo(
            id=self.id, name=self.name, description=self.description, inputs=self.inputs
        )


def workflow(
    *, id: str | None = None, name: str | None = None, inputs: Iterable[str] = ()
) -> Callable[[F], F]:
    """Set the attributes :meth:`WorkflowRegistry.add` reads (``workflow_id`` and so on)."""

    def mark(function: F) -> F:
        if id is not None:
            function.workflow_id = id  # type: ignore[attr-defined]
        if name is not None:
            function.workflow_name = name  # type: ignore[attr-defined]
        function.workflow_inputs = tuple(inputs)  # type: ignore[attr-defined]
        return function

    return mark


# --- the context a running workflow sees --------------------------------------------------


@dataclass
class NodeHandle:
    """The block of :meth:`WorkflowContext.node`; set ``result`` to report it when it completes."""

    node_id: str
    node_name: str
    node_type: str
    result: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class JobLimits:
    """How a job's own model calls are admitted: each ``ctx.chat`` is a generation, counted
    against the process's in-flight limit and the limits of the key that started the job."""

    admission: Admission
    key: StaticKey | None = None

    @contextlib.contextmanager
    def generation(self, model: str) -> Iterator[Ticket]:
        """Admit one model call, or raise the ``ProviderError`` a client would get
        (403 ``model_not_allowed``, 429, 503); the ticket goes back when the block ends."""
        key = self.key
        limits = key.limits if key is not None else None
        if limits is not None and not limits.allows_model(model):
            raise ProviderError(
                f"This key may not use the model `{model}`.", status=403, code="model_not_allowed"
            )
        admitted = self.admission.admit(key.key_id if key else None, limits, time.time())
        if not isinstance(admitted, Ticket):
            raise ProviderError(
                admitted.message,
                status=admitted.status,
                type="rate_limit" if admitted.status == 429 else "service_unavailable",
                code="rate_limit_exceeded" if admitted.status == 429 else "server_overloaded",
                retry_after=admitted.retry_after,
            )
        try:
            yield admitted
        finally:
            self.admission.release(admitted)


class WorkflowContext:
    """What a running workflow may do; made by the job runner, one per job."""

    def __init__(
        self,
        *,
        job_id: str,
        workflow_id: str,
        user_id: str,
        router: ProviderRouter,
        tools: ToolRegistry,
        emit: Callable[[Event], None] | None = None,
        inputs: Iterable[str] = (),
        limits: JobLimits | None = None,
    ) -> None:
        self.job_id = job_id
        self.workflow_id = workflow_id
        self.user_id = user_id
        self.result: dict[str, list[Any]] = {}  # output name -> every value sent to it
        self._router = router
        self._tools = tools
        self._limits = limits  # None: model calls are not metered (a context made by hand)
        self._emit_to = emit
        self._declared = frozenset(inputs)
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._ended: set[str] = set()
        self._cancelled = False

    # events

    def emit(self, event: Event) -> None:
        """Send ``event`` (tagged with ``job_id`` and ``workflow_id``) to the sink."""
        event["job_id"] = self.job_id
        event["workflow_id"] = self.workflow_id
        if self._emit_to is not None:
            self._emit_to(event)

    def progress(self, progress: float, total: float, *, node_id: str | None = None) -> None:
        """Report ``progress`` of ``total`` (a ``node_progress`` event)."""
        self.emit(
            {
                "type": "node_progress",
                "node_id": node_id or self._node()[0],
                "progress": progress,
                "total": total,
                "chunk": "",
            }
        )

    def output(self, name: str, value: Any, *, node_id: str | None = None) -> None:
        """Add ``value`` to the output ``name`` (``result[name]``) and send ``output_update``."""
        self.result.setdefault(name, []).append(value)
        current = _current_node.get()
        if current is not None and node_id in (None, current[0]):
            node_id, node_name = current
        else:
            node_id, node_name = node_id or self.workflow_id, name
        self.emit(
            {
                "type": "output_update",
                "node_id": node_id,
                "node_name": node_name,
                "output_name": name,
                "value": value,
                "output_type": _output_type(value),
                "metadata": {},
            }
        )

    @contextlib.contextmanager
    def node(self, node_id: str, name: str, node_type: str) -> Iterator[NodeHandle]:
        """A block reported as one node: ``node_update`` running, then completed or error.

        Progress and outputs inside the block default to this node. A cancelled block sends
        nothing more (the job's ``cancelled`` update says it all).
        """
        handle = NodeHandle(node_id=node_id, node_name=name, node_type=node_type)
        self._node_update(handle, "running")
        token = _current_node.set((node_id, name))
        try:
            yield handle
        except Exception as error:
            self._node_update(handle, "error", error=_error_text(error))
            raise
        else:
            self._node_update(handle, "completed", result=handle.result)
        finally:
            _current_node.reset(token)

    def _node_update(self, handle: NodeHandle, status: str, **extra: Any) -> None:
        event: Event = {
            "type": "node_update",
            "node_id": handle.node_id,
            "node_name": handle.node_name,
            "node_type": handle.node_type,
            "status": status,
        }
        event.update((key, value) for key, value in extra.items() if value is not None)
        self.emit(event)

    def _node(self) -> tuple[str, str]:
        return _current_node.get() or (self.workflow_id, self.workflow_id)

    # the outside world

    async def chat(self, model: str, messages: str | list[dict[str, Any]]) -> str:
        """The reply of ``model`` to ``messages`` (a string is one user message).

        Raises:
            ProviderError: the model call failed.
            ValueError: a message that is not ``{"role", "content"}``.
        """
        request = ChatRequest(model=model, messages=_chat_messages(messages), stream=False)
        with self._limits.generation(model) if self._limits else contextlib.nullcontext() as ticket:
            stream = self._router.stream(request)
            parts: list[str] = []
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    if isinstance(item, TextDelta):
                        parts.append(item.text)
                    elif isinstance(item, Finish) and item.usage is not None and ticket:
                        ticket.tokens = item.usage.total_tokens  # charged on release
        return "".join(parts)

    async def tool(self, name: str, args: dict[str, Any]) -> Any:
        """The result of the server tool ``name`` (raises ``ToolError`` or the tool's error)."""
        return await self._tools.run(name, args)

    @property
    def cancelled(self) -> bool:
        """Whether the job was asked to stop."""
        return self._cancelled

    def request_cancel(self) -> None:
        """Mark the job cancelled (the job runner then cancels its task)."""
        self._cancelled = True

    # streamed inputs

    def input_stream(self, name: str) -> AsyncIterator[Any]:
        """The values fed to input ``name`` (``stream_input``), until ``end_input_stream``.

        Values fed before this call are kept, so none is lost to a race with the client.
        """
        queue = self._streams.setdefault(name, asyncio.Queue())
        return _drain(queue)

    def accepts_input(self, name: str) -> bool:
        """Whether ``name`` is a declared input or a stream the workflow opened."""
        return name in self._declared or name in self._streams

    def feed_input(self, name: str, value: Any) -> str | None:
        """Queue ``value`` for ``input_stream(name)``; None, or why it was refused."""
        if not self.accepts_input(name):
            return "Invalid input name"
        if name in self._ended:
            return "Input stream already ended"
        self._streams.setdefault(name, asyncio.Queue()).put_nowait(value)
        return None

    def end_input(self, name: str) -> str | None:
        """End ``input_stream(name)`` (again: a no-op); None, or why it was refused."""
        if not self.accepts_input(name):
            return "Invalid input name"
        if name not in self._ended:
            self._ended.add(name)
            self._streams.setdefault(name, asyncio.Queue()).put_nowait(_END)
        return None


async def _drain(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        value = await queue.get()
        if value is _END:
            queue.put_nowait(_END)  # a second reader of the same stream ends too
            return
        yield value


def _chat_messages(messages: str | Sequence[Any]) -> tuple[ChatMessage, ...]:
    if isinstance(messages, str):
        return (ChatMessage(role="user", content=messages),)
    made: list[ChatMessage] = []
    for message in messages:
        if isinstance(message, ChatMessage):
            made.append(message)
            continue
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in _ROLES or not (content is None or isinstance(content, str | list)):
            raise ValueError(f"not a chat message: {message!r}")
        made.append(ChatMessage(role=role, content=content))
    return tuple(made)


def _output_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        kind = value.get("type")
        return kind if isinstance(kind, str) else "dict"
    return "none" if value is None else "any"


def _error_text(error: BaseException) -> str:
    return (str(error) or type(error).__name__)[:MAX_ERROR_CHARS]


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, default=str)


async def execute(
    workflow: Workflow, ctx: WorkflowContext, inputs: dict[str, Any]
) -> dict[str, Any]:
    """Run ``workflow`` to its end: its outputs (name -> values) merged with what it returned.

    Raises:
        TypeError: the workflow returned something other than a dict or None.
        Exception: whatever the workflow raised.
    """
    returned = await workflow.run(ctx, dict(inputs))
    result: dict[str, Any] = {name: list(values) for name, values in ctx.result.items()}
    if returned is not None:
        if not isinstance(returned, dict):
            raise TypeError(
                f"workflow {workflow.id!r} returned {type(returned).__name__}, not a dict or None"
            )
        result.update(returned)
    return result


# --- the registry --------------------------------------------------------------------------


class WorkflowRegistry:
    """The workflows by id, in the order they were added."""

    def __init__(self, workflows: Iterable[Workflow | RunFunction] = ()) -> None:
        self._workflows: dict[str, Workflow] = {}
        for item in workflows:
            self.add(item)

    def __len__(self) -> int:
        return len(self._workflows)

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._workflows

    def __iter__(self) -> Iterator[Workflow]:
        return iter(list(self._workflows.values()))

    def add(self, workflow_or_function: Workflow | RunFunction) -> Workflow:
        """Register a :class:`Workflow` or an ``async def name(ctx, inputs)`` and return it.

        A function's id is its ``workflow_id`` attribute, else its ``__name__``; its name the
        ``workflow_name`` attribute, else the id; its description the docstring's first
        paragraph; its inputs the ``workflow_inputs`` attribute (see :func:`workflow`).

        Raises:
            WorkflowError: not a workflow, or another workflow already has that id.
        """
        item = _as_workflow(workflow_or_function)
        existing = self._workflows.get(item.id)
        if existing is not None and existing is not item:
            raise WorkflowError(f"a workflow with id {item.id!r} is already registered")
        self._workflows[item.id] = item
        return item

    def get(self, workflow_id: str) -> Workflow | None:
        return self._workflows.get(workflow_id)

    def list(self) -> list[WorkflowInfo]:
        return [item.info for item in self._workflows.values()]

    def load(self, spec: str) -> builtins.list[Workflow]:
        """Add the workflows of ``spec``: ``FILE.json`` (a graph), ``module:attr`` or
        ``path/to/file.py:attr``; ``attr`` (dotted) is a function, a Workflow or a list of
        them. Either all of them are added or none.

        Raises:
            WorkflowError: an unreadable or invalid spec, file or graph, or an id taken.
        """
        spec = spec.strip()
        if spec.lower().endswith(".json"):
            path = Path(spec)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise WorkflowError(f"workflow graph {spec}: cannot read it: {error}") from None
            if not isinstance(data, dict):
                raise WorkflowError(f"workflow graph {spec}: not a JSON object")
            loaded = [graph_workflow(data, source=spec)]
        else:
            loaded = [_as_workflow(item) for item in _import_target(spec)]
        taken = {**self._workflows}
        for item in loaded:
            if taken.setdefault(item.id, item) is not item:
                raise WorkflowError(f"workflow spec {spec!r}: the id {item.id!r} is already taken")
        for item in loaded:
            self.add(item)
        return loaded

    def load_entry_points(self, group: str = "wirechat.workflows") -> builtins.list[Workflow]:
        """Add the workflows installed packages declare in the entry point ``group``.

        A broken entry point is logged and skipped: one bad package must not keep the
        server from starting.
        """
        loaded: list[Workflow] = []
        for entry_point in importlib.metadata.entry_points(group=group):
            try:
                targets = _targets_of(entry_point.load())
                items = [_as_workflow(target) for target in targets]
                for item in items:
                    if item.id in self._workflows and self._workflows[item.id] is not item:
                        raise WorkflowError(f"the id {item.id!r} is already taken")
            except Exception as error:
                logger.warning("workflow entry point %r skipped: %s", entry_point.name, error)
                continue
            for item in items:
                loaded.append(self.add(item))
        return loaded


def _as_workflow(value: Any) -> Workflow:
    if isinstance(value, Workflow):
        return value
    if not inspect.iscoroutinefunction(value):
        raise WorkflowError(
            f"{value!r} is not a workflow: expected a Workflow or an async def (ctx, inputs)"
        )
    workflow_id = getattr(value, "workflow_id", None) or value.__name__
    if not isinstance(workflow_id, str):
        raise WorkflowError(f"{value!r}: workflow_id must be a string")
    inputs = getattr(value, "workflow_inputs", ())
    if isinstance(inputs, str) or not all(isinstance(name, str) for name in inputs):
        raise WorkflowError(f"workflow {workflow_id!r}: workflow_inputs must be a tuple of names")
    doc = inspect.getdoc(value) or ""
    return Workflow(
        id=workflow_id,
        name=str(getattr(value, "workflow_name", None) or workflow_id),
        description=doc.split("\n\n", 1)[0].replace("\n", " ").strip(),
        inputs=tuple(inputs),
        run=value,
    )


def _import_target(spec: str) -> list[Any]:
    module_part, colon, attr_path = spec.rpartition(":")
    if not colon or not module_part.strip() or not attr_path.strip():
        raise WorkflowError(
            f"bad workflow spec {spec!r}: expected module:attr, file.py:attr or file.json"
        )
    module_part, attr_path = module_part.strip(), attr_path.strip()
    try:
        if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
            target: Any = _import_file(Path(module_part))
        else:
            target = importlib.import_module(module_part)
    except Exception as error:
        # Any import-time failure: the CLI reports one clear line.
        raise WorkflowError(
            f"workflow spec {spec!r}: cannot import {module_part!r}: {error}"
        ) from error
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise WorkflowError(
                f"workflow spec {spec!r}: {module_part!r} has no attribute {attr_path!r}"
            ) from None
    try:
        return [_as_workflow(item) for item in _targets_of(target)]
    except WorkflowError as error:
        raise WorkflowError(f"workflow spec {spec!r}: {error}") from None


def _targets_of(target: Any) -> list[Any]:
    if isinstance(target, WorkflowRegistry):
        return list(target)
    if isinstance(target, list | tuple):
        return list(target)
    return [target]


def _import_file(path: Path) -> Any:
    """The module at ``path``, imported once per resolved path under a private name."""
    resolved = path.resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"_wirechat_workflows_{re.sub(r'[^A-Za-z0-9_]', '_', resolved.stem)}_{digest}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# --- JSON graphs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    id: str
    type: str
    title: str
    data: dict[str, Any]
    inputs: dict[str, str] | None  # handle -> type; None: any handle (tool arguments)
    required: frozenset[str]
    output: str | None  # the type of the "output" handle; None: no output


@dataclass(frozen=True, slots=True)
class _Graph:
    nodes: dict[str, _Node]
    incoming: dict[str, dict[str, str]]  # node -> handle -> source node
    order: tuple[str, ...] = field(default=())

    async def run(self, ctx: WorkflowContext, inputs: dict[str, Any]) -> None:
        failures: list[BaseException] = []
        tasks: dict[str, asyncio.Task[Any]] = {}

        async def run_node(node: _Node) -> Any:
            values = {h: await tasks[src] for h, src in self.incoming[node.id].items()}
            with ctx.node(node.id, node.title, node.type) as handle:
                try:
                    value = await _run_node(ctx, node, values, inputs)
                except Exception as error:
                    failures.append(error)
                    raise
                if node.output is not None:
                    handle.result = {"output": value}
            return value

        for node_id in self.order:
            tasks[node_id] = asyncio.create_task(
                run_node(self.nodes[node_id]), name=f"wirechat-node-{ctx.job_id}-{node_id}"
            )
        try:
            await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        if failures:
            raise failures[0]


async def _run_node(
    ctx: WorkflowContext, node: _Node, values: dict[str, Any], inputs: dict[str, Any]
) -> Any:
    data = node.data
    match node.type:
        case "input.string" | "input.number":
            name = data["name"]
            if name in inputs:
                value = inputs[name]
            elif "value" in data:
                value = data["value"]
            else:
                raise WorkflowError(f"node {node.id!r}: no value for the input {name!r}")
            return _as_text(value) if node.type == "input.string" else _as_number(node, value)
        case "template":
            return _PLACEHOLDER.sub(lambda m: _as_text(values[m.group(1)]), data["template"])
        case "chat":
            messages: list[dict[str, Any]] = []
            system = values.get("system", data.get("system"))
            if system is not None:
                messages.append({"role": "system", "content": _as_text(system)})
            messages.append({"role": "user", "content": _as_text(values["prompt"])})
            return await ctx.chat(data.get("model", "echo"), messages)
        case "tool":
            return await ctx.tool(data["name"], {**data.get("args", {}), **values})
        case _:  # output
            ctx.output(data["name"], values["value"], node_id=node.id)
            return None


def _as_number(node: _Node, value: Any) -> int | float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
        with contextlib.suppress(ValueError):
            return float(value)
    raise WorkflowError(
        f"node {node.id!r}: input {node.data['name']!r} needs a number, not {value!r}"
    )


def graph_workflow(data: dict[str, Any], *, source: str = "<graph>") -> Workflow:
    """Validate the JSON graph ``data`` (format: module docstring) and make it a Workflow.

    Raises:
        WorkflowError: the graph is invalid; the message names ``source`` and the node.
    """
    try:
        return _compile_graph(data, source)
    except WorkflowError as error:
        raise WorkflowError(f"workflow graph {source}: {error}") from None


def _compile_graph(data: dict[str, Any], source: str) -> Workflow:
    if not isinstance(data, dict):
        raise WorkflowError("a graph must be a JSON object")
    workflow_id = data.get("id")
    if workflow_id is None and source.lower().endswith(".json"):
        workflow_id = Path(source).stem
    if not isinstance(workflow_id, str) or not workflow_id:
        raise WorkflowError("the graph needs a string 'id'")
    name = data.get("name") or workflow_id
    description = data.get("description") or ""
    raw_nodes, raw_edges = data.get("nodes"), data.get("edges", [])
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise WorkflowError("'nodes' must be a non-empty list")
    if not isinstance(raw_edges, list):
        raise WorkflowError("'edges' must be a list")

    nodes: dict[str, _Node] = {}
    for index, raw in enumerate(raw_nodes):
        node = _compile_node(raw, index)
        if node.id in nodes:
            raise WorkflowError(f"node {node.id!r}: duplicate node id")
        nodes[node.id] = node

    incoming: dict[str, dict[str, str]] = {node_id: {} for node_id in nodes}
    for index, raw in enumerate(raw_edges):
        _add_edge(nodes, incoming, raw, index)
    order = _topological_order(nodes, incoming)
    for node in nodes.values():
        for handle in sorted(node.required - incoming[node.id].keys()):
            raise WorkflowError(
                f"node {node.id!r} ({node.type}): the required input {handle!r} has no edge"
            )
    graph = _Graph(nodes=nodes, incoming=incoming, order=order)
    inputs = tuple(
        dict.fromkeys(n.data["name"] for n in nodes.values() if n.type.startswith("input."))
    )
    return Workflow(
        id=workflow_id,
        name=str(name),
        description=str(description),
        inputs=inputs,
        run=graph.run,
    )


def _compile_node(raw: Any, index: int) -> _Node:
    if not isinstance(raw, dict):
        raise WorkflowError(f"nodes[{index}] is not an object")
    node_id = raw.get("id")
    if not isinstance(node_id, str) or not node_id:
        raise WorkflowError(f"nodes[{index}] needs a non-empty string 'id'")
    node_type = raw.get("type")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise WorkflowError(f"node {node_id!r}: 'data' must be an object")
    where = f"node {node_id!r} ({node_type})"

    def text(key: str, *, required: bool = False) -> str | None:
        value = data.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or (required and not value):
            raise WorkflowError(f"{where}: data.{key} must be a non-empty string")
        return value

    inputs: dict[str, str] | None
    required: frozenset[str] = frozenset()
    output: str | None = None
    title = text("title")
    match node_type:
        case "input.string" | "input.number":
            name = text("name", required=True)
            output = _STR if node_type == "input.string" else _NUMBER
            default = data.get("value")
            if default is not None and (
                not isinstance(default, str)
                if output == _STR
                else not isinstance(default, int | float) or isinstance(default, bool)
            ):
                raise WorkflowError(f"{where}: data.value must be a {output}, not {default!r}")
            inputs, title = {}, title or name
        case "template":
            template = text("template", required=True)
            assert template is not None
            inputs = dict.fromkeys(_PLACEHOLDER.findall(template), _ANY)
            required, output = frozenset(inputs), _STR
        case "chat":
            text("model")
            text("system")
            inputs = {"prompt": _STR, "system": _STR}
            required, output = frozenset({"prompt"}), _STR
        case "tool":
            text("name", required=True)
            if not isinstance(data.get("args", {}), dict):
                raise WorkflowError(f"{where}: data.args must be an object")
            inputs, output = None, _ANY
        case "output":
            title = title or text("name", required=True)
            inputs, required = {"value": _ANY}, frozenset({"value"})
        case _:
            raise WorkflowError(
                f"node {node_id!r}: unknown node type {node_type!r} "
                f"(known: {', '.join(NODE_TYPES)})"
            )
    return _Node(
        id=node_id,
        type=node_type,
        title=title or node_id,
        data=data,
        inputs=inputs,
        required=required,
        output=output,
    )


def _add_edge(
    nodes: dict[str, _Node], incoming: dict[str, dict[str, str]], raw: Any, index: int
) -> None:
    if not isinstance(raw, dict):
        raise WorkflowError(f"edges[{index}] is not an object")
    source, target = raw.get("source"), raw.get("target")
    source_handle = raw.get("sourceHandle") or "output"
    target_handle = raw.get("targetHandle")
    if source not in nodes:
        raise WorkflowError(
            f"edges[{index}] into node {target!r}: the source node {source!r} does not exist"
        )
    if target not in nodes:
        raise WorkflowError(
            f"edges[{index}] from node {source!r}: the target node {target!r} does not exist"
        )
    src, dst = nodes[source], nodes[target]
    if src.output is None or source_handle != "output":
        raise WorkflowError(
            f"node {source!r} ({src.type}) has no output handle {source_handle!r} "
            f"(edge to {target!r})"
        )
    if not isinstance(target_handle, str) or not target_handle:
        raise WorkflowError(f"node {target!r}: edges[{index}] from {source!r} has no targetHandle")
    if dst.inputs is not None and target_handle not in dst.inputs:
        known = ", ".join(repr(h) for h in dst.inputs) or "none"
        raise WorkflowError(
            f"node {target!r} ({dst.type}) has no input handle {target_handle!r} "
            f"(edge from {source!r}; its inputs: {known})"
        )
    if target_handle in incoming[target]:
        raise WorkflowError(f"node {target!r}: the input {target_handle!r} has more than one edge")
    wanted = _ANY if dst.inputs is None else dst.inputs[target_handle]
    if wanted != _ANY and src.output not in (wanted, _ANY):
        raise WorkflowError(
            f"node {target!r} ({dst.type}): the input {target_handle!r} takes a {wanted}, "
            f"but node {source!r} ({src.type}) gives a {src.output}"
        )
    incoming[target][target_handle] = source


def _topological_order(
    nodes: dict[str, _Node], incoming: dict[str, dict[str, str]]
) -> tuple[str, ...]:
    """The nodes, each after its predecessors, else in file order; a cycle raises."""
    position = {node_id: index for index, node_id in enumerate(nodes)}
    waiting = {node_id: len(set(incoming[node_id].values())) for node_id in nodes}
    successors: dict[str, set[str]] = {node_id: set() for node_id in nodes}
    for target, handles in incoming.items():
        for source in handles.values():
            successors[source].add(target)
    ready = [(position[node_id], node_id) for node_id, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        node_id = heapq.heappop(ready)[1]
        order.append(node_id)
        for successor in successors[node_id]:
            waiting[successor] -= 1
            if waiting[successor] == 0:
                heapq.heappush(ready, (position[successor], successor))
    if len(order) == len(nodes):
        return tuple(order)
    # Every node left has a predecessor that is left too: walking back must repeat a node.
    left = {node_id for node_id in nodes if node_id not in order}
    path: list[str] = [next(node_id for node_id in nodes if node_id in left)]
    while True:
        before = next(s for s in incoming[path[-1]].values() if s in left)
        if before in path:
            cycle = path[path.index(before) :][::-1]
            break
        path.append(before)
    loop = " -> ".join(repr(node_id) for node_id in [*cycle, cycle[0]])
    raise WorkflowError(f"node {cycle[0]!r} is on a cycle: {loop}")
