"""Workflows in the engine: the ``/predict`` command protocol, ``/workflows`` over HTTP and
``/chat`` with ``workflow_id``, driven through bytes.

The test plays the job runner (and the thread store) by answering the effects the engine
asks for: ``StartJob`` and ``JobCommand`` come out, job events go in through
``ServerConnection.job_event`` and answers through ``job_command_done`` (the allowed
double). Every WebSocket frame the server writes is parsed by a ``wsproto`` client and
decoded with ``json`` / ``msgpack`` (``ws_peer.py``); every HTTP response by an ``h11``
client (``engine_peer.py``). Time is a plain float.

Specs: PROTOCOL.md §3, §4 (workflow turn) and §5; reference/nodetool-spec.md §3.9, §4 and
§6.3 (``worker``'s ``/workflows`` routes).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from engine_peer import EnginePeer, check_error_envelope, encode_request, sse_events
from wirechat.engine import (
    AuthMode,
    ChatMessage,
    EngineConfig,
    StaticKey,
    Surface,
)
from wirechat.engine.chat import WorkflowSpec
from wirechat.engine.events import (
    CallProvider,
    CancelJob,
    CloseTransport,
    JobCommand,
    OpenThread,
    RequestCompleted,
    SaveMessages,
    StartJob,
)
from ws_peer import (
    OP_BINARY,
    OP_TEXT,
    T0,
    Got,
    WsPeer,
    accept_for,
    frame,
    http_exchange,
    only,
    upgrade_request,
)

Frame = dict[str, Any]

WORKFLOWS = (
    WorkflowSpec(
        id="summarize", name="Summarize", description="Summarize a message", inputs=("message",)
    ),
    WorkflowSpec(id="collect", name="collect", description="", inputs=("text",)),
    WorkflowSpec(id="echo_graph", name="Echo graph", description="A graph", inputs=("message",)),
)
CONFIG = EngineConfig(ws_ping_interval=1e6, workflows=WORKFLOWS)
STATIC = EngineConfig(
    ws_ping_interval=1e6,
    workflows=WORKFLOWS,
    auth_mode=AuthMode.STATIC,
    static_keys=(
        StaticKey.from_token("sk-alice", name="alice"),
        StaticKey.from_token("sk-bob", name="bob"),
    ),
)
JOB = "0123456789abcdef0123456789abcdef"


class PredictPeer(WsPeer):
    """A ``WsPeer`` that also plays the job runner."""

    def job_event(self, job_id: str, event: Frame, now: float | None = None) -> None:
        self.server.job_event(job_id, event, self._at(now))
        self._pump()

    def job_done(self, op_id: int, value: object, now: float | None = None) -> None:
        self.server.job_command_done(op_id, value, self._at(now))
        self._pump()

    def command(
        self, name: Any, data: Any = None, *, binary: bool = False, **fields: Any
    ) -> list[Got]:
        """Send ``{"command": name, "data": data}``; the messages it caused at once."""
        payload: Frame = {"command": name, "data": {} if data is None else data, **fields}
        if binary:
            self.send_msgpack(payload)
        else:
            self.send_json(payload)
        return self.take()

    def asked(self) -> JobCommand:
        """The one ``JobCommand`` since the last look at the effects."""
        return only(e for e in self.take_effects() if isinstance(e, JobCommand))


def predict(config: EngineConfig = CONFIG, target: str = "/predict") -> PredictPeer:
    peer = PredictPeer(config)
    peer.open(target)
    peer.take_effects()
    return peer


def run_job(
    peer: PredictPeer, workflow_id: str = "summarize", params: Any = None, **data: Any
) -> tuple[Frame, StartJob]:
    """``run_job``: its one reply and the ``StartJob`` it caused."""
    body: Frame = {"workflow_id": workflow_id, **data}
    if params is not None:
        body["params"] = params
    (reply,) = peer.command("run_job", body)
    start = only(e for e in peer.take_effects() if isinstance(e, StartJob))
    return reply.frame, start


def assert_open(peer: PredictPeer) -> None:
    """The socket still serves: ``clear_models`` gets its one reply."""
    peer.take()
    assert [g.frame for g in peer.command("clear_models")] == [{"message": "Unused models cleared"}]
    assert peer.server_close is None and not peer.transport_closed()


def assert_direct_reply(got: Got) -> None:
    """A direct reply is a plain object without ``type`` (PROTOCOL.md §5)."""
    assert "type" not in got.frame, got.frame


def running(job_id: str = JOB, workflow_id: str = "summarize") -> Frame:
    return {"type": "job_update", "status": "running", "job_id": job_id, "workflow_id": workflow_id}


def completed(job_id: str, result: Frame, workflow_id: str = "summarize") -> Frame:
    return {
        "type": "job_update",
        "status": "completed",
        "result": result,
        "message": f"Workflow {job_id} completed in 0.01 seconds",
        "job_id": job_id,
        "workflow_id": workflow_id,
    }


def failed(job_id: str, error: str, workflow_id: str = "summarize") -> Frame:
    return {
        "type": "job_update",
        "status": "failed",
        "error": error,
        "job_id": job_id,
        "workflow_id": workflow_id,
    }


def job_events(job_id: str, workflow_id: str = "summarize") -> list[Frame]:
    """A successful run's events, as the runner makes them (nodetool-spec.md §4.3, §5)."""
    tag = {"job_id": job_id, "workflow_id": workflow_id}
    return [
        running(job_id, workflow_id),
        {
            "type": "node_update",
            "node_id": "n1",
            "node_name": "Model",
            "node_type": "chat",
            "status": "running",
            **tag,
        },
        {"type": "node_progress", "node_id": "n1", "progress": 1, "total": 2, "chunk": "", **tag},
        {
            "type": "output_update",
            "node_id": "n1",
            "node_name": "Model",
            "output_name": "summary",
            "value": "hi there",
            "output_type": "str",
            "metadata": {},
            **tag,
        },
        {
            "type": "node_update",
            "node_id": "n1",
            "node_name": "Model",
            "node_type": "chat",
            "status": "completed",
            "result": {"output": "hi there"},
            **tag,
        },
        completed(job_id, {"summary": ["hi there"]}, workflow_id),
    ]


