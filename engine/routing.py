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


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: Endpoint
    model_id: str = ""  # /v1/models/{id}; the workflow id for /workflows/{id}/run

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
    if method == "OPTIONS":
        # CORS preflight is never an error and never needs auth (bugs B12, B13).
        return Route(Endpoint.PREFLIGHT)
    bare = path[3:] if path == "/v1" or path.startswith("/v1/") else path
    if len(bare) > 1 and bare.endswith("/"):
        bare = bare[:-1]

    allowed: str
    found: Route | None = None
    workflows = surface is not Surface.CHAT_SERVER
    parts = path.strip("/").split("/")
    if path in ("/chat", "/chat/") and surface is Surface.SERVE:
        allowed, found = "GET", Route(Endpoint.CHAT_WS)
    elif path in ("/predict", "/predict/") and workflows:
        allowed, found = "GET", Route(Endpoint.PREDICT_WS)
    elif parts == ["workflows"] and workflows:
        allowed, found = "GET", Route(Endpoint.WORKFLOWS)
    elif len(parts) == 3 and parts[0] == "workflows" and parts[2] == "run" and workflows:
        allowed, found = "POST", Route(Endpoint.WORKFLOW_RUN, unquote(parts[1]))
    elif parts[:1] == ["workflows"] and parts[2:] == ["run", "stream"] and workflows:
        allowed, found = "POST", Route(Endpoint.WORKFLOW_STREAM, unquote(parts[1]))
    elif bare == "/chat/completions":
        allowed, found = "POST", Route(Endpoint.CHAT_COMPLETIONS)
    elif bare == "/models":
        allowed, found = "GET", Route(Endpoint.MODELS)
    elif bare.startswith("/models/") and len(bare) > len("/models/"):
        allowed, found = "GET", Route(Endpoint.MODEL, unquote(bare[len("/models/") :]))
    elif path == "/metrics" and metrics:
        allowed, found = "GET", Route(Endpoint.METRICS)
    elif path == "/openapi.json":
        allowed, found = "GET", Route(Endpoint.OPENAPI)
    elif path == "/" and playground and surface is Surface.SERVE:
        allowed, found = "GET", Route(Endpoint.PLAYGROUND)
    elif bare == "/health" or (bare == "/ping" and surface is not Surface.CHAT_SERVER):
        allowed, found = "GET", Route(Endpoint.HEALTH)
    if found is None:
        raise RequestError(f"Invalid URL ({method} {path})", status=404, code="unknown_url")
    if method == "HEAD" and allowed == "GET":
        return found  # answered like GET, without the body
    if method != allowed:
        raise RequestError(
            f"Method {method} is not allowed for {path}. Allowed: {allowed}.",
            status=405,
            code="method_not_allowed",
            headers=(("allow", f"{allowed}, OPTIONS"),),
        )
    return found
