"""Routing of chat requests and model listings to the configured providers.

Rules of this module:

* A request's model picks its provider, first rule that applies wins:
  1. an explicit entry of the model map (``"fast" = {provider = "ollama", model = "llama3.2"}``);
  2. a ``provider/model`` prefix naming a configured provider (``openai/gpt-4o-mini``): the
     prefix is removed before the request goes upstream;
  3. the NodeTool ``provider`` field of a ``/chat`` message, when it names a configured
     provider (an unknown name is ignored rather than refused: NodeTool clients always
     send one);
  4. the first provider (in the order added) that ``serves`` the model;
  5. the default provider, when one is set.
  Otherwise: OpenAI's 404 ``model_not_found``, raised on the stream's first pull like any
  other failure before the first item.
* Fallbacks: a model may name an ordered list of models tried in turn when one fails
  *before its first item*. Once an item has gone to the client nothing is retried.
* ``list_models`` asks every provider concurrently, keeps each answer for ``models_ttl``
  seconds, and skips (and logs) a provider that fails: one unreachable upstream must not
  hide the models of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import replace

from wirechat.engine.chat import ChatRequest, ModelInfo, ProviderError, ProviderItem

from .base import ChatProvider
from .echo import EchoProvider

logger = logging.getLogger("wirechat.providers")


class ProviderRouter:
    """An ordered set of providers, picked per request (see the module docstring)."""

    def __init__(
        self,
        providers: Iterable[ChatProvider] = (),
        *,
        model_map: Mapping[str, tuple[str, str]] | None = None,
        fallbacks: Mapping[str, Sequence[str]] | None = None,
        default: str | None = None,
        models_ttl: float = 30.0,
    ) -> None:
        self._providers: list[ChatProvider] = list(providers)
        self._model_map = dict(model_map or {})
        self._fallbacks = {model: list(chain) for model, chain in (fallbacks or {}).items()}
        self._default = default
        self._models_ttl = models_ttl
        self._listed: dict[str, tuple[float, list[ModelInfo]]] = {}

    @property
    def providers(self) -> tuple[ChatProvider, ...]:
        """The providers, in the order they are consulted."""
        return tuple(self._providers)

    def add(self, provider: ChatProvider) -> None:
        """Consult ``provider`` after every provider added before it."""
        self._providers.append(provider)

    def get(self, name: str) -> ChatProvider | None:
        return next((p for p in self._providers if p.name == name), None)

    def route(self, request: ChatRequest) -> tuple[ChatProvider, ChatRequest]:
        """The provider for ``request`` and the request as that provider must see it.

        Raises:
            ProviderError: no provider serves the model (404, ``model_not_found``).
        """
        model = request.model
        mapped = self._model_map.get(model)
        if mapped is not None:
            provider = self.get(mapped[0])
            if provider is not None:
                return provider, replace(request, model=mapped[1])
        prefix, slash, rest = model.partition("/")
        if slash and rest:
            provider = self.get(prefix)
            if provider is not None:
                return provider, replace(request, model=rest)
        if request.provider:
            provider = self.get(request.provider)
            if provider is not None:
                return provider, request
        for provider in self._providers:
            if provider.serves(model):
                return provider, request
        if self._default is not None:
            provider = self.get(self._default)
            if provider is not None:
                return provider, request
        # OpenAI's exact wording and fields for an unknown model (openai-compat.md §6).
        raise ProviderError(
            f"The model `{model}` does not exist or you do not have access to it.",
            status=404,
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )

    def resolve(self, model: str) -> ChatProvider:
        """The provider that would serve a request for ``model`` (raises the 404)."""
        return self.route(ChatRequest(model=model, messages=()))[0]

    def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        """The stream answering ``request``.

        Without fallbacks this hands back the provider's own stream, so the hot path pays
        no extra re-yield per item. An unknown model yields a stream that raises the 404
        on its first pull.
        """
        chain = self._fallbacks.get(request.model)
        if chain:
            return self._stream_with_fallbacks(request, [request.model, *chain])
        try:
            provider, routed = self.route(request)
        except ProviderError as error:
            return _FailingStream(error)
        return provider.stream(routed)

    async def _stream_with_fallbacks(
        self, request: ChatRequest, models: list[str]
    ) -> AsyncIterator[ProviderItem]:
        error: ProviderError | None = None
        for model in models:
            started = False
            try:
                provider, routed = self.route(replace(request, model=model))
                stream = provider.stream(routed)
                async with contextlib.aclosing(stream):  # type: ignore[type-var]
                    async for item in stream:
                        started = True
                        yield item
                return
            except ProviderError as exc:
                if started:
                    raise  # the client has seen output: never retry after the first item
                logger.warning("model %s failed before its first token: %s", model, exc)
                error = exc
        assert error is not None
        raise error

    async def list_models(self) -> list[ModelInfo]:
        """Every provider's models, in provider order (see the module docstring)."""
        now = time.monotonic()
        results = await asyncio.gather(
            *(self._list_one(provider, now) for provider in self._providers),
            return_exceptions=True,
        )
        models: list[ModelInfo] = []
        for provider, result in zip(self._providers, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # CancelledError and the like are no listing failure
                logger.warning(
                    "provider %r failed to list its models: %r",
                    provider.name,
                    result,
                    exc_info=not isinstance(result, ProviderError),
                )
                continue
            models.extend(result)
        return self._with_aliases(models)

    def cached_models(self) -> list[ModelInfo] | None:
        """``list_models()``'s answer when every provider's listing is still cached, else
        ``None``: lets ``/v1/models`` be answered without a task or an event-loop turn."""
        now = time.monotonic()
        models: list[ModelInfo] = []
        for provider in self._providers:
            cached = self._listed.get(provider.name)
            if cached is None or now - cached[0] >= self._models_ttl:
                return None
            models.extend(cached[1])
        return self._with_aliases(models)

    def _with_aliases(self, models: list[ModelInfo]) -> list[ModelInfo]:
        listed = {m.id for m in models}
        for alias, (name, _) in self._model_map.items():
            if alias not in listed and self.get(name) is not None:
                models.append(ModelInfo(id=alias, owned_by=name))
        return models

    async def _list_one(self, provider: ChatProvider, now: float) -> list[ModelInfo]:
        cached = self._listed.get(provider.name)
        if cached is not None and now - cached[0] < self._models_ttl:
            return cached[1]
        models = await provider.list_models()
        self._listed[provider.name] = (now, models)
        return models

    async def aclose(self) -> None:
        """Close every provider that holds connections (``aclose``)."""
        for provider in self._providers:
            close = getattr(provider, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


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