# --- the upgrade ---------------------------------------------------------------------------


@pytest.mark.parametrize("surface", [Surface.SERVE, Surface.WORKER])
@pytest.mark.parametrize("target", ["/predict", "/predict/"])
def test_predict_upgrades_on_serve_and_worker(surface: Surface, target: str) -> None:
    config = EngineConfig(
        ws_ping_interval=1e6, workflows=WORKFLOWS, surface=surface, auth_mode=AuthMode.NONE
    )
    peer = PredictPeer(config)
    peer.open(target)
    assert bytes(peer.wire).startswith(b"HTTP/1.1 101 ")
    key = next(
        line.split(b":", 1)[1].strip()
        for line in peer.sent_request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    assert accept_for(key) in bytes(peer.wire)
    done = only(peer.of_type(RequestCompleted))
    assert (done.method, done.target, done.status, done.user_id) == ("GET", target, 101, "1")
    assert peer.got == []  # no greeting
    assert_open(peer)


def test_predict_is_not_routed_on_chat_server() -> None:
    config = EngineConfig(surface=Surface.CHAT_SERVER, workflows=WORKFLOWS)
    assert http_exchange(config, upgrade_request("/predict")).status == 404
    peer = PredictPeer(config).connect("/predict")
    assert peer.accepted is None
    assert peer.rejected is not None and peer.rejected.status_code == 404


def test_plain_get_predict_is_not_upgraded() -> None:
    reply = http_exchange(CONFIG, b"GET /predict HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 426
    assert not any(isinstance(e, StartJob | JobCommand) for e in reply.effects)


@pytest.mark.parametrize(
    ("target", "headers", "reason"),
    [
        ("/predict", [], "Missing authentication"),
        ("/predict?api_key=", [], "Missing authentication"),
        ("/predict?api_key=sk-wrong", [], "Invalid authentication"),
        ("/predict", [("Authorization", "Bearer sk-wrong")], "Invalid authentication"),
        ("/predict?token=sk-alice-not", [], "Invalid authentication"),
    ],
)
def test_static_auth_failure_accepts_then_closes_1008(
    target: str, headers: list[tuple[str, str]], reason: str
) -> None:
    peer = PredictPeer(STATIC)
    command = {"command": "run_job", "data": {"workflow_id": "summarize"}}
    run = frame(OP_TEXT, json.dumps(command).encode())
    peer.connect(target, headers, extra=run)  # a command in the handshake packet
    assert peer.accepted is not None
    assert peer.server_close is not None
    assert (peer.close_code(), peer.server_close.reason) == (1008, reason)
    assert peer.got == []
    assert not peer.of_type(StartJob) and not peer.of_type(JobCommand)
    assert only(peer.of_type(RequestCompleted)).target == "/predict"  # never the query
    peer.answer_close()
    assert peer.transport_closed()


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/predict", [("Authorization", "Bearer sk-alice")]),
        ("/predict?api_key=sk-alice", []),
        ("/predict?token=sk-alice", []),
    ],
)
def test_static_auth_accepted_and_the_clients_user_id_is_ignored(
    target: str, headers: list[tuple[str, str]]
) -> None:
    peer = PredictPeer(STATIC)
    peer.open(target, headers)
    assert peer.server_close is None
    assert only(peer.of_type(RequestCompleted)).user_id == "alice"
    assert "sk-alice" not in repr(peer.effects)
    reply, start = run_job(peer, params={"message": "hi"}, user_id="bob", auth_token="sk-bob")
    assert start.user_id == "alice"
    assert start.key == STATIC.static_keys[0]  # the job's model calls are alice's to pay
    assert reply["job_id"] == start.job_id
    peer.command("get_status", {"job_id": start.job_id, "user_id": "bob"})
    assert peer.asked().user_id == "alice"
    peer.command("cancel_job", {"job_id": start.job_id}, user_id="bob")
    assert peer.asked().user_id == "alice"


# --- run_job ----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_run_job_gets_exactly_one_reply_then_start_job(binary: bool) -> None:
    peer = predict()
    data = {"workflow_id": "summarize", "params": {"message": "hello"}, "user_id": "mallory"}
    got = peer.command("run_job", data, binary=binary)
    effects = peer.take_effects()
    assert len(got) == 1
    reply = got[0]
    assert reply.encoding == ("msgpack" if binary else "json")
    assert_direct_reply(reply)
    assert set(reply.frame) == {"message", "job_id", "workflow_id"}
    assert reply.frame["message"] == "Job started"
    assert reply.frame["workflow_id"] == "summarize"
    job_id = reply.frame["job_id"]
    assert isinstance(job_id, str) and len(job_id) >= 16
    start = only(e for e in effects if isinstance(e, StartJob))
    assert start == StartJob(
        job_id=job_id, workflow_id="summarize", params={"message": "hello"}, user_id="1"
    )
    assert not any(isinstance(e, JobCommand | CallProvider) for e in effects)


