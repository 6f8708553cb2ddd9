"""Routing of requests to providers, fallbacks, model listing, and provider settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from wirechat.engine.chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    ModelInfo,
    ProviderError,
    ProviderItem,
    TextDelta,
)
from wirechat.providers.config import ConfigError, from_environment, load_settings
from wirechat.providers.echo import EchoProvider
from wirechat.providers.registry import ProviderRouter


class Scripted:
    """A model double: answers with its name and the model it was asked for, or fails."""

    def __init__(
        self,
        name: str,
        models: tuple[str, ...] = (),
        *,
        fail: ProviderError | None = None,
        fail_after_first: bool = False,
    ) -> None:
        self.name = name
        self.models = models
        self.fail = fail
        self.fail_after_first = fail_after_first
        self.seen: list[str] = []
        self.listings = 0

    def serves(self, model: str) -> bool:
        return model in self.models

    async def list_models(self) -> list[ModelInfo]:
        self.listings += 1
        if self.fail is not None:
            raise self.fail
        return [ModelInfo(id=m, owned_by=self.name) for m in self.models]

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        self.seen.append(request.model)
        if self.fail is not None and not self.fail_after_first:
            raise self.fail
        yield TextDelta(text=f"{self.name}:{request.model}")
        if self.fail is not None:
            raise self.fail
        yield Finish(reason="stop")


def request(model: str, provider: str | None = None) -> ChatRequest:
    return ChatRequest(
        model=model, messages=(ChatMessage(role="user", content="hi"),), provider=provider
    )


def collect(router: ProviderRouter, req: ChatRequest) -> list[ProviderItem]:
    async def main() -> list[ProviderItem]:
        return [item async for item in router.stream(req)]

    return asyncio.run(main())


def text(items: list[ProviderItem]) -> str:
    return "".join(i.text for i in items if isinstance(i, TextDelta))


def test_routing_rules_in_order() -> None:
    a, b = Scripted("alpha", ("m1",)), Scripted("beta", ("m2",))
    router = ProviderRouter(
        [EchoProvider(), a, b], model_map={"fast": ("beta", "m2-small")}, default="alpha"
    )
    assert text(collect(router, request("fast"))) == "beta:m2-small"  # explicit map
    assert text(collect(router, request("beta/anything"))) == "beta:anything"  # prefix removed
    assert text(collect(router, request("m9", provider="beta"))) == "beta:m9"  # /chat field
    assert text(collect(router, request("m2"))) == "beta:m2"  # serves()
    assert text(collect(router, request("unknown"))) == "alpha:unknown"  # default
    assert text(collect(router, request("echo"))) == "hi"
    # An unconfigured provider name in the NodeTool field is ignored, not refused.
    assert text(collect(router, request("m2", provider="ollama"))) == "beta:m2"
    # A slash that names no provider is part of the model id (meta-llama/Llama-3...).
    assert text(collect(router, request("meta-llama/x"))) == "alpha:meta-llama/x"


def test_unknown_model_without_default_is_openai_404() -> None:
    router = ProviderRouter([EchoProvider()])
    with pytest.raises(ProviderError) as caught:
        collect(router, request("gpt-9"))
    assert caught.value.status == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_fallbacks_are_tried_only_before_the_first_item() -> None:
    down = ProviderError("upstream down", status=503, retry_after=1)
    broken = Scripted("broken", ("big",), fail=down)
    spare = Scripted("spare", ("small",))
    router = ProviderRouter([broken, spare], fallbacks={"big": ["small"]})
    assert text(collect(router, request("big"))) == "spare:small"
    assert broken.seen == ["big"] and spare.seen == ["small"]

    midway = Scripted("midway", ("big",), fail=down, fail_after_first=True)
    router = ProviderRouter([midway, Scripted("spare", ("small",))], fallbacks={"big": ["small"]})
    with pytest.raises(ProviderError):
        collect(router, request("big"))  # output was sent: never retried

    all_down = ProviderRouter(
        [Scripted("a", ("x",), fail=down), Scripted("b", ("y",), fail=down)],
        fallbacks={"x": ["y"]},
    )
    with pytest.raises(ProviderError) as caught:
        collect(all_down, request("x"))
    assert caught.value.status == 503


def test_model_listing_skips_failures_caches_and_lists_aliases() -> None:
    good = Scripted("good", ("g1", "g2"))
    bad = Scripted("bad", ("b1",), fail=ProviderError("refused", status=502))
    router = ProviderRouter(
        [EchoProvider(), good, bad], model_map={"alias": ("good", "g1")}, models_ttl=60
    )

    async def main() -> list[ModelInfo]:
        first = await router.list_models()
        await router.list_models()
        return first

    models = asyncio.run(main())
    assert [(m.id, m.owned_by) for m in models] == [
        ("echo", "wirechat"),
        ("g1", "good"),
        ("g2", "good"),
        ("alias", "good"),
    ]
    assert good.listings == 1  # the second listing came from the cache
    assert bad.listings == 2  # failures are not cached


def test_environment_configures_upstreams_without_a_file() -> None:
    assert from_environment({}) == []
    found = {
        p.name: p
        for p in from_environment(
            {
                "OPENAI_API_KEY": "sk-1",
                "OLLAMA_API_URL": "http://127.0.0.1:11434",
                "ANTHROPIC_API_KEY": "ak",
                "GROQ_API_KEY": "gk",
            }
        )
    }
    assert found["openai"].base_url == "https://api.openai.com/v1"
    assert found["openai"].api_key == "sk-1"
    assert found["ollama"].base_url == "http://127.0.0.1:11434/v1"
    assert found["anthropic"].kind == "anthropic"
    assert found["groq"].base_url == "https://api.groq.com/openai/v1"


def test_a_single_upstream_becomes_the_default() -> None:
    settings = load_settings(None, {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert settings.default == "openai"
    assert load_settings(None, {}).default is None
    assert load_settings(None, {}, default="echo").default == "wirechat"


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "wirechat.toml"
    path.write_text(
        """
