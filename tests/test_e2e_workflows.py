"""Workflows end to end: the real server, the ``websockets`` client and httpx as peers.

The example workflows (``examples/``) and the test ones (``tests/workflows_for_tests.py``)
run over ``/predict`` (JSON and MessagePack), over ``/chat`` with ``workflow_id``, over HTTP
(``/workflows``), and as the ``workflow_<id>`` tool of a ``/chat`` turn. Every wait is
bounded: each frame by ``TIMEOUT``, each test by ``TEST_TIMEOUT``.

Most tests share one module-scoped server (``running_server`` from ``conftest.py``: it
must exit 0 on SIGTERM, running jobs included); the ones that need other flags (static
auth, ``worker``) start their own with ``server_factory``.

Specs: PROTOCOL.md §3-§5; reference/nodetool-spec.md §3.9, §4, §5 and §6.3.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
from conftest import ServerFactory, ServerProcess, running_server
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wirechat.engine import StaticKey

TIMEOUT = 2.0
TEST_TIMEOUT = 20.0
Frame = dict[str, Any]

EXAMPLES = [
    "--workflow",
    "examples/workflows.py:WORKFLOWS",
    "--workflow",
    "examples/echo_graph.json",
]
TEST_WORKFLOWS = ["--workflow", "tests/workflows_for_tests.py:WORKFLOWS"]
TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def wf_server(server_dir: Path) -> Iterator[ServerProcess]:
    """``serve`` with the examples and the test workflows (local auth)."""
    log_path = Path(tempfile.mkdtemp(prefix="workflows-", dir=server_dir)) / "server.log"
    args = ["--db", ":memory:", "--log-level", "debug", *EXAMPLES, *TEST_WORKFLOWS]
    with running_server(args, log_path=log_path) as srv:
        yield srv


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), TEST_TIMEOUT))


def ws_url(srv: ServerProcess, path: str = "/predict", query: str = "") -> str:
    return f"ws://{srv.host}:{srv.port}{path}{query}"


def is_terminal(event: Frame, job_id: str) -> bool:
    return (
        event.get("type") == "job_update"
        and event.get("job_id") == job_id
        and event.get("status") in TERMINAL
    )


class Predict:
    """One ``/predict`` socket: commands with their direct replies, and the job events."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: list[Frame] = []  # events read while waiting for a reply
        self.encodings: list[str] = []  # of every frame received

    async def send(self, command: Any, data: Any = None, *, binary: bool = False) -> None:
        payload = {"command": command, "data": {} if data is None else data}
        await self.ws.send(msgpack.packb(payload) if binary else json.dumps(payload))

    async def read(self) -> Frame:
        raw = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        if isinstance(raw, bytes):
            self.encodings.append("msgpack")
            value = msgpack.unpackb(raw, raw=False)
        else:
            self.encodings.append("json")
            value = json.loads(raw)
        assert isinstance(value, dict), value
        return value

    async def reply(self) -> Frame:
        """The next direct reply (no ``type``); events read meanwhile are kept for later."""
        while True:
            frame = await self.read()
            if "type" not in frame:
                return frame
            self.pending.append(frame)

    async def call(self, command: Any, data: Any = None, *, binary: bool = False) -> Frame:
        await self.send(command, data, binary=binary)
        try:
            return await self.reply()
        except TimeoutError:
            raise AssertionError(f"no reply to {command!r} within {TIMEOUT}s") from None

    async def event(self) -> Frame:
        if self.pending:
            return self.pending.pop(0)
        frame = await self.read()
        assert "type" in frame, f"a reply nobody asked for: {frame}"
        return frame

    async def events_until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        """Events up to and including the first for which ``done`` is true."""
        events: list[Frame] = []
        while True:
            events.append(await self.event())
            if done(events[-1]):
                return events

    async def run_job(
        self, workflow_id: str, params: Frame | None = None, *, binary: bool = False
    ) -> str:
        data: Frame = {"workflow_id": workflow_id}
        if params is not None:
            data["params"] = params
        reply = await self.call("run_job", data, binary=binary)
        assert reply["message"] == "Job started", reply
        assert reply["workflow_id"] == workflow_id
        job_id = reply["job_id"]
        assert isinstance(job_id, str) and job_id
        return job_id

    async def job(self, job_id: str) -> list[Frame]:
        """The job's events up to its terminal ``job_update``."""
        events = await self.events_until(lambda e: is_terminal(e, job_id))
        return [e for e in events if e.get("job_id") == job_id]


