"""What the engine asks of the outside world (effects) and what it reports (notices).

Rules of this module:

* Every class is a frozen, slotted, keyword-only dataclass; the unions at the bottom list
  them all so the transport can ``match`` exhaustively.
* Effects have imperative names: the transport must carry them out. Notices have past-tense
  names: the transport may log or count them and otherwise ignore them.
* Work is correlated by ``stream_id``, a small integer unique within one connection. Results
  come back through ``ServerConnection.provider_*`` / ``models_listed`` with the same id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .chat import ChatMessage, ChatRequest
from .config import StaticKey


@dataclass(frozen=True, slots=True, kw_only=True)
class CallProvider:
    """Start a provider stream for ``request``; feed its items to ``provider_chunk``, its end
    to ``provider_done`` and its failure to ``provider_failed``. Pull the next item only
    after the socket has drained."""

    stream_id: int
    request: ChatRequest
    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelProvider:
    """Stop the provider stream (or model listing) ``stream_id``; report nothing more for it."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ListModels:
    """List the models of every provider; answer with ``models_listed`` or ``provider_failed``."""

    stream_id: int
    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenThread:
    """Load thread ``thread_id`` for ``user_id`` (creating it if new), after durably
    appending ``append``; answer with ``thread_opened`` (the whole history, oldest first)
    or ``store_failed`` (also when the thread belongs to another user)."""

    op_id: int
    thread_id: str
    user_id: str
    append: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveMessages:
    """Durably append ``messages`` to thread ``thread_id``; answer with ``messages_saved``
    or ``store_failed``."""

    op_id: int
    thread_id: str
    user_id: str
    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTool:
    """Run server tool ``name`` with ``arguments``; answer with ``tool_finished``."""

    op_id: int
    name: str
    arguments: dict[str, Any]
    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelTool:
    """Stop the tool run ``op_id``; report nothing more for it."""

    op_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartJob:
    """Start workflow ``workflow_id`` as job ``job_id`` (it outlives this connection) and feed
    its events to ``job_event`` on this connection, from the first one."""

    job_id: str
    workflow_id: str
    params: dict[str, Any]
    user_id: str
    # The static key the job was started with: the job's own model calls (``ctx.chat``)
    # are generations admitted against its limits, as the key's requests are.
    key: StaticKey | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobCommand:
    """Ask the job runner ``command`` (``cancel_job``, ``get_status``, ``reconnect_job``,
    ``stream_input``, ``end_input_stream``) about ``data``; answer with
    ``job_command_done(op_id, value)``. ``reconnect_job`` also feeds the job's later events
    to ``job_event`` on this connection, after the snapshot it answers with."""

    op_id: int
    command: str
    data: dict[str, Any]
    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelJob:
    """Cancel job ``job_id`` (its client went away or stopped it); no answer."""

    job_id: str
    user_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyToken:
    """Ask the auth provider (Supabase) whether ``token`` is valid; answer with
    ``token_verified(op_id, user_id)`` (``None``: refused) or ``token_check_failed`` (the
    provider could not be asked). The token is kept out of ``repr``: never log it."""

    op_id: int
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderMetrics:
    """Render the server's metrics (Prometheus text format) for ``GET /metrics``; answer
    with ``metrics_rendered(stream_id, body, content_type)``, on the spot if possible."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTransport:
    """Close the socket once ``data_to_send()`` has been written (``abort``: drop it now,
    without flushing, so the peer sees a truncated response)."""

    abort: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestCompleted:
    """One HTTP exchange ended (the access-log line). ``target`` has its query removed."""

    method: str
    target: str
    status: int
    request_id: str
    duration: float
    streamed: bool = False
    user_id: str | None = None
    # The endpoint's name (``routing.Endpoint`` value), "unknown" for an unrouted target:
    # a bounded label for metrics, unlike the path.
    route: str = "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestAbandoned:
    """The client closed the connection before the answer to a request it had sent was
    complete (cancelled model call included). ``record`` is the access-log line for it, with
    nginx's status 499 ("client closed request"); no reply was read for it."""

    record: RequestCompleted


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionFailed:
    """The peer broke the protocol; the engine has answered (if it could) and will close."""

    reason: str
    status: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstTokenSent:
    """The first content of an answer went out, ``waited`` seconds after the request (a
    streamed completion: its response head, with the first item) or the chat message (a
    ``/chat`` turn: its first text chunk) arrived. Once per answer, never per token."""

    route: str
    waited: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageReported:
    """A provider reported the token usage of a completion (HTTP: once per request, all
    choices summed) or of one model call of a ``/chat`` turn."""

    route: str
    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderFailed:
    """A model call (or model listing, with ``model`` empty) failed with the upstream
    ``status`` (504: the engine's own timeout); the client has been told."""

    route: str
    model: str
    status: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketClosed:
    """A ``/chat`` or ``/predict`` session ended after ``duration`` seconds: ``code`` is the
    close code sent or received (1006: the socket went away without one), ``turns`` the
    chat turns started on it."""

    endpoint: str
    duration: float
    code: int
    turns: int = 0
    user_id: str | None = None


Effect = (
    CallProvider
    | CancelProvider
    | ListModels
    | OpenThread
    | SaveMessages
    | RunTool
    | CancelTool
    | StartJob
    | JobCommand
    | CancelJob
    | VerifyToken
    | RenderMetrics
    | CloseTransport
)
Notice = (
    RequestCompleted
    | RequestAbandoned
    | ConnectionFailed
    | FirstTokenSent
    | UsageReported
    | ProviderFailed
    | WebSocketClosed
)
Output = Effect | Notice
