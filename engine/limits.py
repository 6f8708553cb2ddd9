"""Per-key rate limits and global admission control for generations (issue 8, PROTOCOL.md §6).

Rules of this module:

* Pure bookkeeping with the time passed in, like the rest of the engine. One
  :class:`Admission` is shared by every connection of a server process (the transport makes
  it and hands it to each ``ServerConnection``); with ``--workers N`` every process has its
  own, so a key's limits hold per worker.
* A *generation* is one chat completion request (all its ``n`` choices) or one ``/chat``
  turn. It is admitted before its first provider call and released when it ends, however it
  ends; it counts once against its key's requests per minute, and against the concurrent
  streams of its key and the server's in-flight limit until released.
* Requests and tokens per minute are token buckets that refill continuously: full at the
  start, ``limit / 60`` back per second. A request needs one request token and a positive
  token balance; the tokens it used (prompt + completion, as the provider reports them) are
  taken when it ends, so one large request may leave the balance negative and the next
  requests wait until it has refilled (how OpenAI's limits feel from the outside).
* Refusals carry what a client needs to back off: ``retry_after`` seconds and the
  ``x-ratelimit-*`` headers OpenAI sends (reference openai-compat §6.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyLimits:
    """What one static key may do. ``None``: no limit of that kind; ``models`` empty: any
    model. A model pattern ending in ``*`` allows every model id with that prefix."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")

    def allows_model(self, model: str) -> bool:
        if not self.models:
            return True
        return any(model.startswith(p[:-1]) if p.endswith("*") else model == p for p in self.models)

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.concurrent_streams)


@dataclass(slots=True)
class _Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the level reaches ``amount`` (0 if it has)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60 / self.capacity

    def until_full(self) -> float:
        return (self.capacity - self.level) * 60 / self.capacity


@dataclass(slots=True)
class _KeyState:
    requests: _Bucket | None
    tokens: _Bucket | None
    streams: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a generation was not admitted: 429 (a key's limit) or 503 (the server is full)."""

    status: int
    kind: str  # "requests", "tokens", "concurrent" or "overloaded"
    message: str
    retry_after: float  # seconds


@dataclass(slots=True)
class Ticket:
    """An admitted generation; give it back with :meth:`Admission.release` exactly once."""

    key: str | None
    tokens: int = 0  # used so far, as reported by the provider
    released: bool = False


class Admission:
    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight  # 0: no server-wide limit
        self.inflight = 0
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key: str | None, limits: KeyLimits | None, now: float) -> Ticket | Refusal:
        """Admit one generation for ``key`` (a static key's id; ``None`` for no key)."""
        if self.max_inflight and self.inflight >= self.max_inflight:
            return Refusal(
                503,
                "overloaded",
                f"The server is at its limit of {self.max_inflight} generations in flight."
                " Please try again shortly.",
                1.0,
            )
        state = self._state(key, limits, now)
        if state is not None and limits is not None:
            refusal = _check(state, limits)
            if refusal is not None:
                return refusal
            if state.requests is not None:
                state.requests.level -= 1
            state.streams += 1
        self.inflight += 1
        return Ticket(key if state is not None else None)

    def release(self, ticket: Ticket) -> None:
        """The generation ended (however): its slot frees and its tokens are taken."""
        if ticket.released:
            return
        ticket.released = True
        self.inflight -= 1
        state = self._keys.get(ticket.key) if ticket.key is not None else None
        if state is None:
            return
        state.streams -= 1
        if state.tokens is not None:
            state.tokens.level -= ticket.tokens  # the next refill counts from its own stamp

    def headers(
        self, key: str | None, limits: KeyLimits | None, now: float
    ) -> list[tuple[bytes, bytes]]:
        """The ``x-ratelimit-*`` headers OpenAI sends, for ``key`` as it stands now."""
        state = self._state(key, limits, now)
        if state is None:
            return []
        out: list[tuple[bytes, bytes]] = []
        for name, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is not None:
                remaining = max(0, math.floor(bucket.level))
                reset = _duration(bucket.until_full()).encode()
                out += [
                    (b"x-ratelimit-limit-" + name.encode(), b"%d" % bucket.capacity),
                    (b"x-ratelimit-remaining-" + name.encode(), b"%d" % remaining),
                    (b"x-ratelimit-reset-" + name.encode(), reset),
                ]
        return out

    def _state(self, key: str | None, limits: KeyLimits | None, now: float) -> _KeyState | None:
        if key is None or limits is None or not limits.limited:
            return None
        state = self._keys.get(key)
        if state is None:
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            state = _KeyState(
                requests=_Bucket(rpm, rpm, now) if rpm else None,
                tokens=_Bucket(tpm, tpm, now) if tpm else None,
            )
            self._keys[key] = state  # one entry per configured key: bounded by the config
        for bucket in (state.requests, state.tokens):
            if bucket is not None:
                bucket.refill(now)
        return state


def _check(state: _KeyState, limits: KeyLimits) -> Refusal | None:
    streams = limits.concurrent_streams
    if streams is not None and state.streams >= streams:
        return Refusal(
            429,
            "concurrent",
            f"Too many concurrent requests: this key may run {streams} at a time."
            " Please try again when one has finished.",
            1.0,
        )
    requests = state.requests
    if requests is not None and requests.level < 1:
        wait = requests.wait_for(1)
        return Refusal(
            429,
            "requests",
            f"Rate limit reached for requests per min (RPM): Limit {int(requests.capacity)},"
            f" Used {int(requests.capacity)}, Requested 1."
            f" Please try again in {_duration(wait)}.",
            wait,
        )
    tokens = state.tokens
    if tokens is not None and tokens.level <= 0:
        wait = tokens.wait_for(1)
        used = int(tokens.capacity - tokens.level)
        return Refusal(
            429,
            "tokens",
            f"Rate limit reached for tokens per min (TPM): Limit {int(tokens.capacity)},"
            f" Used {used}. Please try again in {_duration(wait)}.",
            wait,
        )
    return None


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``12ms``, ``6.596s``, ``1m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"