async def chat_turn(ws: ClientConnection, message: Frame) -> list[Frame]:
    """Send a ``/chat`` message; frames up to the final assistant message (or an error)."""
    await ws.send(json.dumps(message))
    frames: list[Frame] = []
    while True:
        raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
        frame = json.loads(raw)
        frames.append(frame)
        if frame.get("type") == "error":
            return frames
        final = frame.get("type") == "message" and frame.get("role") == "assistant"
        if final and not frame.get("tool_calls"):
            return frames


def check_tags(events: list[Frame], job_id: str, workflow_id: str) -> None:
    for event in events:
        assert event["job_id"] == job_id and event["workflow_id"] == workflow_id, event


def statuses(events: list[Frame]) -> list[str]:
    return [e["status"] for e in events if e["type"] == "job_update"]


# --- the examples over /predict, in JSON and in MessagePack ---------------------------------

EXAMPLE_RUNS = [
    pytest.param("summarize", {"message": "hello wide world"}, {"summary": ["hello wide world"]}),
    pytest.param("echo_graph", {"message": "hi"}, {"reply": ["You said: hi"]}),
]


@pytest.mark.parametrize(("workflow_id", "params", "result"), EXAMPLE_RUNS)
@pytest.mark.parametrize("mode", ["json", "msgpack"])
def test_examples_over_predict(
    wf_server: ServerProcess, workflow_id: str, params: Frame, result: Frame, mode: str
) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            if mode == "msgpack":  # fixed while still sending JSON
                reply = await conn.call("set_mode", {"mode": "binary"})
                assert "error" not in reply
            job_id = await conn.run_job(workflow_id, params)
            events = await conn.job(job_id)
        assert set(conn.encodings) == {mode}
        check_tags(events, job_id, workflow_id)
        assert events[0] == {
            "type": "job_update",
            "status": "running",
            "job_id": job_id,
            "workflow_id": workflow_id,
        }
        assert set(statuses(events)[:-1]) == {"running"}
        final = events[-1]
        assert final["status"] == "completed" and final["result"] == result
        outputs = [e for e in events if e["type"] == "output_update"]
        assert [(o["output_name"], o["value"]) for o in outputs] == [
            (name, value) for name, values in result.items() for value in values
        ]
        if workflow_id == "summarize":
            progress = [(e["progress"], e["total"]) for e in events if e["type"] == "node_progress"]
            assert progress == [(1, 2), (2, 2)]
        else:
            nodes = [(e["node_id"], e["status"]) for e in events if e["type"] == "node_update"]
            for node in ("message", "prompt", "model", "reply"):
                assert nodes.index((node, "running")) < nodes.index((node, "completed"))
            assert len(nodes) == 8
            # Each node's output is reported; the chat node's is echo's reply.
            model = next(e for e in events if e.get("node_id") == "model" and "result" in e)
            assert model["result"] == {"output": "You said: hi"}

    run(main)


def test_malformed_frames_get_error_replies_and_the_socket_stays_usable(
    wf_server: ServerProcess,
) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            await ws.send("{}")
            assert "error" in await conn.reply()
            await ws.send(b"\xc1")
            assert "error" in await conn.reply()
            assert "error" in await conn.call("launch", {})
            assert "error" in await conn.call("run_job", {"workflow_id": "nope"})
            assert "error" in await conn.call("run_job", {"workflow_id": "summarize", "params": 3})
            job_id = await conn.run_job("summarize", {"message": "still here"})
            assert (await conn.job(job_id))[-1]["result"] == {"summary": ["still here"]}

    run(main)


