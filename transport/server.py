"""Listening sockets, the event loop, signals and graceful shutdown.

Rules of this module: it only owns lifecycles. ``Server`` binds, accepts (one
``EngineProtocol`` per connection) and shuts down: stop accepting, let the engine of every
connection finish what is in flight within the grace period, then drop what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from wirechat.engine import AuthMode, EngineConfig, MetricsAccess
from wirechat.engine.chat import WorkflowSpec
from wirechat.engine.limits import Admission
from wirechat.providers.jobs import JobManager
from wirechat.providers.registry import ProviderRouter
from wirechat.providers.supabase_auth import TokenVerifier
from wirechat.providers.threads import ThreadStore
from wirechat.providers.tools import ToolRegistry
from wirechat.providers.workflows import WorkflowRegistry

from .metrics import Metrics
from .protocol import EngineProtocol

ACCESS_LOG_FORMATS = ("plain", "json", "off")

logger = logging.getLogger("wirechat")


class Server:
    """One wirechat server: an engine config, the providers, and the sockets it listens on."""

    def __init__(
        self,
        config: EngineConfig,
        providers: ProviderRouter,
        *,
        tools: ToolRegistry | None = None,
        threads: ThreadStore | None = None,
        workflows: WorkflowRegistry | None = None,
        auth: TokenVerifier | None = None,
        access_log: str = "plain",
    ) -> None:
        if access_log not in ACCESS_LOG_FORMATS:
            raise ValueError(f"access_log must be one of {', '.join(ACCESS_LOG_FORMATS)}")
        if config.auth_mode is AuthMode.SUPABASE and auth is None:
            raise ValueError("auth mode supabase needs a token verifier (auth=SupabaseVerifier)")
        self.auth = auth  # judges the tokens that are no static key (supabase mode)
        self.tools = tools if tools is not None else ToolRegistry()
        self.providers = providers
        self.threads = threads if threads is not None else ThreadStore(":memory:")
        self.workflows = workflows if workflows is not None else WorkflowRegistry()
        self.jobs = JobManager(self.workflows, providers, self.tools)
        for workflow_tool in self.jobs.workflow_tools():
            self.tools.add(workflow_tool)  # a workflow offered to models as workflow_<id>
        # The engine knows the tools and workflows as data: names, schemas, inputs.
        self.config = replace(
            config,
            server_tools=self.tools.specs(),
            workflows=tuple(
                WorkflowSpec(id=w.id, name=w.name, description=w.description, inputs=w.inputs)
                for w in self.workflows.list()
            ),
        )
        # Rate limits and in-flight generations, shared by every connection of this process.
        self.admission = Admission(self.config.max_inflight_generations)
        self.connections: set[EngineProtocol] = set()
        # The wirechat.access lines: "plain", "json" (one JSON object a line) or "off".
        self.access_log = access_log
        # This server's own registry (never the process-wide default): see metrics.py.
        self.metrics = Metrics(self) if config.metrics is not MetricsAccess.OFF else None
        self._servers: list[asyncio.Server] = []

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        backlog: int = 2048,
    ) -> list[tuple[str, int]]:
        """Start listening; returns the bound (host, port) pairs (the real port for 0)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(
                lambda: EngineProtocol(self), sock=sock, backlog=backlog
            )
        else:
            server = await loop.create_server(
                lambda: EngineProtocol(self),
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=backlog,
            )
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight responses finish within the grace, then close."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.start_shutdown()
        # The engine ends each stream itself at the grace deadline; the extra second only
        # covers the last writes before we drop whatever is still open.
        deadline = time.monotonic() + self.config.shutdown_grace + 1.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await self.jobs.aclose()
        await self.providers.aclose()
        if self.auth is not None:
            await self.auth.aclose()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


def install_event_loop_policy() -> None:
    """Use uvloop where it is installed (not on Windows)."""
    if sys.platform == "win32":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    server: Server,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    sock: socket.socket | None = None,
    on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
) -> None:
    """Run ``server`` until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Not the main thread, or Windows: the embedding program handles signals itself.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    addresses = await server.start(host, port, sock=sock)
    if on_ready is not None:
        on_ready(addresses)
    await stop.wait()
    logger.info("shutting down: %d connection(s) open", len(server.connections))
    await server.shutdown()
