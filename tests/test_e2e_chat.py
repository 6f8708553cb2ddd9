"""The ``/chat`` WebSocket end to end: the real server, the ``websockets`` client as a peer.

Each test talks to a server process on 127.0.0.1 (``conftest.py``) and bounds every wait.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import ServerFactory, ServerProcess
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 5.0
Frame = dict[str, Any]


def ws_url(srv: ServerProcess, query: str = "") -> str:
    return f"ws://{srv.host}:{srv.port}/chat{query}"


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


async def send(ws: ClientConnection, frame: Frame, *, binary: bool = False) -> None:
    await ws.send(msgpack.packb(frame) if binary else json.dumps(frame))


async def recv(ws: ClientConnection) -> Frame:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    value = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
    assert isinstance(value, dict)
    return value


async def turn(ws: ClientConnection, frame: Frame, *, binary: bool = False) -> list[Frame]:
    """Send a chat message; collect frames up to the final assistant message."""
    await send(ws, frame, binary=binary)
    frames: list[Frame] = []
    while True:
        reply = await recv(ws)
        frames.append(reply)
        if reply["type"] == "error":
            return frames
        final = reply["type"] == "message" and reply["role"] == "assistant"
        if final and not reply.get("tool_calls"):
            return frames


def text_of(frames: list[Frame]) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "chunk" and not f["done"])


def test_json_turn_streams_chunks_then_one_done_then_the_final_message(
    server: ServerProcess,
) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            frames = await turn(ws, {"role": "user", "content": "hello wide world"})
        assert text_of(frames) == "hello wide world"
        assert [f["content"] for f in frames if f["type"] == "chunk"][:3] == [
            "hello ",
            "wide ",
            "world",
        ]
        done = [f for f in frames if f["type"] == "chunk" and f["done"]]
        assert done == [{"type": "chunk", "content": "", "done": True, "thread_id": ANY}]
        final = frames[-1]
        assert final["type"] == "message" and final["role"] == "assistant"
        assert final["content"] == "hello wide world"
        assert final["model"] == "echo"
        thread_ids = {f["thread_id"] for f in frames}
        assert len(thread_ids) == 1 and next(iter(thread_ids))

    run(main)


class _Any:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY = _Any()


def test_messagepack_turn_is_answered_in_messagepack(server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            await send(ws, {"role": "user", "content": "binary please"}, binary=True)
            first = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert isinstance(first, bytes)
            frames = [msgpack.unpackb(first)]
            while frames[-1]["type"] != "message":
                raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
                assert isinstance(raw, bytes)
                frames.append(msgpack.unpackb(raw))
        assert text_of(frames) == "binary please"

    run(main)


def test_encoding_mirrors_the_latest_client_frame(server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            await send(ws, {"type": "ping"}, binary=True)
            assert isinstance(await asyncio.wait_for(ws.recv(), TIMEOUT), bytes)
            await send(ws, {"type": "ping"})
            reply = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert isinstance(reply, str)
            assert json.loads(reply)["type"] == "pong"

    run(main)


def test_calculator_tool_round(server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            frames = await turn(
                ws,
                {
                    "role": "user",
                    "content": '/tool calculator {"expression": "2 + 3 * 4"}',
                    "tools": ["calculator"],
                },
            )
        kinds = [f["type"] for f in frames]
        call = next(f for f in frames if f["type"] == "tool_call")
        result = next(f for f in frames if f["type"] == "tool_result")
        assert call["name"] == "calculator" and call["args"] == {"expression": "2 + 3 * 4"}
        assert result["tool_call_id"] == call["tool_call_id"]
        assert result["ok"] is True and result["result"] == 14
        assert kinds.index("tool_call") < kinds.index("tool_result")
        tool_message = next(f for f in frames if f["type"] == "message" and f["role"] == "tool")
        assert tool_message["content"] == "14"
        assert frames[-1]["content"] == "tool calculator returned: 14"
        assert sum(1 for f in frames if f["type"] == "chunk" and f["done"]) == 1

    run(main)


def test_unknown_tool_name_is_an_error_frame_and_the_socket_stays_open(
    server: ServerProcess,
) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            frames = await turn(ws, {"role": "user", "content": "x", "tools": ["nope"]})
            assert frames == [{"type": "error", "message": "Tool nope not found"}]
            again = await turn(ws, {"role": "user", "content": "still here"})
            assert text_of(again) == "still here"

    run(main)


def test_client_tool_round_trip(server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            await send(
                ws,
                {
                    "type": "client_tools_manifest",
                    "tools": [
                        {
                            "name": "pick_color",
                            "description": "Ask the user for a colour",
                            "parameters": {"type": "object", "properties": {}},
                        }
                    ],
                },
            )
            await send(ws, {"role": "user", "content": '/tool pick_color {"hint": "warm"}'})
            while (frame := await recv(ws))["type"] != "tool_call":
                pass
            assert frame["name"] == "pick_color" and frame["args"] == {"hint": "warm"}
            await send(
                ws,
                {
                    "type": "tool_result",
                    "tool_call_id": frame["tool_call_id"],
                    "ok": True,
                    "result": {"color": "red"},
                },
            )
            rest: list[Frame] = []
            while not ((f := await recv(ws))["type"] == "message" and f["role"] == "assistant"):
                rest.append(f)
            result = next(f for f in rest if f["type"] == "tool_result")
            assert result["ok"] is True and result["result"] == {"color": "red"}
            assert f["content"] == 'tool pick_color returned: {"color":"red"}'

    run(main)


def test_stop_mid_turn_gives_exactly_one_generation_stopped(server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            await send(ws, {"role": "user", "content": "/slow 200 a b c d e f g h i j"})
            first = await recv(ws)
            assert first["type"] == "chunk" and first["content"] == "a "
            await send(ws, {"type": "stop"})
            stopped = [await recv(ws)]
            # Nothing of the stopped turn follows: the next frame answers our ping.
            await send(ws, {"type": "ping"})
            while (frame := await recv(ws))["type"] != "pong":
                stopped.append(frame)
        assert [f["type"] for f in stopped] == ["generation_stopped"]
        assert stopped[0]["message"] == "Generation stopped by user"

    run(main)


def test_a_new_message_supersedes_the_running_turn(server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(server)) as ws:
            await send(ws, {"role": "user", "content": "/slow 300 a b c d e f"})
            await recv(ws)
            frames = await turn(ws, {"role": "user", "content": "second"})
        kinds = [f["type"] for f in frames]
        assert kinds.count("generation_stopped") == 1
        assert kinds[0] == "generation_stopped"
        assert text_of(frames[1:]) == "second"

    run(main)


def test_history_is_shared_across_connections_and_survives_a_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    env = {"WIRECHAT_DB": str(tmp_path / "threads.db")}
    thread = {"thread_id": "t-persist"}

    async def first_session(srv: ServerProcess) -> None:
        async with connect(ws_url(srv)) as ws:
            await turn(ws, {"role": "user", "content": "one", **thread})
        async with connect(ws_url(srv)) as ws:  # another connection, same thread
            frames = await turn(ws, {"role": "user", "content": "/history", **thread})
        assert frames[-1]["content"] == "history: 2 messages"

    srv = server_factory(env=env)
    run(lambda: first_session(srv))
    assert srv.stop() == 0

    async def after_restart(srv: ServerProcess) -> None:
        async with connect(ws_url(srv)) as ws:
            frames = await turn(ws, {"role": "user", "content": "/history", **thread})
        # one, its answer, /history, its answer: all stored before the restart.
        assert frames[-1]["content"] == "history: 4 messages"

    restarted = server_factory(env=env)
    run(lambda: after_restart(restarted))


def test_a_user_cannot_read_or_extend_another_users_thread(server_factory: ServerFactory) -> None:
    srv = server_factory(
        "--auth-provider", "static", env={"WORKER_AUTH_TOKEN": "alice-token,bob-token"}
    )
    thread = {"thread_id": "t-alice"}

    async def main() -> None:
        async with connect(ws_url(srv, "?api_key=alice-token")) as alice:
            await turn(alice, {"role": "user", "content": "secret", **thread})
        headers = {"Authorization": "Bearer bob-token"}
        async with connect(ws_url(srv), additional_headers=headers) as bob:
            frames = await turn(
                bob, {"role": "user", "content": "/history", "thread_id": "t-alice"}
            )
            assert frames == [
                {"type": "error", "message": "Thread not found", "thread_id": "t-alice"}
            ]
        async with connect(ws_url(srv, "?token=alice-token")) as alice:
            frames = await turn(
                alice, {"role": "user", "content": "/history", "thread_id": "t-alice"}
            )
            assert frames[-1]["content"] == "history: 2 messages"

    run(main)


@pytest.mark.parametrize(
    ("query", "reason"),
    [("", "Missing authentication"), ("?api_key=wrong", "Invalid authentication")],
)
def test_bad_token_is_accepted_then_closed_1008(
    server_factory: ServerFactory, query: str, reason: str
) -> None:
    srv = server_factory("--auth-provider", "static", env={"WORKER_AUTH_TOKEN": "right"})

    async def main() -> None:
        async with connect(ws_url(srv, query)) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == reason

    run(main)
    assert "right" not in srv.log()


def test_oversized_message_closes_1009(server_factory: ServerFactory) -> None:
    srv = server_factory("--max-ws-message-bytes", "1000")

    async def main() -> None:
        async with connect(ws_url(srv), max_size=None) as ws:
            await send(ws, {"role": "user", "content": "x" * 2000})
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    run(main)


def test_non_upgrade_get_chat_is_a_clear_426(server: ServerProcess) -> None:
    import httpx

    response = httpx.get(f"{server.base_url}/chat", timeout=TIMEOUT)
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert "WebSocket" in response.json()["error"]["message"]


def test_thousand_idle_connections_are_accepted_and_each_answers_a_ping(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory("--log-level", "warning")
    count = 1000

    async def main() -> None:
        sockets: list[ClientConnection] = []
        try:
            for _ in range(count // 100):
                batch = [connect(ws_url(srv), ping_interval=None) for _ in range(100)]
                sockets += await asyncio.gather(*batch)
            assert len(sockets) == count
            await asyncio.sleep(0.5)  # idle, all of them at once
            for ws in sockets:
                await send(ws, {"type": "ping"})
            replies = await asyncio.gather(*(recv(ws) for ws in sockets))
            assert all(reply["type"] == "pong" for reply in replies)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

    run(main)


def test_websockets_library_sees_a_clean_close_on_server_shutdown(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory()

    async def main() -> None:
        async with connect(ws_url(srv)) as ws:
            await send(ws, {"type": "ping"})
            await recv(ws)
            srv.signal()
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    run(main)
    assert srv.wait() == 0