def test_run_job_without_params_starts_with_no_inputs() -> None:
    peer = predict()
    _, start = run_job(peer, "echo_graph")
    assert start.params == {} and start.workflow_id == "echo_graph"


def test_each_run_job_gets_its_own_job_id() -> None:
    peer = predict()
    ids = [run_job(peer)[0]["job_id"] for _ in range(5)]
    assert len(set(ids)) == 5
    assert [e.job_id for e in peer.of_type(StartJob)] == ids


@pytest.mark.parametrize(
    "data",
    [
        {"workflow_id": "nope", "params": {}},
        {"workflow_id": "Summarize"},
        {"params": {"message": "hi"}},
        {"workflow_id": ""},
        {"workflow_id": 5},
        {"workflow_id": None},
        {"workflow_id": ["summarize"]},
    ],
    ids=["unknown", "case", "missing", "empty", "number", "null", "list"],
)
def test_run_job_with_a_bad_workflow_id_is_an_error_reply(data: Frame) -> None:
    peer = predict()
    (reply,) = peer.command("run_job", data)
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert "job_id" not in reply.frame
    assert not peer.of_type(StartJob)
    assert_open(peer)


@pytest.mark.parametrize("params", [[1, 2], "message=hi", 5, True], ids=repr)
def test_run_job_with_params_not_an_object_is_an_error_reply(params: Any) -> None:
    peer = predict()
    (reply,) = peer.command("run_job", {"workflow_id": "summarize", "params": params})
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert not peer.of_type(StartJob)
    assert_open(peer)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_job_events_are_forwarded_as_the_runner_made_them(binary: bool) -> None:
    peer = predict()
    reply = peer.command("run_job", {"workflow_id": "summarize"}, binary=binary)[0].frame
    job_id = reply["job_id"]
    events = job_events(job_id)
    for index, event in enumerate(events):
        peer.job_event(job_id, event, now=T0 + index)
    got = peer.take()
    assert [g.frame for g in got] == events
    assert {g.encoding for g in got} == {"msgpack" if binary else "json"}
    for g in got:  # events carry type, job_id and workflow_id (PROTOCOL.md §5)
        assert (g.frame["job_id"], g.frame["workflow_id"]) == (job_id, "summarize")
    assert_open(peer)  # a finished job leaves the socket open for the next command


def test_a_failed_job_is_forwarded_and_the_socket_stays_usable() -> None:
    peer = predict()
    _, start = run_job(peer)
    job_id = start.job_id
    error_update = {**failed(job_id, "kaboom"), "status": "error"}
    sequence = [
        running(job_id),
        {
            "type": "node_update",
            "node_id": "boom",
            "node_name": "Boom",
            "node_type": "test",
            "status": "error",
            "error": "kaboom",
            "job_id": job_id,
            "workflow_id": "summarize",
        },
        error_update,
        failed(job_id, "RuntimeError: kaboom"),
    ]
    for event in sequence:
        peer.job_event(job_id, event)
    assert peer.take_frames() == sequence
    _, again = run_job(peer)
    assert again.job_id != job_id


def test_binary_values_of_events_survive_in_messagepack() -> None:
    peer = predict()
    _, start = run_job(peer)
    peer.command("set_mode", {"mode": "binary"})
    event = {
        "type": "output_update",
        "node_id": "n",
        "node_name": "n",
        "output_name": "image",
        "value": b"\x89PNG\r\n",
        "output_type": "image",
        "metadata": {},
        "job_id": start.job_id,
        "workflow_id": "summarize",
    }
    peer.job_event(start.job_id, event)
    (got,) = peer.take()
    assert got.encoding == "msgpack" and got.frame == event


# --- job commands: exactly one reply each, after the runner's answer ------------------------


def test_get_status_of_a_job() -> None:
    peer = predict()
    assert peer.command("get_status", {"job_id": JOB}) == []  # nothing before the answer
    asked = peer.asked()
    assert (asked.command, asked.data["job_id"], asked.user_id) == ("get_status", JOB, "1")
    status = {"status": "running", "job_id": JOB, "workflow_id": "summarize"}
    peer.job_done(asked.op_id, status)
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert reply.frame == status
    peer.job_done(asked.op_id, status)  # a second answer to the same question: dropped
    assert peer.take() == []


def test_get_status_of_an_unknown_job_is_not_found() -> None:
    peer = predict()
    peer.command("get_status", {"job_id": JOB})
    peer.job_done(peer.asked().op_id, None)
    assert peer.take_frames() == [{"status": "not_found", "job_id": JOB}]


@pytest.mark.parametrize("data", [{}, {"job_id": None}, {"job_id": ""}], ids=repr)
def test_get_status_without_job_id_lists_the_active_jobs(data: Frame) -> None:
    peer = predict()
    peer.command("get_status", data)
    asked = peer.asked()
    assert asked.command == "get_status"
    jobs = [{"job_id": JOB, "workflow_id": "summarize", "status": "running"}]
    peer.job_done(asked.op_id, jobs)
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert reply.frame == {"active_jobs": jobs}


def test_cancel_job() -> None:
    peer = predict()
    assert peer.command("cancel_job", {"job_id": JOB, "workflow_id": "summarize"}) == []
    asked = peer.asked()
    assert (asked.command, asked.data["job_id"]) == ("cancel_job", JOB)
    assert not peer.of_type(CancelJob)  # the runner is asked through the command
    peer.job_done(asked.op_id, {"status": "running", "job_id": JOB, "workflow_id": "summarize"})
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert reply.frame == {
        "message": "Job cancellation requested",
        "job_id": JOB,
        "workflow_id": "summarize",
    }
    # The job's own cancelled update then arrives as an event.
    cancelled = {**running(), "status": "cancelled"}
    peer.job_event(JOB, cancelled)
    assert peer.take_frames() == [cancelled]