def test_replies_come_at_once_and_in_command_order(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            # The last command is one the job runner answers: nothing comes after it that
            # could push its reply out.
            await conn.send("get_status", {"job_id": "0" * 32})
            await conn.send("clear_models")
            await conn.send("reconnect_job", {"job_id": "0" * 32})
            replies: list[Frame] = []
            for _ in range(3):
                try:
                    replies.append(await conn.reply())
                except TimeoutError:
                    raise AssertionError(f"only {replies} within {TIMEOUT}s") from None
            assert replies[0] == {"status": "not_found", "job_id": "0" * 32}
            assert replies[1] == {"message": "Unused models cleared"}
            assert "error" in replies[2]

    run(main)


# --- /chat with workflow_id ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workflow_id", "content", "answer"),
    [("summarize", "hello there", "hello there"), ("echo_graph", "hi", "You said: hi")],
)
def test_chat_with_workflow_id(
    wf_server: ServerProcess, workflow_id: str, content: str, answer: str
) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server, "/chat")) as ws:
            frames = await chat_turn(
                ws, {"role": "user", "content": content, "workflow_id": workflow_id}
            )
        thread_ids = {f.get("thread_id") for f in frames}
        assert len(thread_ids) == 1 and None not in thread_ids
        updates = [f for f in frames if f["type"] == "job_update"]
        assert updates[0]["status"] == "running" and updates[-1]["status"] == "completed"
        assert all(u["workflow_id"] == workflow_id for u in updates)
        assert any(f["type"] == "output_update" for f in frames)
        done = [f for f in frames if f["type"] == "chunk" and f.get("done")]
        assert len(done) == 1
        kinds = [f["type"] for f in frames]
        assert frames.index(updates[-1]) < frames.index(done[0]) == len(frames) - 2
        final = frames[-1]
        assert kinds[-1] == "message" and final["role"] == "assistant"
        assert final["content"] == answer
        assert final["workflow_assistant"] is True

    run(main)


def test_chat_workflow_gets_the_message_and_the_history(wf_server: ServerProcess) -> None:
    async def main() -> None:
        thread = {"thread_id": f"wf-history-{time.monotonic_ns()}"}
        async with connect(ws_url(wf_server, "/chat")) as ws:
            await chat_turn(ws, {"role": "user", "content": "plain turn", **thread})
            frames = await chat_turn(
                ws,
                {"role": "user", "content": "second", "workflow_id": "count_messages", **thread},
            )
        # The history: the first turn's two messages and this user message.
        assert frames[-1]["content"] == "3 messages, last: second"

    run(main)


def test_chat_with_an_unknown_workflow_is_an_error(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server, "/chat")) as ws:
            frames = await chat_turn(ws, {"role": "user", "content": "x", "workflow_id": "nope"})
            assert [f["type"] for f in frames] == ["error"]
            frames = await chat_turn(ws, {"role": "user", "content": "after"})
            assert frames[-1]["content"] == "after"

    run(main)


