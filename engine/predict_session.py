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
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from .codec import Encoding
from .config import EngineConfig
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
    ) -> None:
        self.config = config
        self.user_id = user_id
        self._send = send
        self._emit = emit
        self._new_id = new_id
        self._workflows = {spec.id: spec for spec in config.workflows}
        self._pending: dict[int, tuple[str, Frame]] = {}
        self.fixed_encoding: Encoding | None = None  # set by set_mode

    busy = False  # jobs outlive the socket: nothing here holds a shutdown back

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        return None

    def close(self) -> None:
        self._pending.clear()  # the runner keeps the jobs; their events just stop here

    def handle_frame(self, frame: Frame, now: float) -> None:
        command = frame.get("command")
        data = frame.get("data", {})
        if not isinstance(command, str) or not isinstance(data, dict):
            self._send(
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
                self._send({"error": "mode must be 'binary' or 'text'"})
                return
            self.fixed_encoding = "msgpack" if mode == "binary" else "json"
            self._send({"message": f"Mode set to {mode}"})
        elif command == "clear_models":
            self._send({"message": "Unused models cleared"})
        elif command in _JOB_COMMANDS:
            self._job_command(command, data)
        else:
            self._send({"error": f"Unknown command: {command}"})

    def _run_job(self, data: Frame) -> None:
        workflow_id = data.get("workflow_id")
        if not isinstance(workflow_id, str) or not workflow_id:
            self._send({"error": "workflow_id is required"})
            return
        if workflow_id not in self._workflows:
            self._send({"error": f"Workflow {workflow_id} not found", "workflow_id": workflow_id})
            return
        params = data.get("params") or {}
        if not isinstance(params, dict):
            self._send({"error": "params must be an object", "workflow_id": workflow_id})
            return
        job_id = secrets.token_hex(16)
        # The reply goes first, so the client knows the job before its first event.
        self._send({"message": "Job started", "job_id": job_id, "workflow_id": workflow_id})
        self._emit(
            StartJob(job_id=job_id, workflow_id=workflow_id, params=params, user_id=self.user_id)
        )

    def _job_command(self, command: str, data: Frame) -> None:
        job_id = data.get("job_id")
        if command != "get_status" and (not isinstance(job_id, str) or not job_id):
            self._send({"error": "job_id is required"})
            return
        if command in ("stream_input", "end_input_stream") and not isinstance(
            data.get("input"), str
        ):
            self._send({"error": "input is required", "job_id": job_id})
            return
        op_id = self._new_id()
        self._pending[op_id] = (command, data)
        self._emit(JobCommand(op_id=op_id, command=command, data=data, user_id=self.user_id))

    def job_command_done(self, op_id: int, value: Any) -> None:
        """The runner's answer to ``JobCommand(op_id)`` (see ``events.JobCommand``)."""
        pending = self._pending.pop(op_id, None)
        if pending is None:
            return
        command, data = pending
        job_id = data.get("job_id")
        if command == "get_status":
            if not job_id:
                self._send({"active_jobs": value if isinstance(value, list) else []})
            elif isinstance(value, dict):
                self._send(value)
            else:
                self._send({"status": "not_found", "job_id": job_id})
        elif command == "cancel_job":
            if isinstance(value, dict):
                self._send(
                    {
                        "message": "Job cancellation requested",
                        "job_id": job_id,
                        "workflow_id": value.get("workflow_id"),
                    }
                )
            else:
                self._send({"error": "Job not found or already completed", "job_id": job_id})
        elif command == "reconnect_job":
            if not isinstance(value, list):
                self._send({"error": f"Job {job_id} not found", "job_id": job_id})
                return
            workflow_id = next((e.get("workflow_id") for e in value if isinstance(e, dict)), None)
            self._send(
                {
                    "message": f"Reconnecting to job {job_id}",
                    "job_id": job_id,
                    "workflow_id": workflow_id,
                }
            )
            for event in value:
                self._send(event)
        elif value is not None:  # stream_input / end_input_stream: an error text
            self._send({"error": str(value), "job_id": job_id})
        elif command == "stream_input":
            self._send({"message": "Input item streamed", "job_id": job_id})
        else:
            self._send({"message": "Input stream ended", "job_id": job_id})

    def job_event(self, job_id: str, event: Frame, now: float) -> None:
        self._send(event)