def test_cancel_of_an_unknown_or_finished_job_is_an_error_reply() -> None:
    peer = predict()
    peer.command("cancel_job", {"job_id": JOB})
    peer.job_done(peer.asked().op_id, None)
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert reply.frame.get("job_id") == JOB


@pytest.mark.parametrize(
    "command", ["cancel_job", "reconnect_job", "stream_input", "end_input_stream"]
)
@pytest.mark.parametrize("job_id", [None, "", 7, ["x"]], ids=repr)
def test_job_commands_need_a_job_id(command: str, job_id: Any) -> None:
    peer = predict()
    data: Frame = {"input": "text", "value": "x"}
    if job_id is not None:
        data["job_id"] = job_id
    (reply,) = peer.command(command, data)
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert not peer.of_type(JobCommand)
    assert_open(peer)


def test_reconnect_job_replies_then_replays_the_snapshot_then_follows() -> None:
    peer = predict()
    assert peer.command("reconnect_job", {"job_id": JOB}) == []
    asked = peer.asked()
    assert (asked.command, asked.data["job_id"], asked.user_id) == ("reconnect_job", JOB, "1")
    snapshot = job_events(JOB)[:2]  # job_update running, then the running node
    peer.job_done(asked.op_id, snapshot)
    got = peer.take()
    assert_direct_reply(got[0])
    assert got[0].frame == {
        "message": f"Reconnecting to job {JOB}",
        "job_id": JOB,
        "workflow_id": "summarize",
    }
    assert [g.frame for g in got[1:]] == snapshot
    live = job_events(JOB)[2:]
    for event in live:
        peer.job_event(JOB, event)
    assert peer.take_frames() == live


def test_reconnect_to_a_finished_job_replays_its_final_update() -> None:
    peer = predict()
    peer.command("reconnect_job", {"job_id": JOB})
    final = completed(JOB, {"summary": ["hi"]})
    peer.job_done(peer.asked().op_id, [final])
    frames = peer.take_frames()
    assert frames[0]["message"] == f"Reconnecting to job {JOB}"
    assert frames[1:] == [final]


def test_reconnect_to_an_unknown_job_is_an_error_reply() -> None:
    peer = predict()
    peer.command("reconnect_job", {"job_id": JOB})
    peer.job_done(peer.asked().op_id, None)
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert_open(peer)


def test_stream_input_and_end_input_stream() -> None:
    peer = predict()
    data = {"job_id": JOB, "input": "text", "value": "some words "}
    assert peer.command("stream_input", data) == []
    asked = peer.asked()
    assert asked.command == "stream_input"
    assert asked.data == data and asked.user_id == "1"
    peer.job_done(asked.op_id, {"workflow_id": "wf"})
    (reply,) = peer.take()
    assert_direct_reply(reply)
    # NodeTool names the job's workflow in both replies
    assert reply.frame == {"message": "Input item streamed", "job_id": JOB, "workflow_id": "wf"}

    assert peer.command("end_input_stream", {"job_id": JOB, "input": "text"}) == []
    asked = peer.asked()
    assert asked.command == "end_input_stream" and asked.data["input"] == "text"
    peer.job_done(asked.op_id, {"workflow_id": "wf"})
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert reply.frame == {"message": "Input stream ended", "job_id": JOB, "workflow_id": "wf"}


@pytest.mark.parametrize("command", ["stream_input", "end_input_stream"])
def test_stream_commands_refused_by_the_runner_are_error_replies(command: str) -> None:
    peer = predict()
    peer.command(command, {"job_id": JOB, "input": "nope", "value": 1})
    peer.job_done(peer.asked().op_id, "Invalid input name")
    (reply,) = peer.take()
    assert_direct_reply(reply)
    assert reply.frame == {"error": "Invalid input name", "job_id": JOB}


@pytest.mark.parametrize("command", ["stream_input", "end_input_stream"])
@pytest.mark.parametrize("input_name", [None, 3, ["text"]], ids=repr)
def test_stream_commands_need_an_input_name(command: str, input_name: Any) -> None:
    peer = predict()
    data: Frame = {"job_id": JOB, "value": "x"}
    if input_name is not None:
        data["input"] = input_name
    (reply,) = peer.command(command, data)
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert not peer.of_type(JobCommand)
    assert_open(peer)


def test_answers_out_of_order_still_reply_once_each_in_command_order() -> None:
    peer = predict()
    peer.command("get_status", {"job_id": "a" * 32})
    first = peer.asked()
    peer.command("cancel_job", {"job_id": "b" * 32})
    second = peer.asked()
    assert first.op_id != second.op_id
    peer.job_done(second.op_id, None)
    peer.job_done(first.op_id, None)
    frames = peer.take_frames()
    assert len(frames) == 2
    assert frames[0] == {"status": "not_found", "job_id": "a" * 32}
    assert frames[1]["job_id"] == "b" * 32 and "error" in frames[1]
    peer.job_done(12345, None)  # an answer to nothing: dropped
    peer.job_done(first.op_id, None)  # a second answer: dropped
    assert peer.take() == []


