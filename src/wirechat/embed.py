"""Running wirechat inside an existing asyncio program.

Rules of this module: a thin convenience over ``wirechat.transport.server.Server``. It
builds the same objects the CLI builds (engine config, provider router, tools, thread
store, workflows) from Python values, listens, and shuts everything down on exit. Nothing
here is needed to use the engine itself: ``wirechat.engine.ServerConnection`` can be driven
by any I/O layer (see ``examples/blocking_server.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from wirechat.engine import EngineConfig
from wirechat.providers.base import ChatProvider
from wirechat.providers.echo import EchoProvider
from wirechat.providers.registry import ProviderRouter
from wirechat.providers.supabase_auth import TokenVerifier
from wirechat.providers.threads import ThreadStore
from wirechat.providers.tools import Tool, ToolRegistry, default_tools
from wirechat.providers.workflows import Workflow, WorkflowRegistry
from wirechat.transport.server import Server


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A server started by :func:`start`: where it listens and its parts."""

    host: str
    port: int
    server: Server

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (append ``/v1`` for an OpenAI client's ``base_url``)."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"


@contextlib.asynccontextmanager
async def start(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: EngineConfig | None = None,
    providers: Iterable[ChatProvider] | ProviderRouter | None = None,
    tools: Iterable[Tool | Callable[..., Any]] = (),
    workflows: Iterable[Workflow | Callable[..., Any]] = (),
    db: str = ":memory:",
    auth: TokenVerifier | None = None,
    access_log: str = "plain",
) -> AsyncIterator[RunningServer]:
    """Serve wirechat on ``host:port`` for the duration of the ``async with`` block.

    ``providers``: a router, or providers consulted in order (default: the ``echo`` model).
    ``tools`` and ``workflows`` are added to the built-in tools and to no workflows.
    ``db`` is the thread store's SQLite file (``":memory:"`` keeps nothing).
    ``auth`` judges tokens when ``config.auth_mode`` is ``supabase`` (a
    ``wirechat.providers.supabase_auth.SupabaseVerifier``); it is closed on exit.
    ``access_log``: the ``wirechat.access`` lines, ``"plain"``, ``"json"`` or ``"off"``.
    ``GET /metrics`` serves this server's own metrics (``config.metrics`` says who may).

    Example::

        async with wirechat.start(tools=[my_tool]) as running:
            client = AsyncOpenAI(base_url=running.base_url + "/v1", api_key="x")
    """
    if isinstance(providers, ProviderRouter):
        router = providers
    else:
        router = ProviderRouter(list(providers) if providers is not None else [EchoProvider()])
    registry: ToolRegistry = default_tools()
    for tool in tools:
        registry.add(tool)
    workflow_registry = WorkflowRegistry()
    for workflow in workflows:
        workflow_registry.add(workflow)
    threads = ThreadStore(db)
    server = Server(
        config or EngineConfig(),
        router,
        tools=registry,
        threads=threads,
        workflows=workflow_registry,
        auth=auth,
        access_log=access_log,
    )
    try:
        addresses = await server.start(host, port)
        bound_host, bound_port = addresses[0]
        yield RunningServer(host=bound_host, port=bound_port, server=server)
    finally:
        await server.shutdown()
        threads.close()
