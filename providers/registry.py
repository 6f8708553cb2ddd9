"""Routing of chat requests and model listings to the configured providers.

Rules of this module:

* Providers are consulted in the order they were added; the first one that serves a model
  wins, so a catch-all upstream provider goes last.
* An unknown model is a ``ProviderError`` with OpenAI's 404 ``model_not_found`` shape, raised
  when the stream is first pulled, exactly like any other failure before the first item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from wirechat.engine.chat import ChatRequest, ModelInfo, ProviderError, ProviderItem

from .base import ChatProvider
from .echo import EchoProvider

logger = logging.getLogger("wirechat.providers")


class ProviderRouter:
    """An ordered set of providers, picked per request by model id."""

    def __init__(self, providers: Iterable[ChatProvider] = ()) -> None:
        self._providers: list[ChatProvider] = list(providers)

    @property
    def providers(self) -> tuple[ChatProvider, ...]:
        """The providers, in the order they are consulted."""
        return tuple(self._providers)

    def add(self, provider: ChatProvider) -> None:
        """Consult ``provider`` after every provider added before it."""
        self._providers.append(provider)

    def resolve(self, model: str) -> ChatProvider:
        """The first provider that serves ``model``.

        Raises:
            ProviderError: no provider serves it (404, ``model_not_found``).
        """
        for provider in self._providers:
            if provider.serves(model):
                return provider
        # OpenAI's exact wording and fields for an unknown model (openai-compat.md §6).
        raise ProviderError(
            f"The model `{model}` does not exist or you do not have access to it.",
            status=404,
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )

    def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        """The stream of the provider serving ``request.model``.

        Not a generator itself: on success it hands back the provider's own stream, so the
        hot path pays no extra re-yield per item and closing the stream closes the
        provider's generator directly. An unknown model yields a stream that raises the
        404 on its first pull, so callers handle it like any other failure before the
        first item.
        """
        try:
            provider = self.resolve(request.model)
        except ProviderError as error:
            return _FailingStream(error)
        return provider.stream(request)

    async def list_models(self) -> list[ModelInfo]:
        """Every provider's models, in provider order.

        A provider whose listing fails is logged and skipped: one unreachable upstream must
        not hide the models of the others. The listings run concurrently so one slow
        upstream costs its own latency, not the sum.
        """
        results = await asyncio.gather(
            *(provider.list_models() for provider in self._providers),
            return_exceptions=True,
        )
        models: list[ModelInfo] = []
        for provider, result in zip(self._providers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    # CancelledError, KeyboardInterrupt, ...: not a listing failure.
                    raise result
                logger.warning(
                    "provider %r failed to list its models: %r",
                    provider.name,
                    result,
                    exc_info=not isinstance(result, ProviderError),
                )
                continue
            models.extend(result)
        return models


class _FailingStream:
    """A stream whose first pull raises ``error``: a failure before the first item."""

    def __init__(self, error: ProviderError) -> None:
        self._error = error

    def __aiter__(self) -> _FailingStream:
        return self

    async def __anext__(self) -> ProviderItem:
        raise self._error

    async def aclose(self) -> None:
        # Same surface as an async generator, so callers may close any stream alike.
        return None


def default_router() -> ProviderRouter:
    """A router serving only the embedded ``echo`` model (no network, no configuration)."""
    return ProviderRouter([EchoProvider()])
