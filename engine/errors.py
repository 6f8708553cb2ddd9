"""Error classes of the engine and the mapping of failures to client-visible statuses.

Rules of this module:

* ``RemoteProtocolError``: the peer misbehaved. It carries the HTTP status (or WebSocket close
  code) to answer with. It never escapes ``ServerConnection.receive_data``.
* ``LocalProtocolError``: our own code misused the engine (an input in a state that does not
  allow it). It is a bug and is raised to the caller.
"""

from __future__ import annotations

from .chat import ProviderError


class ProtocolError(Exception):
    def __init__(self, message: str, *, status: int = 400, close_code: int = 1002) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.close_code = close_code


class RemoteProtocolError(ProtocolError):
    """The peer sent something we refuse; answer with ``status`` and close."""


class LocalProtocolError(ProtocolError):
    """The engine was driven wrongly by its caller: a bug, never the peer's fault."""


class RequestError(Exception):
    """A request we answer with an OpenAI error envelope (the connection stays usable)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def request_error_for(error: ProviderError) -> RequestError:
    """How a provider failure before the first byte of a response reaches the client.

    429 and 503 pass through with ``Retry-After``; other upstream 4xx pass through, except
    401/403 (the upstream refusing the gateway's own key), which become 502 like upstream
    5xx and connection failures; timeouts become 504 (PROTOCOL.md §2).
    """
    status = error.status
    headers: list[tuple[str, str]] = []
    if status in (429, 503):
        client_status = status
    elif status == 504:
        client_status = 504
    elif status in (401, 403):
        # The upstream refused *our* credentials: passing 401 on would tell the client that
        # its own key is wrong. It is the gateway that failed.
        client_status = 502
    elif 400 <= status < 500:
        client_status = status
    else:
        client_status = 502
    if error.retry_after is not None and client_status in (429, 503):
        headers.append(("retry-after", _retry_after_text(error.retry_after)))
        headers.append(("retry-after-ms", str(int(error.retry_after * 1000))))
    # openai clients obey x-should-retry over their own rules (reference §6.2): say "no"
    # where a retry cannot help (a spent quota, our own failure), "yes" for upstream trouble.
    if error.code in ("insufficient_quota", "internal_error"):
        headers.append(("x-should-retry", "false"))
    elif client_status in (502, 503, 504):
        headers.append(("x-should-retry", "true"))
    default_type = {
        429: "rate_limit_error",
        503: "service_unavailable",
        502: "upstream_error",
        504: "timeout",
    }.get(client_status, "invalid_request_error" if client_status < 500 else "server_error")
    return RequestError(
        error.message,
        status=client_status,
        type=error.type or default_type,
        param=error.param,
        code=error.code,
        headers=tuple(headers),
    )


def _retry_after_text(seconds: float) -> str:
    # Retry-After is integer seconds (RFC 9110); round up so a client never retries early.
    whole = int(seconds)
    return str(whole if whole == seconds else whole + 1)