def test_stop_during_a_chat_workflow_turn(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server, "/chat")) as ws:
            await ws.send(json.dumps({"role": "user", "content": "x", "workflow_id": "gated"}))
            while True:  # until the gate node runs
                frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                if frame["type"] == "node_update" and frame["status"] == "running":
                    break
            job_id = frame["job_id"]
            await ws.send(json.dumps({"type": "stop"}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert frame["type"] == "generation_stopped"
            frames = await chat_turn(ws, {"role": "user", "content": "next"})
            assert [f["type"] for f in frames].count("generation_stopped") == 0
            assert frames[-1]["content"] == "next"
        # The job was cancelled, not left waiting for its gate.
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            for _ in range(50):
                status = await conn.call("get_status", {"job_id": job_id})
                if status["status"] != "running":
                    break
                await asyncio.sleep(0.02)
            assert status["status"] == "cancelled"

    run(main)


# --- HTTP: /workflows --------------------------------------------------------------------------


def sse_data(body: str) -> list[Any]:
    events = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_http_workflows(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=wf_server.base_url, timeout=TIMEOUT) as http:
            listing = (await http.get("/workflows")).json()["workflows"]
            by_id = {w["id"]: w for w in listing}
            assert by_id["summarize"]["inputs"] == ["message"]
            assert by_id["collect"]["inputs"] == ["text"]
            assert by_id["echo_graph"]["name"] == "Echo graph"
            assert by_id["echo_graph"]["inputs"] == ["message"]
            assert by_id["summarize"]["description"].startswith("Summarize a message")

            response = await http.post("/workflows/summarize/run", json={"message": "hi there"})
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "completed"
            assert body["results"] == {"summary": ["hi there"]}
            assert isinstance(body["job_id"], str) and body["job_id"]

            response = await http.post("/workflows/echo_graph/run/stream", json={"message": "yo"})
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_data(response.text)
            assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
            complete = events[-2]
            assert complete["type"] == "complete"
            assert complete["results"] == {"reply": ["You said: yo"]}
            updates = [e for e in events[:-2] if e["type"] == "job_update"]
            assert updates[0]["status"] == "running" and updates[-1]["status"] == "completed"
            assert complete["job_id"] == updates[-1]["job_id"]
            assert any(e["type"] == "output_update" for e in events)

            response = await http.post("/workflows/nope/run", json={})
            assert response.status_code == 404
            assert response.json()["error"]["message"]
            response = await http.post("/workflows/summarize/run", content=b"{not json")
            assert response.status_code == 400
            response = await http.post("/workflows/raising/run", json={})
            assert response.status_code == 500
            assert "kaboom" in response.json()["error"]["message"]
            response = await http.post("/workflows/raising/run/stream", json={})
            events = sse_data(response.text)
            assert events[-1] == "[DONE]"
            assert events[-2]["type"] == "error" and "kaboom" in events[-2]["error"]

    run(main)


def test_http_client_gone_cancels_its_run(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            known = {j["job_id"] for j in (await conn.call("get_status"))["active_jobs"]}
            async with httpx.AsyncClient(base_url=wf_server.base_url, timeout=TIMEOUT) as http:
                request = asyncio.create_task(http.post("/workflows/gated/run", json={}))
                job: Frame | None = None
                for _ in range(100):
                    jobs = (await conn.call("get_status"))["active_jobs"]
                    fresh = [j for j in jobs if j["job_id"] not in known]
                    if fresh:
                        job = fresh[0]
                        break
                    await asyncio.sleep(0.02)
                assert job is not None and job["workflow_id"] == "gated"
                assert job["status"] == "running"
                request.cancel()  # the client hangs up mid-run
                with pytest.raises(asyncio.CancelledError):
                    await request
            for _ in range(100):
                status = await conn.call("get_status", {"job_id": job["job_id"]})
                if status["status"] != "running":
                    break
                await asyncio.sleep(0.02)
            assert status["status"] == "cancelled"

    run(main)


# --- cancel, reconnect, failure ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("workflow_id", "started"),
    [
        # The cancel reaches a node awaiting the model (echo's /slow takes 1.6 s).
        ("slow_chat", lambda e: e["type"] == "node_update" and e["status"] == "running"),
        # A loop that checks ctx.cancelled between ticks.
        ("ticker", lambda e: e["type"] == "node_progress"),
    ],
)
def test_cancel_a_running_job(
    wf_server: ServerProcess, workflow_id: str, started: Callable[[Frame], bool]
) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            job_id = await conn.run_job(workflow_id, {"ticks": 100, "delay": 0.05})
            await conn.events_until(started)
            asked = time.monotonic()
            reply = await conn.call("cancel_job", {"job_id": job_id})
            assert reply == {
                "message": "Job cancellation requested",
                "job_id": job_id,
                "workflow_id": workflow_id,
            }
            events = await conn.job(job_id)
            assert time.monotonic() - asked < 1.0
            assert events[-1]["type"] == "job_update" and events[-1]["status"] == "cancelled"
            assert "completed" not in statuses(events)
            assert not any(e["type"] == "output_update" for e in events)
            status = await conn.call("get_status", {"job_id": job_id})
            assert status["status"] == "cancelled" and status["job_id"] == job_id
            again = await conn.call("cancel_job", {"job_id": job_id})
            assert "error" in again
            # The socket serves the next job.
            job_id = await conn.run_job("summarize", {"message": "next"})
            assert (await conn.job(job_id))[-1]["status"] == "completed"

    run(main)


def test_reconnect_from_a_new_connection_while_the_job_runs(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            first = Predict(ws)
            job_id = await first.run_job("gated")
            await first.events_until(lambda e: e["type"] == "node_update")
        # The first connection is gone; the job waits at its gate.
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            status = await conn.call("get_status", {"job_id": job_id})
            assert status["status"] == "running"
            reply = await conn.call("reconnect_job", {"job_id": job_id})
            assert reply == {
                "message": f"Reconnecting to job {job_id}",
                "job_id": job_id,
                "workflow_id": "gated",
            }
            snapshot = [await conn.event(), await conn.event()]
            assert snapshot == [
                {
                    "type": "job_update",
                    "status": "running",
                    "job_id": job_id,
                    "workflow_id": "gated",
                },
                {
                    "type": "node_update",
                    "node_id": "gate",
                    "node_name": "Gate",
                    "node_type": "test.gate",
                    "status": "running",
                    "job_id": job_id,
                    "workflow_id": "gated",
                },
            ]
            # The live events follow: the gate opens from this connection.
            fed = await conn.call("stream_input", {"job_id": job_id, "input": "go", "value": 7})
            assert fed["message"] == "Input item streamed" and fed["job_id"] == job_id
            assert fed["workflow_id"] == "gated"
            ended = await conn.call("end_input_stream", {"job_id": job_id, "input": "go"})
            assert ended["message"] == "Input stream ended" and ended["workflow_id"] == "gated"
            events = await conn.job(job_id)
            check_tags(events, job_id, "gated")
            kinds = [(e["type"], e.get("status")) for e in events]
            assert kinds == [
                ("node_progress", None),
                ("node_update", "completed"),
                ("output_update", None),
                ("job_update", "completed"),
            ]
            assert events[-1]["result"] == {"fed": [[7]], "count": 1}
            # A finished job: the reply, then its final update.
            reply = await conn.call("reconnect_job", {"job_id": job_id})
            assert reply["job_id"] == job_id
            replay = await conn.events_until(lambda e: is_terminal(e, job_id))
            assert replay[-1] == events[-1]
            assert "error" in await conn.call("reconnect_job", {"job_id": "0" * 32})

    run(main)


def test_reconnect_on_the_connection_already_following_does_not_double_events(
    wf_server: ServerProcess,
) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            job_id = await conn.run_job("gated")
            await conn.events_until(lambda e: e["type"] == "node_update")
            reply = await conn.call("reconnect_job", {"job_id": job_id})
            assert reply["message"] == f"Reconnecting to job {job_id}"
            snapshot = [await conn.event(), await conn.event()]
            assert [(e["type"], e["status"]) for e in snapshot] == [
                ("job_update", "running"),
                ("node_update", "running"),
            ]
            ended = await conn.call("end_input_stream", {"job_id": job_id, "input": "go"})
            assert ended["message"] == "Input stream ended"
            events = await conn.job(job_id)
            assert [(e["type"], e.get("status")) for e in events] == [
                ("node_update", "completed"),
                ("output_update", None),
                ("job_update", "completed"),
            ]
            # Anything sent for the job after its terminal update arrives before this reply.
            status = await conn.call("get_status", {"job_id": job_id})
            assert status["status"] == "completed"
            assert conn.pending == [], "events after the terminal job_update"

    run(main)


def test_reconnect_follows_a_slow_job_to_its_end(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            first = Predict(ws)
            job_id = await first.run_job("ticker", {"ticks": 12, "delay": 0.05})
            await first.events_until(lambda e: e["type"] == "node_progress")
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            reply = await conn.call("reconnect_job", {"job_id": job_id})
            assert reply["message"] == f"Reconnecting to job {job_id}"
            events = await conn.job(job_id)
        assert events[0]["type"] == "job_update" and events[0]["status"] == "running"
        assert events[1]["type"] == "node_update" and events[1]["status"] == "running"
        ticks = [e["progress"] for e in events if e["type"] == "node_progress"]
        assert ticks and ticks == sorted(ticks) and ticks[-1] == 12
        assert events[-1]["status"] == "completed" and events[-1]["result"] == {"ticks": [12]}

    run(main)


@pytest.mark.parametrize(
    ("workflow_id", "params", "node", "error"),
    [
        ("raising", {}, "boom", "kaboom"),
        ("failing_graph", {"expression": "1/0"}, "calc", "division by zero"),
    ],
)
def test_a_failing_node(
    wf_server: ServerProcess, workflow_id: str, params: Frame, node: str, error: str
) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            job_id = await conn.run_job(workflow_id, params)
            events = await conn.job(job_id)
            check_tags(events, job_id, workflow_id)
            node_error = [e for e in events if e["type"] == "node_update" and e["node_id"] == node]
            assert [e["status"] for e in node_error] == ["running", "error"]
            assert error in node_error[-1]["error"]
            final = events[-1]
            assert final["status"] == "failed" and error in final["error"]
            assert "completed" not in statuses(events)
            status = await conn.call("get_status", {"job_id": job_id})
            assert status["status"] == "failed" and error in status["error"]
            # The socket is still usable.
            job_id = await conn.run_job("echo_graph", {"message": "ok"})
            assert (await conn.job(job_id))[-1]["result"] == {"reply": ["You said: ok"]}

    run(main)


# --- stream_input feeding the collect example ------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_stream_input_feeds_collect(wf_server: ServerProcess, binary: bool) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            job_id = await conn.run_job("collect", binary=binary)
            for piece in ["some words ", "and ", "more"]:
                data = {"job_id": job_id, "input": "text", "value": piece}
                reply = await conn.call("stream_input", data, binary=binary)
                assert reply["message"] == "Input item streamed" and reply["job_id"] == job_id
            wrong = await conn.call(
                "stream_input", {"job_id": job_id, "input": "nope", "value": "x"}, binary=binary
            )
            assert "error" in wrong
            missing = await conn.call("stream_input", {"job_id": job_id, "value": "x"})
            assert "error" in missing
            ended = await conn.call(
                "end_input_stream", {"job_id": job_id, "input": "text"}, binary=binary
            )
            assert ended["message"] == "Input stream ended" and ended["job_id"] == job_id
            events = await conn.job(job_id)
        outputs = [e for e in events if e["type"] == "output_update"]
        assert [(o["output_name"], o["value"]) for o in outputs] == [
            ("text", "some words and more")
        ]
        assert events[-1]["status"] == "completed"
        assert events[-1]["result"] == {"text": ["some words and more"], "words": 4}

    run(main)


def test_stream_input_to_a_finished_or_unknown_job_is_an_error(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server)) as ws:
            conn = Predict(ws)
            job_id = await conn.run_job("summarize", {"message": "x"})
            await conn.job(job_id)
            for target in (job_id, "f" * 32):
                data = {"job_id": target, "input": "text", "value": "late"}
                assert "error" in await conn.call("stream_input", data)
                assert "error" in await conn.call("end_input_stream", data)

    run(main)


# --- workflows as tools ----------------------------------------------------------------------


def test_workflow_offered_as_a_tool_in_a_chat_turn(wf_server: ServerProcess) -> None:
    async def main() -> None:
        async with connect(ws_url(wf_server, "/chat")) as ws:
            frames = await chat_turn(
                ws,
                {
                    "role": "user",
                    "content": '/tool workflow_summarize {"message": "hi"}',
                    "tools": ["workflow_summarize"],
                },
            )
        call = next(f for f in frames if f["type"] == "tool_call")
        assert call["name"] == "workflow_summarize" and call["args"] == {"message": "hi"}
        result = next(f for f in frames if f["type"] == "tool_result")
        assert result["tool_call_id"] == call["tool_call_id"]
        assert result["ok"] is True
        assert result["result"] == {"summary": ["hi"]}
        assert frames[-1]["type"] == "message" and frames[-1]["role"] == "assistant"
        assert "summary" in frames[-1]["content"]

    run(main)


# --- two users --------------------------------------------------------------------------------


def test_two_users_cannot_see_or_cancel_each_others_jobs(server_factory: ServerFactory) -> None:
    srv = server_factory(
        "--db",
        ":memory:",
        "--auth-provider",
        "static",
        *TEST_WORKFLOWS,
        *EXAMPLES,
        env={"WORKER_AUTH_TOKEN": "alice,bob"},
    )
    alice_id = StaticKey.from_token("alice").user_id

    async def main() -> None:
        alice_ws = await connect(ws_url(srv, query="?api_key=alice"))
        bob_ws = await connect(ws_url(srv), additional_headers={"Authorization": "Bearer bob"})
        async with alice_ws, bob_ws:
            alice, bob = Predict(alice_ws), Predict(bob_ws)
            job_id = await alice.run_job("gated")
            await alice.events_until(lambda e: e["type"] == "node_update")

            assert await bob.call("get_status", {"job_id": job_id}) == {
                "status": "not_found",
                "job_id": job_id,
            }
            assert "error" in await bob.call("cancel_job", {"job_id": job_id})
            assert "error" in await bob.call("reconnect_job", {"job_id": job_id})
            data = {"job_id": job_id, "input": "go", "value": "bob was here"}
            assert "error" in await bob.call("stream_input", data)
            assert "error" in await bob.call("end_input_stream", data)
            listing = await bob.call("get_status", {})
            assert job_id not in {j["job_id"] for j in listing["active_jobs"]}

            # A user_id in the frame is ignored: bob's job stays bob's.
            reply = await bob.call(
                "run_job", {"workflow_id": "summarize", "params": {}, "user_id": alice_id}
            )
            bobs_job = reply["job_id"]
            await bob.job(bobs_job)
            assert (await alice.call("get_status", {"job_id": bobs_job}))["status"] == "not_found"

            # Alice's job was untouched by all of that.
            status = await alice.call("get_status", {"job_id": job_id})
            assert status["status"] == "running"
            listing = await alice.call("get_status", {})
            assert job_id in {j["job_id"] for j in listing["active_jobs"]}
            assert bobs_job not in {j["job_id"] for j in listing["active_jobs"]}
            cancel = await alice.call("cancel_job", {"job_id": job_id})
            assert cancel["message"] == "Job cancellation requested"
            events = await alice.job(job_id)
            assert events[-1]["status"] == "cancelled"
            assert not any(e["type"] == "node_progress" for e in events)  # bob fed nothing

        # And without a token, /predict is closed with 1008.
        async with connect(ws_url(srv)) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1008

    run(main)


# --- worker ----------------------------------------------------------------------------------


def test_worker_serves_predict_and_workflows_but_not_chat(server_factory: ServerFactory) -> None:
    srv = server_factory("--db", ":memory:", "--auth-provider", "none", *EXAMPLES, command="worker")

    async def main() -> None:
        async with connect(ws_url(srv)) as ws:
            conn = Predict(ws)
            job_id = await conn.run_job("echo_graph", {"message": "w"})
            assert (await conn.job(job_id))[-1]["result"] == {"reply": ["You said: w"]}
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=TIMEOUT) as http:
            listing = (await http.get("/workflows")).json()["workflows"]
            assert {"summarize", "collect", "echo_graph"} <= {w["id"] for w in listing}
            response = await http.post("/workflows/summarize/run", json={"message": "w"})
            assert response.json()["results"] == {"summary": ["w"]}
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(srv, "/chat")):
                pass
        assert refused.value.response.status_code == 404

    run(main)


# --- shutdown ----------------------------------------------------------------------------------


def test_sigterm_with_a_running_job_closes_the_socket_and_exits_0(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory("--db", ":memory:", *TEST_WORKFLOWS)

    async def main() -> None:
        async with connect(ws_url(srv)) as ws:
            conn = Predict(ws)
            await conn.run_job("gated")
            await conn.events_until(lambda e: e["type"] == "node_update")
            srv.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                while True:
                    await conn.read()
            assert ws.close_code in (1000, 1001)

    run(main)
    assert srv.wait(10.0) == 0, srv.log()
