"""Supabase as the judge of bearer tokens (``--auth-provider supabase``; PROTOCOL.md §3).

Rules of this module:

* The engine asks (``VerifyToken``); the transport calls :meth:`SupabaseVerifier.cached`
  first (answered on the spot, no event-loop turn) and otherwise awaits
  :meth:`SupabaseVerifier.verify`, which returns the Supabase user id, ``None`` for a token
  Supabase refused, or raises :class:`AuthUnavailable` when Supabase could not be asked.
* ``GET {SUPABASE_URL}/auth/v1/user`` with ``apikey: SUPABASE_KEY`` and the bearer token.
  200 with a JSON object carrying a non-empty string ``id``: accepted, that id is the user.
  A 200 without one, and any 4xx but 408 and 429: refused. Anything else (a 5xx, 408, 429,
  a redirect, a refused connection, a timeout): unavailable, which the server answers with
  503 / close 1011. Never "let everyone in".
* Caches are keyed by the token's SHA-256 digest, never the token. Successes are kept for
  ``ttl`` seconds (``AUTH_CACHE_TTL``, 0 disables caching), at most ``max_entries``
  (``AUTH_CACHE_MAX``), least recently used first out. Refusals are kept too, for
  ``negative_ttl`` seconds (5 by default, never longer than ``ttl``), in a cache of their
  own, so a flood of bad tokens neither reaches Supabase again and again nor evicts the good
  ones. "Unavailable" is never cached: the next request asks again.
* Single-flight: concurrent checks of one token share one upstream request. The request
  runs in a task of its own, so a client that goes away does not cancel it for the others.
* Never a token in a log line or an error message: exceptions are reported by type only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx
from wirechat.engine.config import token_digest

logger = logging.getLogger("wirechat.auth")

_MAX_ANSWER_BYTES = 1024 * 1024  # a Supabase user object is a few KiB


class AuthUnavailable(Exception):
    """The auth provider could not judge the token (unreachable, slow, failing). The message
    is safe to show a client: it never holds the token."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A cached verdict: the user id, or ``None`` for a refused token."""

    user_id: str | None


class TokenVerifier(Protocol):
    """What the transport needs of an auth provider (see the module rules)."""

    def cached(self, token: str) -> Verdict | None: ...

    async def verify(self, token: str) -> str | None: ...

    async def aclose(self) -> None: ...


class _Cache:
    """Digest → (expiry, verdict), least recently used first out."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, str | None]] = OrderedDict()

    def get(self, digest: bytes) -> Verdict | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expires, user_id = entry
        if self._clock() >= expires:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return Verdict(user_id)

    def put(self, digest: bytes, user_id: str | None) -> None:
        if self.ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[digest] = (self._clock() + self.ttl, user_id)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class SupabaseVerifier:
    """Checks tokens with Supabase Auth; see the module rules."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        ttl: float = 60.0,
        max_entries: int = 2000,
        negative_ttl: float = 5.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.user_url = url.rstrip("/") + "/auth/v1/user"
        self._key = key
        self._timeout = timeout
        self._accepted = _Cache(ttl, max_entries, clock)
        self._refused = _Cache(min(negative_ttl, ttl), max_entries, clock)
        self._inflight: dict[bytes, asyncio.Task[str | None]] = {}
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=False
        )
        self.upstream_calls = 0  # requests sent to Supabase (for metrics and tests)

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"SupabaseVerifier({self.user_url!r})"

    def cached(self, token: str) -> Verdict | None:
        """The cached verdict on ``token``, if there is a fresh one (no I/O)."""
        digest = token_digest(token)
        return self._accepted.get(digest) or self._refused.get(digest)

    async def verify(self, token: str) -> str | None:
        """The user id of ``token``, or ``None`` if Supabase refused it.

        Raises :class:`AuthUnavailable` when Supabase could not be asked.
        """
        digest = token_digest(token)
        verdict = self._accepted.get(digest) or self._refused.get(digest)
        if verdict is not None:
            return verdict.user_id
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._check(token, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._settled(digest, done))
        # shield: a caller that is cancelled (its client left) leaves the check running for
        # the others waiting on it, and for the cache.
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        await self._client.aclose()

    def _settled(self, digest: bytes, task: asyncio.Task[str | None]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waited

    async def _check(self, token: str, digest: bytes) -> str | None:
        self.upstream_calls += 1
        try:
            async with asyncio.timeout(self._timeout):  # a bound on the whole exchange
                status, body = await self._get(token)
        except TimeoutError:
            logger.warning("Supabase did not answer a token check within %gs", self._timeout)
            raise AuthUnavailable("the authentication provider did not answer in time") from None
        except httpx.HTTPError as exc:
            # By type only: some httpx errors quote the request, and so the token.
            logger.warning("Supabase is unreachable: %s", type(exc).__name__)
            raise AuthUnavailable("the authentication provider is unreachable") from None
        if status == 200:
            user_id = _user_id(body)
            if user_id is None:
                logger.warning("Supabase answered 200 without a user id: token refused")
            self._remember(digest, user_id)
            return user_id
        if 400 <= status < 500 and status not in (408, 429):
            if status not in (401, 403):
                logger.info("Supabase refused a token with status %d", status)
            self._remember(digest, None)
            return None
        logger.warning("Supabase answered a token check with status %d", status)
        raise AuthUnavailable(f"the authentication provider answered {status}")

    async def _get(self, token: str) -> tuple[int, bytes]:
        headers = {"apikey": self._key, "authorization": f"Bearer {token}"}
        async with self._client.stream("GET", self.user_url, headers=headers) as response:
            body = bytearray()
            if response.status_code == 200:
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > _MAX_ANSWER_BYTES:
                        break  # not a user object: refused below
            return response.status_code, bytes(body)

    def _remember(self, digest: bytes, user_id: str | None) -> None:
        if user_id is None:
            self._refused.put(digest, None)
        else:
            self._accepted.put(digest, user_id)


def _user_id(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    user_id = answer.get("id") if isinstance(answer, dict) else None
    return user_id if isinstance(user_id, str) and user_id else None
