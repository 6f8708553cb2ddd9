"""The interface every language-model provider implements.

Rules of this module:

* A provider knows nothing of HTTP framing, SSE or WebSockets: it turns a
  :class:`~wirechat.engine.chat.ChatRequest` into an async stream of
  :data:`~wirechat.engine.chat.ProviderItem` values and nothing else.
* The transport pulls a stream one item at a time and pulls the next item only once the
  socket has drained, so a provider must not buffer ahead of its consumer.
* The transport cancels the consuming task when the client goes away; a provider must let
  :class:`asyncio.CancelledError` propagate (never swallow it) and release what it holds in
  ``finally`` blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from wirechat.engine.chat import ChatRequest, ModelInfo, ProviderItem


class ChatProvider(Protocol):
    """A source of chat completions for one or more models."""

    # A read-only property so that a plain class or instance attribute satisfies it too.
    @property
    def name(self) -> str:
        """Who serves the models; reported as ``owned_by`` in ``/v1/models``."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        """Answer ``request``: ``TextDelta`` and ``ToolCall`` items, then at most one ``Finish``.

        Implemented as an async generator, so nothing runs (and nothing is raised) until the
        first item is pulled.

        Raises:
            ProviderError: the call failed, before the first item or in the middle.
        """
        ...

    async def list_models(self) -> list[ModelInfo]:
        """The models this provider serves, for ``/v1/models``.

        Raises:
            ProviderError: the listing failed (the router skips this provider).
        """
        ...

    def serves(self, model: str) -> bool:
        """Whether ``model`` (a model id as the client sent it) is one of this provider's."""
        ...