default_provider = "local"
[providers.local]
base_url = "http://127.0.0.1:8081/v1"
models = ["llama3"]
[providers.claude]
kind = "anthropic"
api_key_env = "MY_KEY"
[models]
"fast" = { provider = "local", model = "llama3:1b" }
"smart" = "claude"
[fallbacks]
"smart" = ["local/llama3"]
[keys]
ignored = "by this reader"
"""
    )
    settings = load_settings(str(path), {"MY_KEY": "secret"})
    by_name = {p.name: p for p in settings.providers}
    assert by_name["local"].kind == "openai" and by_name["local"].models == ("llama3",)
    assert by_name["claude"].api_key == "secret"
    assert settings.model_map == {"fast": ("local", "llama3:1b"), "smart": ("claude", "smart")}
    assert settings.fallbacks == {"smart": ("local/llama3",)}
    assert settings.default == "local"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[providers.x]\nkind = 'nope'\nbase_url = 'http://a'", "kind must be one of"),
        ("[providers.x]\nkind = 'openai'", "needs base_url"),
        ("[providers.x]\nkind = 'anthropic'", "needs api_key"),
        ("[models]\n'm' = 'ghost'", "unknown provider 'ghost'"),
        ("default_provider = 'ghost'", "unknown provider 'ghost'"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_settings(str(path), {})


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "absent.toml"), {})


def test_the_readme_example_config_is_valid(tmp_path: Path) -> None:
    from wirechat.providers.config import EXAMPLE_CONFIG

    path = tmp_path / "wirechat.toml"
    path.write_text(EXAMPLE_CONFIG)
    settings = load_settings(str(path), {"OPENAI_API_KEY": "sk", "ANTHROPIC_API_KEY": "ak"})
    assert {p.name for p in settings.providers} == {"openai", "ollama", "anthropic"}
    assert settings.default == "ollama"
    assert settings.model_map["fast"] == ("ollama", "llama3.2:1b")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert EXAMPLE_CONFIG in readme
