"""Every limit, timeout and policy of the engine, in one frozen object.

Rules of this module:

* The transport builds one :class:`EngineConfig` (from flags and the environment) and
  passes it through untouched; nothing else in the code base holds a limit of its own.
* Sizes are bytes, times are seconds. Defaults are those of PROTOCOL.md §6.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from .chat import ToolSpec, WorkflowSpec
from .limits import KeyLimits
from .playground import Playground


class AuthMode(StrEnum):
    NONE = "none"
    LOCAL = "local"
    STATIC = "static"
    SUPABASE = "supabase"

    @property
    def enforced(self) -> bool:
        return self in (AuthMode.STATIC, AuthMode.SUPABASE)


class MetricsAccess(StrEnum):
    """Who may read ``GET /metrics``."""

    OFF = "off"  # not served: a 404
    AUTH = "auth"  # the same auth as the API (none needed unless auth is enforced)
    PUBLIC = "public"  # no auth, like /health


class Surface(StrEnum):
    """Which set of endpoints a server exposes (one per CLI command)."""

    SERVE = "serve"  # everything
    CHAT_SERVER = "chat-server"  # OpenAI endpoints and /health
    WORKER = "worker"  # OpenAI endpoints, /predict, /health, /ping


def token_digest(token: str) -> bytes:
    """The form a static token is kept in: we never hold the token itself longer than needed."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticKey:
    """One accepted static token: its SHA-256 digest and the user id it stands for."""

    digest: bytes
    user_id: str
    limits: KeyLimits | None = None  # models, rates and streams this key may use

    @classmethod
    def from_token(
        cls, token: str, name: str | None = None, limits: KeyLimits | None = None
    ) -> StaticKey:
        digest = token_digest(token)
        # The user id is the key's name when it has one, else a stable digest of the token:
        # never the token itself (PROTOCOL.md §3).
        return cls(digest=digest, user_id=name or "key-" + digest.hex()[:16], limits=limits)

    @property
    def key_id(self) -> str:
        """Names this key's rate-limit state (two keys sharing a name keep their own)."""
        return self.digest.hex()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    # HTTP head: total bytes (431), request line (414), field count (431), one field (431).
    max_head_bytes: int = 16 * 1024
    max_request_line_bytes: int = 8 * 1024
    max_header_count: int = 100
    max_header_field_bytes: int = 8 * 1024
    # Request body (413); h11 has no limit of its own.
    max_body_bytes: int = 8 * 1024 * 1024
    # Bytes a client may pipeline ahead of the request being answered before we stop reading.
    max_pipelined_bytes: int = 64 * 1024
    # WebSocket message (1009) and JSON/MessagePack nesting depth.
    max_ws_message_bytes: int = 16 * 1024 * 1024
    max_depth: int = 64

    # Deadlines. head: from the first byte of a request head to its end (408).
    head_timeout: float = 10.0
    # body: the longest pause between two reads of a request body (408).
    body_timeout: float = 30.0
    # keep-alive: how long an idle connection is kept between requests (silent close).
    keepalive_timeout: float = 5.0
    # provider: until the first item, and between two items (504 / mid-stream error).
    provider_first_item_timeout: float = 300.0
    provider_idle_timeout: float = 120.0
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    # After our Close frame, how long the peer has to answer before the socket is dropped.
    ws_close_timeout: float = 10.0
    # /chat: how long a client-side tool may take, and how many tool rounds one turn may run.
    client_tool_timeout: float = 60.0
    tool_timeout: float = 60.0  # a server tool that hangs is cancelled and reported failed
    max_tool_rounds: int = 10
    shutdown_grace: float = 30.0
    # Used by the transport: the longest a write may wait for a client that does not read
    # before the connection is dropped (nginx send_timeout).
    send_timeout: float = 60.0
    # supabase auth: the longest a request (or a WebSocket, after its 101) waits for the
    # provider's verdict on a token before it is refused as unavailable (503 / close 1011).
    auth_timeout: float = 10.0
    # Admission control: generations (completions, /chat turns) in flight in one process
    # before new ones get 503 with Retry-After instead of queueing without bound. 0: none.
    max_inflight_generations: int = 1024

    # Policies.
    surface: Surface = Surface.SERVE
    auth_mode: AuthMode = AuthMode.LOCAL
    static_keys: tuple[StaticKey, ...] = ()
    cors_origins: tuple[str, ...] = ()
    default_model: str = "echo"
    # The server-side tools (name, description, JSON schema) a /chat message may enable;
    # the transport fills it from the tool registry. Data only: the engine never runs them.
    server_tools: tuple[ToolSpec, ...] = ()
    # The workflows /predict, /chat (workflow_id) and /workflows may run; filled likewise.
    workflows: tuple[WorkflowSpec, ...] = ()
    server_name: str = "wirechat"
    # The web page served at GET / on the `serve` surface (the CLI loads it unless
    # --no-playground); None leaves / a 404.
    playground: Playground | None = None
    # GET /metrics (Prometheus text, rendered by the transport through RenderMetrics).
    metrics: MetricsAccess = MetricsAccess.AUTH

    def __post_init__(self) -> None:
        if self.max_head_bytes < 256:
            raise ValueError("max_head_bytes must be at least 256")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        for name in ("head_timeout", "body_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.auth_timeout <= 0:
            raise ValueError("auth_timeout must be positive")
        if self.max_inflight_generations < 0:
            raise ValueError("max_inflight_generations must not be negative")
