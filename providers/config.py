"""Which providers a server runs: from the environment and a small TOML file.

Rules of this module:

* With no configuration at all there is exactly one provider, the embedded ``echo``.
* The environment alone can configure upstreams (no file needed): ``OPENAI_BASE_URL``
  and/or ``OPENAI_API_KEY`` (provider ``openai``), ``OLLAMA_API_URL`` (``ollama``),
  ``VLLM_BASE_URL`` (``vllm``), ``LLAMA_CPP_URL`` (``llama_cpp``), ``LMSTUDIO_BASE_URL``
  (``lmstudio``), ``GROQ_API_KEY``, ``OPENROUTER_API_KEY``, ``TOGETHER_API_KEY``, and
  ``ANTHROPIC_API_KEY`` / ``ANTHROPIC_BASE_URL`` (``anthropic``). The names are NodeTool's
  provider names, so a ``/chat`` message's ``provider`` field selects them.
* A ``--config`` file adds or overrides providers by name, maps models, sets fallbacks and
  the default provider (see ``EXAMPLE_CONFIG``). Other top-level tables are left to their
  own readers (API keys and limits live in the same file).
* ``--model-path FILE`` / ``--local`` (``load_settings(model_path=...)``), or a file's
  ``kind = "local"`` table with ``model_path``, add an in-process GGUF model
  (providers/local.py, the optional extra ``local``).
* Building the providers is separate from reading the settings, so settings can be
  checked (and refused with a clear message) before the server starts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wirechat.engine.config import StaticKey
from wirechat.engine.limits import KeyLimits

from .base import ChatProvider
from .echo import EchoProvider
from .registry import ProviderRouter

EXAMPLE_CONFIG = """\
# wirechat.toml: pass with --config wirechat.toml
default_provider = "ollama"     # models no provider claims go here

[providers.ollama]              # any OpenAI-compatible server
kind = "openai"
base_url = "http://127.0.0.1:11434/v1"

