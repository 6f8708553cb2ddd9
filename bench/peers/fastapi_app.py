"""The FastAPI + uvicorn peer: the same endpoints and payloads, written the usual FastAPI way.

* ``POST /v1/chat/completions``: a pydantic request model (extra fields allowed), a
  ``JSONResponse`` answer, or a ``StreamingResponse`` of SSE events with the same sequence as
  wirechat (role chunk, one chunk per word, finish chunk, ``[DONE]``); the generator yields to
  the event loop between words, as wirechat's echo model does.
* ``GET /v1/models``.
* ``WS /chat``: NodeTool's turn (one ``chunk`` frame per word, the done chunk, the final
  ``message``) in the client's encoding (text: JSON, binary: MessagePack); ``{"type":
  "ping"}`` answers ``pong``.
* ``--upstream URL`` (W6): ``POST /v1/chat/completions`` is instead a pass-through gateway
  over one pooled ``httpx.AsyncClient``, streaming the upstream's bytes as they come (the
  ``provider/`` prefix of the model is removed, as wirechat does).

Run: ``python bench/peers/fastapi_app.py --port P --http httptools --loop uvloop``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

_WORD = re.compile(r"\S+\s*")

app = FastAPI()
UPSTREAM: str | None = None
_client: Any = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: dict[str, Any] | None = None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _last_user(messages: list[Message]) -> str:
    return next((m.content or "" for m in reversed(messages) if m.role == "user"), "")


@app.get("/v1/models")
async def models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": "echo", "object": "model", "created": 1735689600, "owned_by": "wirechat"}],
    }


@app.post("/v1/chat/completions", response_model=None)
async def completions(request: ChatCompletionRequest) -> Response:
    if UPSTREAM is not None:
        return await _proxy(request)
    text = _last_user(request.messages)
    cid = "chatcmpl-" + secrets.token_hex(15)
    created = int(time.time())
    words = len(text.split())
    if request.stream:
        return StreamingResponse(
            _events(text, request.model, cid, created), media_type="text/event-stream"
        )
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": words,
                "completion_tokens": words,
                "total_tokens": 2 * words,
            },
        }
    )


async def _events(text: str, model: str, cid: str, created: int) -> AsyncIterator[str]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def event(delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {_dumps({**base, 'choices': [choice]})}\n\n"

    yield event({"role": "assistant", "content": "", "refusal": None}, None)
    for index, word in enumerate(_WORD.findall(text)):
        if index:
            await asyncio.sleep(0)
        yield event({"content": word}, None)
    yield event({}, "stop")
    yield "data: [DONE]\n\n"


async def _proxy(request: ChatCompletionRequest) -> Response:
    import httpx

    global _client
    if _client is None:
        _client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10),
            limits=httpx.Limits(max_keepalive_connections=64),
        )
    body = request.model_dump(exclude_none=True)
    body["model"] = body["model"].split("/", 1)[-1]
    upstream = _client.build_request("POST", f"{UPSTREAM}/chat/completions", json=body)
    response = await _client.send(upstream, stream=True)
    if not request.stream:
        content = await response.aread()
        await response.aclose()
        return Response(content, status_code=response.status_code, media_type="application/json")

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for piece in response.aiter_raw():
                yield piece
        finally:
            await response.aclose()

    return StreamingResponse(relay(), media_type="text/event-stream")


@app.websocket("/chat")
async def chat(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            binary = message.get("bytes") is not None
            frame = msgpack.unpackb(message["bytes"]) if binary else json.loads(message["text"])

            async def send(payload: dict[str, Any], binary: bool = binary) -> None:
                if binary:
                    await ws.send_bytes(msgpack.packb(payload, use_bin_type=True))
                else:
                    await ws.send_text(_dumps(payload))

            if frame.get("type") == "ping":
                await send({"type": "pong", "ts": time.time()})
                continue
            text = str(frame.get("content") or "")
            thread_id = frame.get("thread_id") or "thread_" + secrets.token_hex(12)
            for index, word in enumerate(_WORD.findall(text)):
                if index:
                    await asyncio.sleep(0)
                await send(
                    {
                        "type": "chunk",
                        "content": word,
                        "content_type": "text",
                        "done": False,
                        "thread_id": thread_id,
                    }
                )
            await send({"type": "chunk", "content": "", "done": True, "thread_id": thread_id})
            await send(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": text,
                    "thread_id": thread_id,
                    "model": frame.get("model") or "echo",
                    "provider": None,
                    "agent_mode": False,
                }
            )
    except WebSocketDisconnect:
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http", default="httptools", choices=["h11", "httptools"])
    parser.add_argument("--loop", default="uvloop", choices=["asyncio", "uvloop"])
    parser.add_argument("--upstream", help="gateway mode: an OpenAI-compatible base URL")
    args = parser.parse_args()
    global UPSTREAM
    UPSTREAM = args.upstream.rstrip("/") if args.upstream else None
    import uvicorn

    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        http=args.http,
        loop=args.loop,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
