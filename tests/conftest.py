"""Fixtures that run the real ``wirechat`` server as a subprocess on 127.0.0.1.

Rules of this module:

* ``launch_server`` starts ``python -m wirechat <command> --host 127.0.0.1 --port 0 ...``,
  waits (bounded) for the ready line on stdout and returns a :class:`ServerProcess`; the
  server's stderr (its logs) goes to a file that tests read with ``log()``.
* ``running_server`` is the context manager the fixtures use: on exit it sends SIGTERM and
  asserts exit status 0 within a bound (the process is killed, and the test fails, if not).
* ``server`` is the common module-scoped server (local auth, debug logs); ``server_factory``
  starts function-scoped servers with special flags or environment.
* Nothing here waits without a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"^wirechat listening on http://(?P<host>[^\s:]+|\[[^\]]+\]):(?P<port>\d+)$")
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Variables of the server's own configuration: never inherited from the test runner's shell.
_SERVER_ENV = (
    "AUTH_PROVIDER",
    "WORKER_AUTH_TOKEN",
    "SUPABASE_URL",
    "SUPABASE_KEY",
    "AUTH_CACHE_TTL",
    "AUTH_CACHE_MAX",
    "REMOTE_AUTH_CACHE_TTL",
    "REMOTE_AUTH_CACHE_MAX",
    "DEFAULT_MODEL",
    "CHAT_PROVIDER",
    "PORT",
    "LOG_LEVEL",
    "CORS_ORIGINS",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "OLLAMA_API_URL",
    "WIRECHAT_DB",
    "WIRECHAT_TOOLS",
    "WIRECHAT_MODEL_PATH",
    "WIRECHAT_CONFIG",
)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the server get SIGTERM if pytest itself dies (Linux).

    Teardown stops every server; this only covers a test run that is killed outright, which
    would otherwise leave orphaned servers behind.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in the child
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


_PREEXEC = _die_with_parent()


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a server process: ours minus wirechat's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """A running ``wirechat`` process."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    ready_line: str
    log_path: Path
    stdout_lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def count(self, pattern: str) -> int:
        """How many times the regular expression ``pattern`` occurs in the log so far."""
        return len(re.findall(pattern, self.log()))

    def wait_for_log(self, pattern: str, *, count: int = 1, timeout: float = 2.0) -> bool:
        """Wait until ``pattern`` occurs at least ``count`` times in the log (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count(pattern) >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """The exit status, or None if the process is still running after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Kill the process and its process group (``--workers`` children live in it)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then the exit status (None, and the process killed, past ``timeout``)."""
        self.signal(signal.SIGTERM)
        status = self.wait(timeout)
        if status is None:
            self.kill()
        return status


def _pump_stdout(stream: object, lines: queue.Queue[str]) -> None:
    # Reads until EOF so that the pipe never fills up and blocks the server.
    assert hasattr(stream, "readline")
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))


def launch_server(
    args: Sequence[str] = (),
    *,
    command: str = "serve",
    env: Mapping[str, str] | None = None,
    log_path: Path,
    host: str | None = "127.0.0.1",
    ready_timeout: float = READY_TIMEOUT,
) -> ServerProcess:
    """Start ``wirechat <command>`` on a free port and wait for its ready line."""
    argv = [sys.executable, "-m", "wirechat", command]
    if host is not None:
        argv += ["--host", host]
    argv += ["--port", "0", *args]
    # Threads stored by the server go next to its log, never to the user's home.
    env = {"WIRECHAT_DB": str(log_path.with_suffix(".db")), **(env or {})}
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log_file,
        stdin=subprocess.DEVNULL,
        env=server_env(env),
        cwd=REPO,
        start_new_session=True,  # its own process group, for --workers and for the kill
        preexec_fn=_PREEXEC,
    )
    log_file.close()
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump_stdout, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + ready_timeout
    seen: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(0.01, min(remaining, 0.1)))
        except queue.Empty:
            line = None
        if line is not None:
            seen.append(line)
            match = READY.match(line)
            if match is not None:
                shown = match.group("host").strip("[]")
                return ServerProcess(
                    process=process,
                    host=shown,
                    port=int(match.group("port")),
                    ready_line=line,
                    log_path=log_path,
                    stdout_lines=lines,
                )
            continue
        if process.poll() is not None or remaining <= 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            log = log_path.read_text(encoding="utf-8", errors="replace")
            raise AssertionError(
                f"wirechat {command} did not print its ready line within {ready_timeout}s "
                f"(exit status {process.returncode}); stdout={seen!r}; stderr:\n{log}"
            )


@contextlib.contextmanager
def running_server(
    args: Sequence[str] = (),
    *,
    log_path: Path,
    command: str = "serve",
    env: Mapping[str, str] | None = None,
    host: str | None = "127.0.0.1",
) -> Iterator[ServerProcess]:
    """A server for the duration of the block; on exit it must stop with status 0."""
    srv = launch_server(args, command=command, env=env, log_path=log_path, host=host)
    try:
        yield srv
    finally:
        already = srv.process.poll()
        status = srv.stop()
        if status is None:
            pytest.fail(f"wirechat did not exit within {STOP_TIMEOUT}s of SIGTERM:\n{srv.log()}")
        elif already is None and status != 0:
            pytest.fail(f"wirechat exited with status {status} after SIGTERM:\n{srv.log()}")


ServerFactory = Callable[..., ServerProcess]
CliRunner = Callable[..., tuple[int, str]]


@pytest.fixture(scope="session")
def server_dir() -> Iterator[Path]:
    """Where servers write logs and thread stores.

    Not under pytest's numbered ``basetemp``: a concurrent pytest session may delete those
    while our servers still write to them.
    """
    with tempfile.TemporaryDirectory(prefix="wirechat-e2e-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def server(server_dir: Path) -> Iterator[ServerProcess]:
    """The common server: ``serve`` with local auth and debug logs, shared by a module."""
    log_path = Path(tempfile.mkdtemp(prefix="module-", dir=server_dir)) / "server.log"
    with running_server(
        ["--auth-provider", "local", "--log-level", "debug"], log_path=log_path
    ) as srv:
        yield srv


@pytest.fixture
def server_factory(server_dir: Path) -> Iterator[ServerFactory]:
    """Start servers with special flags: ``server_factory(*args, command=..., env=...)``.

    Every server started is stopped at the end of the test and must exit with status 0
    (a test that stops one itself asserts its exit status on its own).
    """
    tmp_path = Path(tempfile.mkdtemp(prefix="test-", dir=server_dir))
    with contextlib.ExitStack() as stack:
        counter = 0

        def start(
            *args: str,
            command: str = "serve",
            env: Mapping[str, str] | None = None,
            host: str | None = "127.0.0.1",
        ) -> ServerProcess:
            nonlocal counter
            counter += 1
            return stack.enter_context(
                running_server(
                    args,
                    log_path=tmp_path / f"server{counter}.log",
                    command=command,
                    env=env,
                    host=host,
                )
            )

        yield start


@pytest.fixture
def run_wirechat() -> CliRunner:
    """Run ``python -m wirechat ARGS`` to its end: ``run_wirechat(*args, env=..., timeout=...)``
    returns (exit status, stderr); a process still running after ``timeout`` fails the test.
    """

    def run(
        *args: str, env: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> tuple[int, str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "wirechat", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=server_env(env),
            cwd=REPO,
            start_new_session=True,
        )
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate(timeout=5)
            pytest.fail(f"wirechat {' '.join(args)} kept running: {out!r} {err!r}")
        return process.returncode, err.decode("utf-8", "replace")

    return run