def test_a_reply_waits_for_the_answers_to_earlier_commands() -> None:
    # Replies carry no request id: a client matches them to its commands by their order, so
    # a reply must not overtake the reply to an earlier command still waiting for the runner.
    peer = predict()
    peer.command("get_status", {"job_id": JOB})
    asked = peer.asked()
    peer.command("clear_models")
    peer.command("run_job", {"workflow_id": "summarize"})
    peer.job_done(asked.op_id, None)
    frames = peer.take_frames()
    assert [sorted(f) for f in frames] == [
        ["job_id", "status"],
        ["message"],
        ["job_id", "message", "workflow_id"],
    ], frames
    assert frames[0] == {"status": "not_found", "job_id": JOB}


# --- malformed frames and unknown commands ------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"command": 1, "data": {}},
        {"command": None, "data": {}},
        {"command": ["run_job"], "data": {}},
        {"data": {"workflow_id": "summarize"}},
        {"command": "run_job", "data": [1, 2]},
        {"command": "run_job", "data": "summarize"},
        {"command": "get_status", "data": None},
        {"type": "message", "content": "hi"},  # a /chat frame on the wrong socket
    ],
    ids=repr,
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_malformed_frames_get_an_error_reply_and_the_socket_stays_open(
    payload: Frame, binary: bool
) -> None:
    peer = predict()
    if binary:
        peer.send_msgpack(payload)
    else:
        peer.send_json(payload)
    (reply,) = peer.take()
    assert reply.encoding == ("msgpack" if binary else "json")
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert not peer.of_type(StartJob) and not peer.of_type(JobCommand)
    assert_open(peer)


@pytest.mark.parametrize("name", ["fly", "RUN_JOB", "", "run-job"])
def test_unknown_command_gets_an_error_reply(name: str) -> None:
    peer = predict()
    (reply,) = peer.command(name, {"workflow_id": "summarize"})
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert not peer.of_type(StartJob) and not peer.of_type(JobCommand)
    assert_open(peer)


@pytest.mark.parametrize(
    ("opcode", "payload", "encoding"),
    [
        (OP_TEXT, b"{not json", "json"),
        (OP_TEXT, b"[1, 2]", "json"),
        (OP_TEXT, b'"run_job"', "json"),
        (OP_TEXT, b'{"command": "run_job", "data": {}} trailing', "json"),
        (OP_TEXT, b'{"command": "x", "data": {"n": NaN}}', "json"),
        (OP_BINARY, b"\xc1", "msgpack"),
        (OP_BINARY, b"\x92\x01\x02", "msgpack"),  # an array, not a map
        (OP_BINARY, b"\x81\x01\x02", "msgpack"),  # a map with an integer key
        (OP_BINARY, b"\xd4\x05\x00", "msgpack"),  # an extension type
    ],
    ids=lambda v: repr(v)[:24],
)
def test_undecodable_frames_get_an_error_reply_and_the_socket_stays_open(
    opcode: int, payload: bytes, encoding: str
) -> None:
    peer = predict()
    peer.feed(frame(opcode, payload))
    (reply,) = peer.take()
    assert reply.encoding == encoding
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert not peer.of_type(StartJob)
    _, start = run_job(peer)  # and the next command works
    assert start.workflow_id == "summarize"


def test_clear_models() -> None:
    peer = predict()
    (reply,) = peer.command("clear_models")
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("message"), str) and reply.frame["message"]
    (reply,) = peer.command("clear_models", binary=True)
    assert reply.encoding == "msgpack"


# --- encoding: mirror the client's last frame until set_mode fixes it ------------------------


def test_replies_mirror_the_clients_latest_frame() -> None:
    peer = predict()
    _, start = run_job(peer)
    assert [g.encoding for g in peer.command("clear_models", binary=True)] == ["msgpack"]
    peer.job_event(start.job_id, running(start.job_id))
    assert [g.encoding for g in peer.take()] == ["msgpack"]
    assert [g.encoding for g in peer.command("clear_models")] == ["json"]
    peer.job_event(start.job_id, completed(start.job_id, {}))
    assert [g.encoding for g in peer.take()] == ["json"]


def test_set_mode_binary_while_sending_json_fixes_messagepack() -> None:
    peer = predict()
    (reply,) = peer.command("set_mode", {"mode": "binary"})
    assert_direct_reply(reply)
    assert reply.encoding == "msgpack"  # the reply to set_mode is already in the new mode
    assert isinstance(reply.frame.get("message"), str) and "binary" in reply.frame["message"]
    got = peer.command("run_job", {"workflow_id": "summarize"})  # JSON in, MessagePack out
    assert [g.encoding for g in got] == ["msgpack"]
    job_id = got[0].frame["job_id"]
    for event in job_events(job_id):
        peer.job_event(job_id, event)
    assert {g.encoding for g in peer.take()} == {"msgpack"}
    peer.command("get_status", {"job_id": job_id})
    peer.job_done(peer.asked().op_id, None)
    assert [g.encoding for g in peer.take()] == ["msgpack"]
    peer.send_text("{broken")  # even an error reply to an undecodable text frame
    assert [g.encoding for g in peer.take()] == ["msgpack"]


def test_set_mode_text_while_sending_messagepack_fixes_json() -> None:
    peer = predict()
    (reply,) = peer.command("set_mode", {"mode": "text"}, binary=True)
    assert reply.encoding == "json"
    got = peer.command("run_job", {"workflow_id": "summarize"}, binary=True)
    assert [g.encoding for g in got] == ["json"]
    job_id = got[0].frame["job_id"]
    peer.job_event(job_id, running(job_id))
    assert [g.encoding for g in peer.take()] == ["json"]
    (reply,) = peer.command("set_mode", {"mode": "binary"}, binary=True)
    assert reply.encoding == "msgpack"
    assert [g.encoding for g in peer.command("clear_models")] == ["msgpack"]


