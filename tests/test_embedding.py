"""wirechat embedded in a Python program, and its engine driven without the transport."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
from wirechat.providers.tools import tool
from wirechat.providers.workflows import WorkflowContext, workflow

import wirechat

REPO = Path(__file__).resolve().parent.parent


@tool
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@workflow(inputs=("message",))
async def reverse(ctx: WorkflowContext, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Reverse a message."""
    ctx.output("reversed", str(inputs["message"])[::-1])
    return None


def test_start_serves_inside_a_running_program() -> None:
    async def main() -> None:
        async with wirechat.start(tools=[shout], workflows=[reverse]) as running:
            assert running.port > 0
            client = openai.AsyncOpenAI(
                base_url=running.base_url + "/v1", api_key="x", max_retries=0
            )
            reply = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "embedded"}]
            )
            assert reply.choices[0].message.content == "embedded"
            assert "shout" in {t.name for t in running.server.tools.specs()}
            async with httpx.AsyncClient(base_url=running.base_url) as http:
                listed = (await http.get("/workflows")).json()
            assert [w["id"] for w in listed["workflows"]] == ["reverse"]
            await client.close()
        # After the block the port is closed.
        try:
            _, writer = await asyncio.open_connection(running.host, running.port)
        except OSError:
            return
        writer.close()
        raise AssertionError("the server still accepts connections after the block")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_importing_wirechat_does_not_load_asyncio() -> None:
    code = "import sys, wirechat; print('asyncio' in sys.modules)"
    before = subprocess.run(
        [sys.executable, "-c", "import sys; print('asyncio' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert after.stdout == before.stdout


def test_the_engine_serves_a_completion_over_blocking_sockets() -> None:
    process = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "blocking_server.py"), "--requests", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
        reply = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "no event loop here"}]
        )
        assert reply.choices[0].message.content == "no event loop here"
        stream = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "one two"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == "one two"
        client.close()
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
