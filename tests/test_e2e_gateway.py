"""wirechat as a gateway: a second wirechat (echo) is the OpenAI-compatible upstream.

The official ``openai`` client talks to the gateway; the gateway's ``openai`` provider
(configured by ``OPENAI_BASE_URL`` alone) talks to the upstream over httpx. Model ids with
the ``openai/`` prefix go upstream, so ``openai/echo`` is the upstream's echo.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import openai
import pytest
from conftest import ServerFactory, ServerProcess

CANCELLED = "provider call"  # the upstream's debug line: "provider call N for echo cancelled"


def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=10)


@pytest.fixture
def pair(server_factory: ServerFactory) -> tuple[ServerProcess, ServerProcess]:
    upstream = server_factory("--log-level", "debug")
    gateway = server_factory(
        "--log-level", "debug", env={"OPENAI_BASE_URL": f"{upstream.base_url}/v1"}
    )
    return upstream, gateway


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_of_both_providers_are_listed(pair: tuple[ServerProcess, ServerProcess]) -> None:
    _, gateway = pair
    models = {(m.id, m.owned_by) for m in client(gateway).models.list()}
    assert ("echo", "wirechat") in models  # the gateway's own
    assert ("echo", "openai") in models  # the upstream's, owned by the provider name


def test_completions_through_the_gateway(pair: tuple[ServerProcess, ServerProcess]) -> None:
    _, gateway = pair
    api = client(gateway)
    reply = api.chat.completions.create(model="openai/echo", messages=user("through the pipe"))
    assert reply.choices[0].message.content == "through the pipe"
    assert reply.model == "openai/echo"
    assert reply.usage is not None and reply.usage.completion_tokens == 3

    stream = api.chat.completions.create(
        model="openai/echo",
        messages=user("one two three"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]


def test_tool_calls_through_the_gateway(pair: tuple[ServerProcess, ServerProcess]) -> None:
    _, gateway = pair
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    api = client(gateway)
    with api.chat.completions.stream(
        model="openai/echo",
        messages=user('/tool get_weather {"city": "Oslo"}'),
        tools=tools,  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    answer = api.chat.completions.create(
        model="openai/echo",
        messages=[
            *user('/tool get_weather {"city": "Oslo"}'),
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],  # type: ignore[list-item]
        tools=tools,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.content == "tool get_weather returned: sunny"


def test_upstream_errors_reach_the_client_as_openai_errors(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    _, gateway = pair
    api = client(gateway)
    with pytest.raises(openai.RateLimitError) as limited:
        api.chat.completions.create(model="openai/echo", messages=user("/error 429"))
    assert limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError) as bad:
        api.chat.completions.create(model="openai/echo", messages=user("/error 500"))
    assert bad.value.status_code == 502
    assert bad.value.response.headers["x-should-retry"] == "true"
    with pytest.raises(openai.APIError) as midway:
        for _ in api.chat.completions.create(
            model="openai/echo", messages=user("/error-mid 500 some words"), stream=True
        ):
            pass
    assert not isinstance(midway.value, openai.APIStatusError)


def test_unreachable_upstream_is_a_502(server_factory: ServerFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    gateway = server_factory(env={"OPENAI_BASE_URL": f"http://127.0.0.1:{closed_port}/v1"})
    with pytest.raises(openai.InternalServerError) as caught:
        client(gateway).chat.completions.create(model="openai/echo", messages=user("hi"))
    assert caught.value.status_code == 502
    # echo, served by the gateway itself, is unaffected; the listing skips the dead upstream.
    assert client(gateway).chat.completions.create(model="echo", messages=user("ok"))
    assert [m.id for m in client(gateway).models.list()] == ["echo"]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_closes_the_upstream_request(
    pair: tuple[ServerProcess, ServerProcess], stream: bool
) -> None:
    upstream, gateway = pair
    body = json.dumps(
        {"model": "openai/echo", "messages": user("/slow 300 a b c d e f g h"), "stream": stream}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(head + body)
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.5)  # the upstream call is under way
    closed_at = time.monotonic()
    # Bounds with room for a loaded machine: a leak would never log the cancel at all.
    assert upstream.wait_for_log(CANCELLED, timeout=5.0), upstream.log()[-2000:]
    assert time.monotonic() - closed_at < 5.0
    assert gateway.wait_for_log(CANCELLED, timeout=2.0)


def test_record_then_replay_gives_the_same_conversation(
    pair: tuple[ServerProcess, ServerProcess], server_factory: ServerFactory, tmp_path: Path
) -> None:
    upstream, _ = pair
    recordings = tmp_path / "recordings"
    recorder = server_factory(
        "--record", str(recordings), env={"OPENAI_BASE_URL": f"{upstream.base_url}/v1"}
    )
    prompts = ["hello recorded world", "/error 429"]

    def run(srv: ServerProcess, model: str) -> list[str]:
        api = client(srv)
        seen = []
        for prompt in prompts:
            try:
                chunks = api.chat.completions.create(
                    model=model, messages=user(prompt), stream=True
                )
                seen.append(
                    json.dumps([c.choices[0].delta.model_dump() for c in chunks if c.choices])
                )
            except openai.APIStatusError as exc:
                seen.append(f"{exc.status_code} {exc.response.headers.get('retry-after')}")
        return seen

    recorded = run(recorder, "openai/echo")
    files = sorted(recordings.glob("*.json"))
    assert len(files) == 2
    assert json.loads(files[0].read_text())["format"] == "wirechat-recording/1"

    replayer = server_factory("--replay", str(recordings))
    assert ("echo", "replay") in {(m.id, m.owned_by) for m in client(replayer).models.list()}
    first = run(replayer, "replay/echo")
    second = run(replayer, "replay/echo")
    assert first == second == recorded
    with pytest.raises(openai.NotFoundError) as missing:
        client(replayer).chat.completions.create(model="replay/echo", messages=user("never said"))
    assert missing.value.code == "recording_not_found"