@pytest.mark.parametrize("data", [{"mode": "TEXT"}, {"mode": 1}, {}], ids=repr)
def test_set_mode_with_a_bad_mode_is_an_error_and_changes_nothing(data: Frame) -> None:
    peer = predict()
    (reply,) = peer.command("set_mode", data, binary=True)
    assert reply.encoding == "msgpack"
    assert_direct_reply(reply)
    assert isinstance(reply.frame.get("error"), str) and reply.frame["error"]
    assert [g.encoding for g in peer.command("clear_models")] == ["json"]  # still mirroring


# --- the socket goes away; the jobs do not ------------------------------------------------


@pytest.mark.parametrize("how", ["close", "eof"])
def test_leaving_the_socket_cancels_no_job(how: str) -> None:
    peer = predict()
    _, start = run_job(peer)
    peer.command("get_status", {"job_id": start.job_id})
    pending = peer.asked()
    if how == "close":
        peer.close(1000)
        assert peer.close_code() == 1000
    else:
        peer.eof()
    assert peer.transport_closed()
    assert not peer.of_type(CancelJob)  # jobs outlive the connection (PROTOCOL.md §5)
    before = len(peer.wire)
    peer.job_event(start.job_id, running(start.job_id))  # late events and answers: dropped
    peer.job_done(pending.op_id, None)
    assert len(peer.wire) == before
    assert len(peer.of_type(CloseTransport)) == 1


# --- HTTP: /workflows --------------------------------------------------------------------------


class HttpPeer(EnginePeer):
    """An ``EnginePeer`` that also plays the job runner."""

    def job_event(self, job_id: str, event: Frame, now: float | None = None) -> None:
        self.server.job_event(job_id, event, self._at(now))
        self._pump()


def post_run(
    peer: HttpPeer, workflow_id: str, body: bytes, *, stream: bool = False
) -> StartJob | None:
    target = f"/workflows/{workflow_id}/run" + ("/stream" if stream else "")
    before = len(peer.of_type(StartJob))
    peer.request("POST", target, [("Content-Type", "application/json")], body)
    starts = peer.of_type(StartJob)
    return starts[-1] if len(starts) > before else None


@pytest.mark.parametrize("surface", [Surface.SERVE, Surface.WORKER])
def test_get_workflows_lists_the_registered_workflows(surface: Surface) -> None:
    peer = HttpPeer(EngineConfig(workflows=WORKFLOWS, surface=surface, auth_mode=AuthMode.NONE))
    reply = peer.get("/workflows")
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    assert reply.json == {
        "workflows": [
            {"id": w.id, "name": w.name, "description": w.description, "inputs": list(w.inputs)}
            for w in WORKFLOWS
        ]
    }
    assert not peer.of_type(StartJob)


def test_get_workflows_with_none_registered_is_an_empty_list() -> None:
    assert HttpPeer(EngineConfig()).get("/workflows").json == {"workflows": []}


def test_workflow_routes_are_not_on_chat_server() -> None:
    peer = HttpPeer(EngineConfig(workflows=WORKFLOWS, surface=Surface.CHAT_SERVER))
    assert peer.get("/workflows").status == 404
    assert post_run(peer, "summarize", b"{}") is None
    assert peer.last_reply().status == 404


def test_workflow_routes_need_auth_like_the_rest() -> None:
    peer = HttpPeer(STATIC)
    reply = peer.get("/workflows")
    assert reply.status == 401
    check_error_envelope(reply.json)
    assert post_run(peer, "summarize", b"{}") is None
    assert peer.last_reply().status == 401
    reply = peer.get("/workflows", [("Authorization", "Bearer sk-bob")])
    assert reply.status == 200
    peer.request(
        "POST", "/workflows/summarize/run", [("Authorization", "Bearer sk-bob")], b'{"message":"x"}'
    )
    assert peer.of_type(StartJob)[-1].user_id == "bob"


def test_get_on_a_run_route_is_405() -> None:
    peer = HttpPeer(CONFIG)
    reply = peer.get("/workflows/summarize/run")
    assert reply.status == 405


def test_run_answers_with_the_results_after_the_job_completes() -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "summarize", b'{"message": "hi there"}')
    assert start is not None
    assert start.workflow_id == "summarize" and start.params == {"message": "hi there"}
    assert start.user_id == "1"
    assert peer.replies == [] and peer.current_response is None  # nothing before the end
    for event in job_events(start.job_id)[:-1]:
        peer.job_event(start.job_id, event)
    assert peer.replies == [] and peer.current_response is None
    peer.timer(T0 + 3600)  # a workflow takes what it takes: no request timeout meanwhile
    assert peer.replies == []
    peer.job_event(start.job_id, completed(start.job_id, {"summary": ["hi there"]}))
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    assert reply.json == {
        "job_id": start.job_id,
        "status": "completed",
        "results": {"summary": ["hi there"]},
    }
    assert not peer.transport_closed()  # keep-alive: the next request is served
    assert peer.get("/workflows").status == 200


def test_run_with_an_empty_body_has_no_inputs() -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "echo_graph", b"")
    assert start is not None and start.params == {}


def test_run_of_a_failed_job_is_a_500_error() -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "summarize", b"{}")
    assert start is not None
    peer.job_event(start.job_id, running(start.job_id))
    # NodeTool's ``error`` update comes first and ends nothing; ``failed`` ends the job.
    peer.job_event(start.job_id, {**failed(start.job_id, "kaboom"), "status": "error"})
    assert peer.replies == []
    peer.job_event(start.job_id, failed(start.job_id, "RuntimeError: kaboom"))
    assert len(peer.replies) == 1
    reply = peer.last_reply()
    assert reply.status == 500
    error = check_error_envelope(reply.json)
    assert "kaboom" in error["message"]


