"""Which endpoint a request target names (PROTOCOL.md §2, reference §9.1 item 1).

Rules of this module: a pure function of the method, the raw target and the surface the
server exposes. Every route also answers without the ``/v1`` prefix and with a trailing
slash; model ids are percent-decoded *after* the path is split, so ``meta-llama%2FLlama``
and ``meta-llama/Llama`` name the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote

from .config import Surface
from .errors import RequestError


class Endpoint(Enum):
    CHAT_COMPLETIONS = "chat_completions"
    MODELS = "models"
    MODEL = "model"
    HEALTH = "health"
    CHAT_WS = "chat_ws"
    PREDICT_WS = "predict_ws"
    WORKFLOWS = "workflows"
    WORKFLOW_RUN = "workflow_run"
    WORKFLOW_STREAM = "workflow_stream"
    OPENAPI = "openapi"
    PLAYGROUND = "playground"
    PREFLIGHT = "preflight"
    METRICS = "metrics"


# What an OPTIONS request (or a 405) names as allowed. HEAD is answered wherever GET is.
_GET_ALLOW = "GET, HEAD, OPTIONS"
_POST_ALLOW = "POST, OPTIONS"
# OPTIONS on a path that names no endpoint (and `OPTIONS *`, the server as a whole) answers
# 204 with every method the server has, not 404: a browser's CORS preflight to a wrong URL
# then succeeds and the page gets the real request's 404 `unknown_url` envelope (readable,
# with CORS headers) instead of an opaque CORS failure; preflight is never an error (B12).
ANY_PATH_ALLOW = "GET, HEAD, POST, OPTIONS"


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: Endpoint
    model_id: str = ""  # /v1/models/{id}; the workflow id for /workflows/{id}/run
    allow: str = ""  # PREFLIGHT only: the `Allow` header, the methods of the path asked about

    @property
    def public(self) -> bool:
        """Reachable without authentication (PROTOCOL.md §3)."""
        return self.endpoint in (
            Endpoint.HEALTH,
            Endpoint.PREFLIGHT,
            Endpoint.OPENAPI,
            Endpoint.PLAYGROUND,
        )


def split_target(target: str) -> tuple[str, str]:
    path, _, query = target.partition("?")
    return path, query


def route(
    method: str, target: str, surface: Surface, *, playground: bool = False, metrics: bool = False
) -> Route:
    """The route for a request, or :class:`RequestError` (404 ``unknown_url`` / 405).

    ``playground``: whether ``/`` serves the web playground (only with ``/chat``, on SERVE).
    ``metrics``: whether ``/metrics`` is served (every surface; never under ``/v1``).
    """
    path, _ = split_target(target)
    resolved = _resolve(path, surface, playground=playground, metrics=metrics)
    if method == "OPTIONS":
        # CORS preflight is never an error and never needs auth (bugs B12, B13).
        allow = ANY_PATH_ALLOW if resolved is None else _allow(resolved[0])
        return Route(Endpoint.PREFLIGHT, allow=allow)
    if resolved is None:
        raise RequestError(f"Invalid URL ({method} {path})", status=404, code="unknown_url")
    allowed, found = resolved
    if method == "HEAD" and allowed == "GET":
        return found  # answered like GET, without the body
    if method != allowed:
        raise RequestError(
            f"Method {method} is not allowed for {path}. Allowed: {allowed}.",
            status=405,
            code="method_not_allowed",
            headers=(("allow", _allow(allowed)),),
        )
    return found


def _allow(method: str) -> str:
    return _GET_ALLOW if method == "GET" else _POST_ALLOW


def _resolve(
    path: str, surface: Surface, *, playground: bool, metrics: bool = False
) -> tuple[str, Route] | None:
    """The one method a path answers (besides HEAD and OPTIONS) and its route, or None."""
    bare = path[3:] if path == "/v1" or path.startswith("/v1/") else path
    if len(bare) > 1 and bare.endswith("/"):
        bare = bare[:-1]
    workflows = surface is not Surface.CHAT_SERVER
    parts = path.strip("/").split("/")
    if path in ("/chat", "/chat/") and surface is Surface.SERVE:
        return "GET", Route(Endpoint.CHAT_WS)
    if path in ("/predict", "/predict/") and workflows:
        return "GET", Route(Endpoint.PREDICT_WS)
    if parts == ["workflows"] and workflows:
        return "GET", Route(Endpoint.WORKFLOWS)
    if len(parts) == 3 and parts[0] == "workflows" and parts[2] == "run" and workflows:
        return "POST", Route(Endpoint.WORKFLOW_RUN, unquote(parts[1]))
    if parts[:1] == ["workflows"] and parts[2:] == ["run", "stream"] and workflows:
        return "POST", Route(Endpoint.WORKFLOW_STREAM, unquote(parts[1]))
    if bare == "/chat/completions":
        return "POST", Route(Endpoint.CHAT_COMPLETIONS)
    if bare == "/models":
        return "GET", Route(Endpoint.MODELS)
    if bare.startswith("/models/") and len(bare) > len("/models/"):
        return "GET", Route(Endpoint.MODEL, unquote(bare[len("/models/") :]))
    if path == "/metrics" and metrics:
        return "GET", Route(Endpoint.METRICS)
    if path == "/openapi.json":
        return "GET", Route(Endpoint.OPENAPI)
    if path == "/" and playground and surface is Surface.SERVE:
        return "GET", Route(Endpoint.PLAYGROUND)
    if bare == "/health" or (bare == "/ping" and surface is not Surface.CHAT_SERVER):
        return "GET", Route(Endpoint.HEALTH)
    return None
