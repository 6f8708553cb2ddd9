"""Bearer-token checks for every auth mode (PROTOCOL.md §3).

Rules of this module: pure functions of the token and the config. Tokens are compared as
SHA-256 digests with ``hmac.compare_digest`` against *every* configured key, so neither the
time taken nor a non-ASCII token (``compare_digest`` raises on non-ASCII ``str``) tells an
attacker anything or turns into a 500. In ``supabase`` mode a token that is no static key
is not judged here: the result asks for a check (``AuthResult.check``), which the connection
turns into a ``VerifyToken`` effect, since asking Supabase needs the network.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from .config import AuthMode, EngineConfig, StaticKey, token_digest

LOCAL_USER = "1"  # NodeTool's user id when auth is not enforced.


@dataclass(frozen=True, slots=True)
class AuthResult:
    user_id: str | None
    failure: str | None = None  # "missing" or "invalid"
    key: StaticKey | None = None  # the static key that matched: its limits apply
    # supabase mode: the token the auth provider must judge (user_id and failure are None).
    check: str | None = field(default=None, repr=False)


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive)."""
    if not authorization:
        return None
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    return parts[1].decode("latin-1")


def query_token(query: str) -> str | None:
    """``api_key`` (NodeTool) or ``token`` (its later docs) from a WebSocket URL query."""
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key in ("api_key", "token") and value.strip():
            return value.strip()
    return None


def authenticate(token: str | None, config: EngineConfig) -> AuthResult:
    if not config.auth_mode.enforced:
        return AuthResult(LOCAL_USER)
    if token is None:
        return AuthResult(None, "missing")
    digest = token_digest(token)
    found: StaticKey | None = None
    for key in config.static_keys:
        if hmac.compare_digest(digest, key.digest) and found is None:
            found = key
    if found is not None:
        return AuthResult(found.user_id, key=found)
    if config.auth_mode is AuthMode.SUPABASE and _sendable(token):
        return AuthResult(None, check=token)
    return AuthResult(None, "invalid")


def _sendable(token: str) -> bool:
    """Whether ``token`` can travel in an ``Authorization`` header at all: visible ASCII, no
    space. Anything else (a query token may decode to any text) is refused without asking."""
    return token.isascii() and token.isprintable() and " " not in token