def test_run_of_an_unknown_workflow_is_404() -> None:
    peer = HttpPeer(CONFIG)
    assert post_run(peer, "nope", b"{}") is None
    reply = peer.last_reply()
    assert reply.status == 404
    check_error_envelope(reply.json)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"hi"', b"\xff\xfe"], ids=repr)
def test_run_with_a_body_that_is_no_json_object_is_400(body: bytes) -> None:
    peer = HttpPeer(CONFIG)
    assert post_run(peer, "summarize", body) is None
    reply = peer.last_reply()
    assert reply.status == 400
    check_error_envelope(reply.json)


def test_run_stream_sends_the_events_then_complete_then_done() -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "summarize", b'{"message": "hi there"}', stream=True)
    assert start is not None
    events = job_events(start.job_id)
    peer.job_event(start.job_id, events[0])
    head = peer.current_response
    assert head is not None and head.status_code == 200  # the stream has started
    for event in events[1:]:
        peer.job_event(start.job_id, event)
    reply = peer.last_reply()
    assert reply.status == 200
    assert (reply.header("content-type") or "").startswith("text/event-stream")
    got = sse_events(reply.body)
    assert got[: len(events)] == events
    assert got[len(events) :] == [
        {"type": "complete", "job_id": start.job_id, "results": {"summary": ["hi there"]}},
        "[DONE]",
    ]


def test_run_stream_of_a_failed_job_ends_with_an_error_then_done() -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "summarize", b"{}", stream=True)
    assert start is not None
    error_update = {**failed(start.job_id, "kaboom"), "status": "error"}
    peer.job_event(start.job_id, running(start.job_id))
    peer.job_event(start.job_id, error_update)
    assert peer.replies == []
    peer.job_event(start.job_id, failed(start.job_id, "RuntimeError: kaboom"))
    got = sse_events(peer.last_reply().body)
    assert got[:3] == [
        running(start.job_id),
        error_update,
        failed(start.job_id, "RuntimeError: kaboom"),
    ]
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    assert got[-2]["type"] == "error" and "kaboom" in got[-2]["error"]
    assert not any(isinstance(e, dict) and e.get("type") == "complete" for e in got)


@pytest.mark.parametrize("stream", [False, True], ids=["run", "stream"])
def test_client_eof_during_a_run_cancels_the_job(stream: bool) -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "summarize", b"{}", stream=stream)
    assert start is not None
    peer.job_event(start.job_id, running(start.job_id))
    peer.eof()
    assert peer.of_type(CancelJob) == [CancelJob(job_id=start.job_id, user_id="1")]
    peer.job_event(start.job_id, {**running(start.job_id), "status": "cancelled"})
    assert len(peer.of_type(CancelJob)) == 1


def test_a_request_pipelined_behind_a_run_is_answered_after_it() -> None:
    peer = HttpPeer(CONFIG)
    run = encode_request("POST", "/workflows/summarize/run", [], b'{"message": "a"}')
    peer.expect("POST", "/workflows/summarize/run")
    peer.expect("GET", "/workflows")
    peer.feed(run + encode_request("GET", "/workflows"))
    start = only(peer.of_type(StartJob))
    assert peer.replies == []
    peer.job_event(start.job_id, completed(start.job_id, {"summary": ["a"]}))
    assert [r.status for r in peer.replies] == [200, 200]
    assert peer.replies[0].json["results"] == {"summary": ["a"]}
    assert "workflows" in peer.replies[1].json


def test_events_of_another_job_do_not_touch_the_run() -> None:
    peer = HttpPeer(CONFIG)
    start = post_run(peer, "summarize", b"{}")
    assert start is not None
    peer.job_event(JOB, completed(JOB, {"x": [1]}))
    assert peer.replies == []
    peer.job_event(start.job_id, completed(start.job_id, {}))
    assert peer.last_reply().json["job_id"] == start.job_id


# --- /chat with workflow_id (PROTOCOL.md §4, nodetool-spec §3.9) ----------------------------


def chat_peer(config: EngineConfig = CONFIG) -> PredictPeer:
    return predict(config, "/chat")


