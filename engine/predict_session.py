"""NodeTool's ``/predict`` WebSocket: workflow jobs run, followed and steered by command.

Rules of this module (PROTOCOL.md §5, reference/nodetool-spec.md §4):

* Every client frame is ``{"command": ..., "data": {...}}`` and gets exactly one direct
  reply: a plain object without ``type``. Job events (``job_update``, ``node_update``, ...)
  carry ``type``, ``job_id`` and ``workflow_id`` and are forwarded as the runner made them.
* A malformed frame or an unknown command is answered with ``{"error": ...}``; the socket
  stays open. A ``user_id`` in the frame is ignored: the user is the authenticated one.
* Replies mirror the encoding of the client's latest frame until ``set_mode`` fixes it.
* The engine knows which workflows exist (``EngineConfig.workflows``), so ``run_job`` is
  answered at once; everything about jobs themselves is asked of the runner through
  ``JobCommand`` and answered by ``job_command_done``.
* Replies go out in the order of the commands, even when a later command is answered
  before an earlier one that waits for the runner (each command holds a place in
  ``_replies``).
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

from .codec import Encoding
from .config import EngineConfig, StaticKey
from .events import JobCommand, Output, StartJob

Frame = dict[str, Any]
_JOB_COMMANDS = ("cancel_job", "get_status", "reconnect_job", "stream_input", "end_input_stream")


class PredictSession:
    def __init__(
        self,
        config: EngineConfig,
        user_id: str,
        *,
        send: Callable[[Frame], None],
        emit: Callable[[Output], None],
        new_id: Callable[[], int],
        key: StaticKey | None = None,
    ) -> None:
        self.config = config
        self.user_id = user_id
        self._key = key  # its limits apply to the model calls of the jobs started here
        self._send = send
        self._emit = emit
        self._new_id = new_id
        self._workflows = {spec.id: spec for spec in config.workflows}
        self._pending: dict[int, tuple[str, Frame, list[Frame]]] = {}
        # One entry per command not yet answered on the wire, in command order: the frames
        # of its reply once known (a reconnect's snapshot events follow its reply).
        self._replies: deque[list[Frame]] = deque()
        self.fixed_encoding: Encoding | None = None  # set by set_mode

    busy = False  # jobs outlive the socket: nothing here holds a shutdown back

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        return None

    def close(self) -> None:
        self._pending.clear()  # the runner keeps the jobs; their events just stop here
        self._replies.clear()

    def _reply(self, *frames: Frame) -> None:
        """Answer the current command now (in order behind commands still waiting)."""
        self._replies.append(list(frames))
        self._flush()

    def _flush(self) -> None:
        while self._replies and self._replies[0]:
            for frame in self._replies.popleft():
                self._send(frame)

    def handle_frame(self, frame: Frame, now: float) -> None:
        command = frame.get("command")
        data = frame.get("data", {})
        if not isinstance(command, str) or not isinstance(data, dict):
            self._reply(
                {
                    "error": "invalid_message",
                    "message": 'A frame must be {"command": <name>, "data": {...}}',
                }
            )
            return
        if command == "run_job":
            self._run_job(data)
        elif command == "set_mode":
            mode = data.get("mode")
            if mode not in ("binary", "text"):
                self._reply({"error": "mode must be 'binary' or 'text'"})
                return
            self.fixed_encoding = "msgpack" if mode == "binary" else "json"
            self._reply({"message": f"Mode set to {mode}"})
        elif command == "clear_models":
            self._reply({"message": "Unused models cleared"})
        elif command in _JOB_COMMANDS:
            self._job_command(command, data)
        else:
            self._reply({"error": f"Unknown command: {command}"})

    def _run_job(self, data: Frame) -> None:
        workflow_id = data.get("workflow_id")
        if not isinstance(workflow_id, str) or not workflow_id:
            self._reply({"error": "workflow_id is required"})
            return
        if workflow_id not in self._workflows:
            self._reply({"error": f"Workflow {workflow_id} not found", "workflow_id": workflow_id})
            return
        params = data.get("params") or {}
        if not isinstance(params, dict):
            self._reply({"error": "params must be an object", "workflow_id": workflow_id})
            return
        job_id = secrets.token_hex(16)
        # The reply goes first, so the client knows the job before its first event.
        self._reply({"message": "Job started", "job_id": job_id, "workflow_id": workflow_id})
        self._emit(
            StartJob(
                job_id=job_id,
                workflow_id=workflow_id,
                params=params,
                user_id=self.user_id,
                key=self._key,
            )
        )

    def _job_command(self, command: str, data: Frame) -> None:
        job_id = data.get("job_id")
        if command != "get_status" and (not isinstance(job_id, str) or not job_id):
            self._reply({"error": "job_id is required"})
            return
        if command in ("stream_input", "end_input_stream") and not isinstance(
            data.get("input"), str
        ):
            self._reply({"error": "input is required", "job_id": job_id})
            return
        op_id = self._new_id()
        slot: list[Frame] = []
        self._replies.append(slot)  # holds this command's place until the runner answers
        self._pending[op_id] = (command, data, slot)
        self._emit(JobCommand(op_id=op_id, command=command, data=data, user_id=self.user_id))

    def job_command_done(self, op_id: int, value: Any) -> None:
        """The runner's answer to ``JobCommand(op_id)`` (see ``events.JobCommand``)."""
        pending = self._pending.pop(op_id, None)
        if pending is None:
            return
        command, data, slot = pending
        slot.extend(self._answer(command, data, value))
        self._flush()

    def _answer(self, command: str, data: Frame, value: Any) -> list[Frame]:
        """The reply frames for the runner's answer ``value`` to ``command``."""
        job_id = data.get("job_id")
        if command == "get_status":
            if not job_id:
                return [{"active_jobs": value if isinstance(value, list) else []}]
            if isinstance(value, dict):
                return [value]
            return [{"status": "not_found", "job_id": job_id}]
        if command == "cancel_job":
            if not isinstance(value, dict):
                return [{"error": "Job not found or already completed", "job_id": job_id}]
            return [
                {
                    "message": "Job cancellation requested",
                    "job_id": job_id,
                    "workflow_id": value.get("workflow_id"),
                }
            ]
        if command == "reconnect_job":
            if not isinstance(value, list):
                return [{"error": f"Job {job_id} not found", "job_id": job_id}]
            workflow_id = next((e.get("workflow_id") for e in value if isinstance(e, dict)), None)
            reply = {
                "message": f"Reconnecting to job {job_id}",
                "job_id": job_id,
                "workflow_id": workflow_id,
            }
            return [reply, *(e for e in value if isinstance(e, dict))]
        # stream_input / end_input_stream: an error text, or done ({"workflow_id"} of the job)
        if isinstance(value, str):
            return [{"error": value, "job_id": job_id}]
        workflow_id = value.get("workflow_id") if isinstance(value, dict) else None
        message = "Input item streamed" if command == "stream_input" else "Input stream ended"
        return [{"message": message, "job_id": job_id, "workflow_id": workflow_id}]

    def job_event(self, job_id: str, event: Frame, now: float) -> None:
        # A job's events never overtake the reply that announced it (a run_job reply can be
        # queued behind an earlier command still waiting for the runner); other events are
        # not held back.
        announcing = any(frame.get("job_id") == job_id for slot in self._replies for frame in slot)
        if announcing:
            self._replies.append([event])
            self._flush()
        else:
            self._send(event)

    def reject(self, message: str) -> None:
        """Answer a frame that could not be decoded (in its place among the replies)."""
        self._reply({"error": "invalid_message", "message": message})