[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"  # or: api_key = "sk-..."
models = ["gpt-4o-mini", "gpt-4o"]  # optional: claimed without asking the upstream
connect_timeout = 10

[providers.anthropic]
kind = "anthropic"
api_key_env = "ANTHROPIC_API_KEY"

[models]                        # explicit routes, also listed by /v1/models
"fast" = { provider = "ollama", model = "llama3.2:1b" }
"gpt-4o-mini" = "openai"

[fallbacks]                     # tried in order when a model fails before its first token
"gpt-4o-mini" = ["anthropic/claude-3-5-haiku-latest", "ollama/llama3.2"]

# API keys (--auth-provider static or supabase), accepted beside WORKER_AUTH_TOKEN.
[[keys]]
name = "alice"                  # the user id: owns alice's /chat threads and jobs
token_env = "ALICE_KEY"         # or: token = "..." (keep secrets out of files you share)
models = ["echo", "fast", "openai/*"]  # optional: the models this key may use (* = prefix)
requests_per_minute = 60        # optional limits, each a token bucket refilled per minute
tokens_per_minute = 40000       # prompt + completion tokens, as the provider counts them
concurrent_streams = 4          # generations (completions, /chat turns) at the same time

[[keys]]
name = "ci"
token_env = "CI_KEY"
"""

_KINDS = ("openai", "anthropic", "echo", "local")

# Environment variable → (provider name, default base URL); OpenAI-compatible upstreams.
_OPENAI_COMPATIBLE_ENV: tuple[tuple[str, str, str | None, str | None], ...] = (
    # (name, URL variable, key variable, default URL)
    ("ollama", "OLLAMA_API_URL", None, None),
    ("vllm", "VLLM_BASE_URL", "VLLM_API_KEY", None),
    ("llama_cpp", "LLAMA_CPP_URL", None, None),
    ("lmstudio", "LMSTUDIO_BASE_URL", None, None),
    ("groq", "GROQ_BASE_URL", "GROQ_API_KEY", "https://api.groq.com/openai/v1"),
    ("openrouter", "OPENROUTER_BASE_URL", "OPENROUTER_API_KEY", "https://openrouter.ai/api/v1"),
    ("together", "TOGETHER_BASE_URL", "TOGETHER_API_KEY", "https://api.together.xyz/v1"),
)


class ConfigError(ValueError):
    """The configuration cannot be used; the message says what to change."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    name: str
    kind: str  # "openai", "anthropic", "echo" or "local"
    base_url: str | None = None
    api_key: str | None = None
    models: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    model_path: str | None = None  # kind "local": the GGUF file


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterSettings:
    providers: tuple[ProviderSettings, ...] = ()
    model_map: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default: str | None = None
    record_dir: str | None = None
    replay_dir: str | None = None
    replay_timing: bool = False


def _with_v1(url: str) -> str:
    """Ollama, llama.cpp and LM Studio are often given without their ``/v1`` suffix."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def from_environment(env: Mapping[str, str]) -> list[ProviderSettings]:
    def get(name: str | None) -> str | None:
        value = env.get(name) if name else None
        return value.strip() if value and value.strip() else None

    found: list[ProviderSettings] = []
    openai_url, openai_key = get("OPENAI_BASE_URL"), get("OPENAI_API_KEY")
    if openai_url or openai_key:
        found.append(
            ProviderSettings(
                name="openai",
                kind="openai",
                base_url=openai_url or "https://api.openai.com/v1",
                api_key=openai_key,
            )
        )
    for name, url_var, key_var, default_url in _OPENAI_COMPATIBLE_ENV:
        url, key = get(url_var), get(key_var)
        if url or (key and default_url):
            base = url or default_url
            assert base is not None
            if url and name in ("ollama", "llama_cpp", "lmstudio"):
                base = _with_v1(url)
            found.append(ProviderSettings(name=name, kind="openai", base_url=base, api_key=key))
    anthropic_key = get("ANTHROPIC_API_KEY")
    if anthropic_key:
        found.append(
            ProviderSettings(
                name="anthropic",
                kind="anthropic",
                base_url=get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com",
                api_key=anthropic_key,
            )
        )
    return found


def _provider_from_table(name: str, table: Any, env: Mapping[str, str]) -> ProviderSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"[providers.{name}] must be a table")
    kind = table.get("kind", "openai")
    if kind not in _KINDS:
        raise ConfigError(f"[providers.{name}] kind must be one of {', '.join(_KINDS)}")
    base_url = table.get("base_url")
    if kind == "openai" and not isinstance(base_url, str):
        raise ConfigError(f"[providers.{name}] needs base_url")
    api_key = table.get("api_key")
    key_env = table.get("api_key_env")
    if api_key is None and isinstance(key_env, str):
        api_key = env.get(key_env) or None
    if kind == "anthropic" and not api_key:
        raise ConfigError(f"[providers.{name}] needs api_key or api_key_env (set and non-empty)")
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"[providers.{name}] models must be a list of strings")
    timeout = table.get("connect_timeout", 10.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"[providers.{name}] connect_timeout must be a positive number")
    if kind == "anthropic" and base_url is None:
        base_url = "https://api.anthropic.com"
    model_path = table.get("model_path")
    if kind == "local" and not isinstance(model_path, str):
        raise ConfigError(f"[providers.{name}] needs model_path (a GGUF file)")
    return ProviderSettings(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key=api_key,
        models=tuple(models),
        connect_timeout=float(timeout),
        model_path=model_path if kind == "local" else None,
    )


_KEY_LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")


def load_keys(
    config_path: str | None, env: Mapping[str, str] | None = None
) -> tuple[StaticKey, ...]:
    """The ``[[keys]]`` of a config file: static API keys with their names and limits."""
    if not config_path:
        return ()
    env = os.environ if env is None else env
    tables = _read_toml(config_path).get("keys", [])
    if not isinstance(tables, list):
        raise ConfigError("keys must be an array of tables: [[keys]]")
    keys: list[StaticKey] = []
    for number, table in enumerate(tables, 1):
        where = f"[[keys]] #{number}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(table) - {"name", "token", "token_env", "models", *_KEY_LIMITS}
        if unknown:
            raise ConfigError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        token = table.get("token")
        if token is None and isinstance(table.get("token_env"), str):
            token = env.get(table["token_env"]) or None
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(f"{where} needs token, or token_env naming a set variable")
        name = table.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError(f"{where} name must be a non-empty string")
        models = table.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where} models must be a list of model ids")
        numbers = {limit: table.get(limit) for limit in _KEY_LIMITS}
        for limit, value in numbers.items():
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigError(f"{where} {limit} must be a whole number of at least 1")
        limits = KeyLimits(models=tuple(models), **numbers)
        keys.append(StaticKey.from_token(token.strip(), name, limits))
    return tuple(keys)


def _read_toml(config_path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid TOML: {exc}") from None


def load_settings(
    config_path: str | None,
    env: Mapping[str, str] | None = None,
    *,
    default: str | None = None,
    record_dir: str | None = None,
    replay_dir: str | None = None,
    replay_timing: bool = False,
    model_path: str | None = None,
) -> RouterSettings:
    """Settings from the environment, then the file (which wins by provider name), then
    ``model_path`` (a GGUF file served in-process as provider ``local``)."""
    env = os.environ if env is None else env
    providers = {p.name: p for p in from_environment(env)}
    model_map: dict[str, tuple[str, str]] = {}
    fallbacks: dict[str, tuple[str, ...]] = {}
    file_default: str | None = None
    if config_path:
        data = _read_toml(config_path)
        tables = data.get("providers", {})
        if not isinstance(tables, dict):
            raise ConfigError("[providers] must be a table of tables")
        for name, table in tables.items():
            providers[name] = _provider_from_table(name, table, env)
        for model, target in dict(data.get("models", {})).items():
            if isinstance(target, str):
                model_map[model] = (target, model)
            elif isinstance(target, dict) and isinstance(target.get("provider"), str):
                model_map[model] = (target["provider"], str(target.get("model") or model))
            else:
                raise ConfigError(f"[models] {model!r} must name a provider")
        for model, chain in dict(data.get("fallbacks", {})).items():
            if not isinstance(chain, list) or not all(isinstance(m, str) for m in chain):
                raise ConfigError(f"[fallbacks] {model!r} must be a list of model ids")
            fallbacks[model] = tuple(chain)
        raw_default = data.get("default_provider")
        if raw_default is not None and not isinstance(raw_default, str):
            raise ConfigError("default_provider must be a provider name")
        file_default = raw_default
    if model_path:
        providers["local"] = ProviderSettings(name="local", kind="local", model_path=model_path)
    names = {"wirechat", "echo", *providers}
    for model, (name, _) in model_map.items():
        if name not in names:
            raise ConfigError(f"[models] {model!r} names an unknown provider {name!r}")
    chosen = default or file_default
    if chosen is None and len(providers) == 1:
        # One upstream configured (say OPENAI_BASE_URL alone): it answers every model
        # that echo does not, which is what pointing wirechat at it means.
        chosen = next(iter(providers))
    if chosen is not None and chosen not in names and chosen != "replay":
        raise ConfigError(f"unknown provider {chosen!r}; configured: {', '.join(sorted(names))}")
    return RouterSettings(
        providers=tuple(providers.values()),
        model_map=model_map,
        fallbacks=fallbacks,
        default="wirechat" if chosen == "echo" else chosen,  # echo's provider is "wirechat"
        record_dir=record_dir,
        replay_dir=replay_dir,
        replay_timing=replay_timing,
    )


def _echo() -> EchoProvider:
    """The echo model; ``WIRECHAT_ECHO_YIELD_EVERY=N`` makes it yield to the event loop every
    N words (default 64; 1 for benchmarks that compare it with token-by-token servers)."""
    value = os.environ.get("WIRECHAT_ECHO_YIELD_EVERY")
    try:
        return EchoProvider(int(value)) if value else EchoProvider()
    except ValueError:
        raise ConfigError(
            f"WIRECHAT_ECHO_YIELD_EVERY must be a whole number of at least 1, not {value!r}"
        ) from None


def build_provider(settings: ProviderSettings) -> ChatProvider:
    if settings.kind == "echo":
        return _echo()
    if settings.kind == "local":
        from .local import LocalProvider

        assert settings.model_path is not None
        return LocalProvider(
            name=settings.name,
            model_path=settings.model_path,
            model_id=settings.models[0] if settings.models else None,
        )
    if settings.kind == "anthropic":
        from .anthropic import AnthropicProvider

        return AnthropicProvider(
            name=settings.name,
            api_key=settings.api_key,
            base_url=settings.base_url or "https://api.anthropic.com",
            models=settings.models,
            connect_timeout=settings.connect_timeout,
        )
    from .openai_compat import OpenAICompatProvider

    assert settings.base_url is not None
    return OpenAICompatProvider(
        name=settings.name,
        base_url=settings.base_url,
        api_key=settings.api_key,
        models=settings.models,
        connect_timeout=settings.connect_timeout,
    )


def build_router(settings: RouterSettings) -> ProviderRouter:
    """The router for ``settings``: echo first, then the upstreams (recorded if asked),
    then the replay provider."""
    providers: list[ChatProvider] = [_echo()]
    for provider_settings in settings.providers:
        provider = build_provider(provider_settings)
        if settings.record_dir:
            from .recording import RecordingProvider

            provider = RecordingProvider(provider, settings.record_dir)
        providers.append(provider)
    if settings.replay_dir:
        from .recording import ReplayProvider

        providers.append(ReplayProvider(settings.replay_dir, timing=settings.replay_timing))
    return ProviderRouter(
        providers,
        model_map=settings.model_map,
        fallbacks=settings.fallbacks,
        default=settings.default,
    )