def start_workflow_turn(
    peer: PredictPeer, content: str = "hello", *, binary: bool = False, **fields: Any
) -> tuple[OpenThread, StartJob]:
    message = {"type": "message", "role": "user", "content": content, **fields}
    if binary:
        peer.send_msgpack(message)
    else:
        peer.send_json(message)
    op = only(e for e in peer.take_effects() if isinstance(e, OpenThread))
    peer.opened(op.op_id, list(op.append))
    start = only(e for e in peer.take_effects() if isinstance(e, StartJob))
    return op, start


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_chat_workflow_turn(binary: bool) -> None:
    peer = chat_peer()
    message = {
        "type": "message",
        "role": "user",
        "content": "hello",
        "workflow_id": "summarize",
        "thread_id": "t1",
    }
    if binary:
        peer.send_msgpack(message)
    else:
        peer.send_json(message)
    op = only(e for e in peer.take_effects() if isinstance(e, OpenThread))
    assert op.thread_id == "t1" and op.user_id == "1"
    assert op.append == (ChatMessage(role="user", content="hello"),)
    assert not peer.of_type(StartJob) and peer.got == []  # the history first

    history = [
        ChatMessage(role="user", content="earlier"),
        ChatMessage(role="assistant", content="earlier answer"),
        ChatMessage(role="user", content="hello"),
    ]
    peer.opened(op.op_id, history)
    effects = peer.take_effects()
    start = only(e for e in effects if isinstance(e, StartJob))
    assert not any(isinstance(e, CallProvider) for e in effects)  # no model call
    assert start.workflow_id == "summarize" and start.user_id == "1"
    assert start.params["message"] == "hello"
    messages = start.params["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [(m.role, m.content) for m in history]
    json.dumps(start.params)  # plain data
    assert peer.got == []

    events = job_events(start.job_id)
    for event in events[:-1]:
        peer.job_event(start.job_id, event)
    forwarded = peer.take()
    assert {g.encoding for g in forwarded} == {"msgpack" if binary else "json"}
    assert [g.frame for g in forwarded] == [{**e, "thread_id": "t1"} for e in events[:-1]]
    assert not peer.of_type(SaveMessages)

    peer.job_event(start.job_id, events[-1])
    got = peer.take_frames()
    assert got[0] == {**events[-1], "thread_id": "t1"}
    assert got[1:] == [{"type": "chunk", "content": "", "done": True, "thread_id": "t1"}]
    save = only(e for e in peer.take_effects() if isinstance(e, SaveMessages))
    assert save.thread_id == "t1" and save.user_id == "1"
    assert save.messages[-1] == ChatMessage(role="assistant", content="hi there")
    assert peer.take() == []  # the final message waits for the save

    peer.saved(save.op_id)
    (final,) = peer.take_frames()
    assert final["type"] == "message" and final["role"] == "assistant"
    assert final["content"] == "hi there"
    assert final["thread_id"] == "t1"
    assert final["workflow_assistant"] is True
    assert final["workflow_id"] == "summarize"
    peer.job_event(start.job_id, events[-1])  # after the turn: nothing
    assert peer.take() == []


def test_chat_workflow_turn_that_fails_still_ends_with_done_and_a_final_message() -> None:
    peer = chat_peer()
    _, start = start_workflow_turn(peer, workflow_id="summarize", thread_id="t2")
    peer.job_event(start.job_id, running(start.job_id))
    peer.job_event(start.job_id, {**failed(start.job_id, "kaboom"), "status": "error"})
    assert not peer.of_type(SaveMessages)
    peer.job_event(start.job_id, failed(start.job_id, "RuntimeError: kaboom"))
    frames = peer.take_frames()
    assert [f.get("done") for f in frames if f["type"] == "chunk"] == [True]
    assert frames[-2]["status"] == "failed" and frames[-2]["thread_id"] == "t2"
    assert frames[-1] == {"type": "chunk", "content": "", "done": True, "thread_id": "t2"}
    save = only(e for e in peer.take_effects() if isinstance(e, SaveMessages))
    peer.saved(save.op_id)
    (final,) = peer.take_frames()
    assert final["type"] == "message" and final["workflow_assistant"] is True
    assert final["thread_id"] == "t2"


@pytest.mark.parametrize("workflow_id", ["nope", 5, ""], ids=repr)
def test_chat_with_an_unknown_workflow_is_an_error_frame(workflow_id: Any) -> None:
    peer = chat_peer()
    peer.send_json({"type": "message", "content": "hi", "workflow_id": workflow_id})
    (got,) = peer.take()
    assert got.type == "error" and isinstance(got.frame.get("message"), str)
    assert not peer.of_type(OpenThread) and not peer.of_type(StartJob)
    peer.send_json({"type": "ping"})
    assert peer.take_frames()[0]["type"] == "pong"


def test_stop_during_a_workflow_turn_cancels_the_job() -> None:
    peer = chat_peer()
    _, start = start_workflow_turn(peer, workflow_id="summarize", thread_id="t3")
    peer.job_event(start.job_id, running(start.job_id))
    peer.take()
    peer.send_json({"type": "stop"})
    effects = peer.take_effects()
    assert [e for e in effects if isinstance(e, CancelJob)] == [
        CancelJob(job_id=start.job_id, user_id="1")
    ]
    frames = peer.take_frames()
    assert [f["type"] for f in frames] == ["generation_stopped"]
    assert frames[0]["message"] == "Generation stopped by user"
    # The job's own cancelled update, arriving late, ends no second turn.
    peer.job_event(start.job_id, {**running(start.job_id), "status": "cancelled"})
    assert peer.take() == []
    assert not peer.of_type(SaveMessages)


def test_stop_while_the_thread_opens_starts_no_job() -> None:
    peer = chat_peer()
    peer.send_json({"type": "message", "content": "hi", "workflow_id": "summarize"})
    op = only(e for e in peer.take_effects() if isinstance(e, OpenThread))
    peer.send_json({"type": "stop"})
    assert [f["type"] for f in peer.take_frames()] == ["generation_stopped"]
    peer.opened(op.op_id, list(op.append))
    assert not peer.of_type(StartJob) and not peer.of_type(CancelJob)
    assert peer.take() == []


def test_a_new_message_during_a_workflow_turn_cancels_the_job() -> None:
    peer = chat_peer()
    _, start = start_workflow_turn(peer, workflow_id="summarize")
    peer.send_json({"type": "message", "content": "next"})
    assert peer.of_type(CancelJob) == [CancelJob(job_id=start.job_id, user_id="1")]
    assert [f["type"] for f in peer.take_frames()] == ["generation_stopped"]
    assert len(peer.of_type(OpenThread)) == 2


def test_chat_workflow_turn_user_is_the_authenticated_one() -> None:
    peer = PredictPeer(STATIC)
    peer.open("/chat?api_key=sk-bob")
    peer.take_effects()
    _, start = start_workflow_turn(peer, workflow_id="summarize", user_id="alice")
    assert start.user_id == "bob"
