"""One HTTP exchange (a request and its answer): its record, the headers every answer
carries, and the errors the connection answers with.

Rules of this module: plain data and pure functions. ``ServerConnection`` (connection.py)
owns the state machine and decides when each is used; nothing here keeps state.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from . import openai, sse
from .completion import CompletionRun
from .config import EngineConfig, StaticKey
from .errors import RequestError
from .events import RequestCompleted
from .http_response import response_head
from .limits import Admission, Ticket
from .routing import Endpoint, Route, split_target

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
EXPOSED_HEADERS = "x-request-id, openai-processing-ms, openai-version, retry-after, retry-after-ms"
AUTH_RETRY_AFTER = "2"  # seconds a client should wait when the auth provider is down


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(15)


@dataclass(slots=True)
class Exchange:
    """One request and its response."""

    method: str
    target: str
    started: float
    request_id: str
    origin: str | None
    requested_headers: bytes | None = None  # Access-Control-Request-Headers of a preflight
    host: str = ""  # the Host header: the playground's policy names it
    route: Route | None = None
    error: RequestError | None = None
    user_id: str | None = None
    ws_key: bytes | None = None  # a valid WebSocket upgrade's key
    ws_auth_failure: str | None = None  # the 1008 close reason, after the handshake
    ws_close_code: int = 1008  # 1011 when the auth provider could not judge the token
    key: StaticKey | None = None  # the static key the request came with: its limits apply
    ticket: Ticket | None = None  # an admitted generation (chat completion), until released
    body: bytearray = field(default_factory=bytearray)
    body_size: int = 0  # counted for every route: the limit holds even for a body we drop
    stream_id: int | None = None
    run: CompletionRun | None = None
    job_id: str | None = None  # a workflow run over HTTP
    job_result: dict[str, object] | None = None
    status: int = 0
    keep_alive: bool = True  # the client lets the connection live on (http_response.py)
    chunked: bool = True  # a streamed body's framing: chunked, or to the close (HTTP/1.0)


def access_record(ex: Exchange, status: int, now: float, *, streamed: bool) -> RequestCompleted:
    """The access-log record of an exchange."""
    path, _ = split_target(ex.target)  # never log a query: it may carry a token
    return RequestCompleted(
        method=ex.method,
        target=path,
        status=status,
        request_id=ex.request_id,
        duration=max(0.0, now - ex.started),
        streamed=streamed,
        user_id=ex.user_id,
        route=ex.route.endpoint.value if ex.route is not None else "unknown",
    )


def auth_error(failure: str) -> RequestError:
    if failure == "missing":
        message = (
            "You didn't provide an API key. You need to provide your API key in an"
            " Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = "Incorrect API key provided."
    return RequestError(message, status=401, code="invalid_api_key")


def auth_unavailable(message: str) -> RequestError:
    # Never "let everyone in": the client is told to come back (PROTOCOL.md §3).
    detail = f": {message}" if message else ""
    return RequestError(
        f"The API key could not be verified{detail}. Try again later.",
        status=503,
        type="service_unavailable",
        code="auth_unavailable",
        headers=(("retry-after", AUTH_RETRY_AFTER),),
    )


def model_not_found(model: str) -> RequestError:
    return RequestError(
        f"The model `{model}` does not exist or you do not have access to it.",
        status=404,
        param="model",
        code="model_not_found",
    )


def fatal_response(status: int, message: str, request_id: str, *, head_only: bool) -> bytes:
    """A complete error response written without h11, whose state may be broken by now."""
    error = RequestError(message, status=status, code=None)
    # To a HEAD no body may follow; "content-length: 0" keeps the framing true both for the
    # client that sent HEAD and for one that cannot tell what a refused request was.
    body = b"" if head_only else sse.dumps(openai.error_body(error))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-request-id", request_id.encode("ascii")),
        (b"connection", b"close"),
    ]
    return response_head(status, headers) + body


# --- the headers of an answer ------------------------------------------------------------


def answer_headers(
    ex: Exchange,
    content_type: bytes | None,
    now: float,
    config: EngineConfig,
    admission: Admission,
) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries (OpenAI's, the key's rate limits, CORS)."""
    elapsed = max(0, int((now - ex.started) * 1000))
    headers = [
        (b"x-request-id", ex.request_id.encode("ascii")),
        (b"openai-version", b"2020-10-01"),
        (b"openai-processing-ms", str(elapsed).encode("ascii")),
        (b"server", config.server_name.encode("latin-1")),
    ]
    if content_type is not None:
        headers.insert(0, (b"content-type", content_type))
    key, route = ex.key, ex.route
    if key is not None and route is not None and route.endpoint is Endpoint.CHAT_COMPLETIONS:
        headers += admission.headers(key.key_id, key.limits, now)
    allowed = allowed_origin(ex, config)
    if allowed is not None:
        headers += [
            (b"access-control-allow-origin", allowed.encode("latin-1")),
            (b"access-control-expose-headers", EXPOSED_HEADERS.encode("ascii")),
            (b"vary", b"origin"),
        ]
    return headers


def allowed_origin(ex: Exchange, config: EngineConfig) -> str | None:
    """The ``Access-Control-Allow-Origin`` the request's Origin gets, if any."""
    origins = config.cors_origins
    if not origins or ex.origin is None:
        return None
    if "*" in origins:
        return "*"
    return ex.origin if ex.origin in origins else None


def preflight_headers(ex: Exchange, config: EngineConfig) -> list[tuple[bytes, bytes]]:
    """The CORS grant of a preflight (none for an origin not configured)."""
    if allowed_origin(ex, config) is None:
        return []
    # The path's own methods, as in Allow. Reflect the headers the browser asks for:
    # SDKs keep adding x-stainless-* headers (B13).
    assert ex.route is not None  # a preflight was routed
    return [
        (b"access-control-allow-methods", ex.route.allow.encode("ascii")),
        (
            b"access-control-allow-headers",
            ex.requested_headers or b"authorization, content-type",
        ),
        (b"access-control-max-age", b"600"),
    ]
