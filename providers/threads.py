"""The conversation store: the messages of each chat thread, in SQLite.

Rules of this module:

* One SQLite connection, opened, used and closed by one dedicated worker thread. Every
  public coroutine submits one function to that thread and awaits it, so any number of
  coroutines are serialised without locks and the event loop never waits on the disk.
* One call is one transaction. ``open`` checks ownership, creates the thread, appends and
  reads back inside a single ``BEGIN IMMEDIATE`` ... ``COMMIT``, so concurrent turns (and
  other processes sharing the file) see a thread's messages in one total order, no gaps.
  A cancelled call either never ran or ran to completion: never half a transaction.
* A write is durable when its call returns (WAL journal, ``synchronous=FULL``).
* A thread belongs to the user who created it. Another user's thread raises
  :class:`ThreadAccessError`, which the engine reports exactly like an unknown thread, so
  the store never confirms that somebody else's thread id exists.
* Messages are stored as JSON that round-trips :class:`ChatMessage` exactly. The JSON is
  ASCII-escaped (a lone surrogate from a client can still be stored) and ``bytes`` inside
  content parts (MessagePack clients send them) are stored as tagged base64.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from wirechat.engine.chat import ChatMessage, ToolCall

__all__ = ["HISTORY_LIMIT", "ThreadAccessError", "ThreadStore", "default_db_path"]

HISTORY_LIMIT = 1000
"""Most messages a history holds: the latest ones (NodeTool loads at most 1000 as well)."""

MEMORY = ":memory:"

# How long a write waits for another process holding the file's write lock.
_BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    thread_id TEXT NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_thread ON messages (thread_id, seq);
"""

# The key of the one-entry object that stands for a bytes value in a stored payload.
_BYTES_TAG = "__wirechat_bytes__"

_P = ParamSpec("_P")
_T = TypeVar("_T")


class ThreadAccessError(Exception):
    """The thread exists but belongs to another user. Report it as "thread not found"."""

    def __init__(self, thread_id: str) -> None:
        super().__init__(f"thread {thread_id!r} belongs to another user")
        self.thread_id = thread_id


def default_db_path() -> str:
    """``$WIRECHAT_DB``, else ``$XDG_DATA_HOME/wirechat/threads.db`` (XDG base directories)."""
    explicit = os.environ.get("WIRECHAT_DB")
    if explicit:
        return explicit
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return str(base / "wirechat" / "threads.db")


class ThreadStore:
    """The messages of every chat thread, in one SQLite file (or in memory).

    The constructor opens the database and creates the schema, blocking until done, so a
    bad path fails at start-up rather than on the first chat message.
    """

    def __init__(self, path: str | os.PathLike[str], *, history_limit: int = HISTORY_LIMIT) -> None:
        raw = os.fspath(path)
        self._path = raw if raw == MEMORY else os.path.expanduser(raw)
        self._history_limit = history_limit
        self._closed = False
        # Guards _closed together with submit(), so no job is queued after the close job.
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wirechat-threads")
        try:
            self._conn = self._executor.submit(_connect, self._path).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    @property
    def path(self) -> str:
        return self._path

    async def open(
        self, thread_id: str, user_id: str, append: Sequence[ChatMessage] = ()
    ) -> list[ChatMessage]:
        """Create the thread if absent, append ``append``, return the history (one transaction).

        Raises:
            ThreadAccessError: the thread belongs to another user (nothing is written).
        """
        payloads = [_encode(message) for message in append]
        return await self._call(self._open, thread_id, user_id, payloads)

    async def append(self, thread_id: str, user_id: str, messages: Sequence[ChatMessage]) -> None:
        """Append ``messages`` to the thread, creating it if absent.

        Raises:
            ThreadAccessError: the thread belongs to another user (nothing is written).
        """
        payloads = [_encode(message) for message in messages]
        await self._call(self._append, thread_id, user_id, payloads)

    async def history(self, thread_id: str, user_id: str) -> list[ChatMessage]:
        """The thread's messages in order (the latest ``history_limit``); ``[]`` if unknown.

        Raises:
            ThreadAccessError: the thread belongs to another user.
        """
        return await self._call(self._history, thread_id, user_id)

    def close(self) -> None:
        """Finish the queued calls, then close the database. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # The connection belongs to the worker thread: close it there, after the queue.
            self._executor.submit(self._conn.close)
        self._executor.shutdown(wait=True)

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop while queued calls finish."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> ThreadStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _call(self, function: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread store is closed")
            future = self._executor.submit(function, *args, **kwargs)
        # Cancelling the awaiting task cancels the job only if it has not started yet.
        return await asyncio.wrap_future(future)

    # --- run in the worker thread only -----------------------------------------------------

    def _open(self, thread_id: str, user_id: str, payloads: list[str]) -> list[ChatMessage]:
        with _transaction(self._conn, write=True):
            _claim(self._conn, thread_id, user_id)
            _insert(self._conn, thread_id, payloads)
            return _read(self._conn, thread_id, self._history_limit)

    def _append(self, thread_id: str, user_id: str, payloads: list[str]) -> None:
        with _transaction(self._conn, write=True):
            _claim(self._conn, thread_id, user_id)
            _insert(self._conn, thread_id, payloads)

    def _history(self, thread_id: str, user_id: str) -> list[ChatMessage]:
        # A read transaction, so the ownership check and the messages are one snapshot.
        with _transaction(self._conn, write=False):
            owner = _owner(self._conn, thread_id)
            if owner is None:
                return []
            if owner != user_id:
                raise ThreadAccessError(thread_id)
            return _read(self._conn, thread_id, self._history_limit)


def _connect(path: str) -> sqlite3.Connection:
    if path != MEMORY:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; each call says BEGIN and COMMIT itself.
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        if path != MEMORY:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        with _transaction(conn, write=True):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
    # writes can fail with SQLITE_BUSY at once when another connection wrote in between.
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _owner(conn: sqlite3.Connection, thread_id: str) -> str | None:
    row = conn.execute("SELECT user_id FROM threads WHERE id = ?", (thread_id,)).fetchone()
    return None if row is None else str(row[0])


def _claim(conn: sqlite3.Connection, thread_id: str, user_id: str) -> None:
    """Create the thread for ``user_id`` if absent; refuse another user's thread."""
    owner = _owner(conn, thread_id)
    if owner is None:
        conn.execute(
            "INSERT INTO threads (id, user_id, created_at) VALUES (?, ?, ?)",
            (thread_id, user_id, _now()),
        )
    elif owner != user_id:
        raise ThreadAccessError(thread_id)


def _insert(conn: sqlite3.Connection, thread_id: str, payloads: list[str]) -> None:
    if not payloads:
        return
    # Safe without a race: the write lock is held from BEGIN IMMEDIATE on.
    (last,) = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE thread_id = ?", (thread_id,)
    ).fetchone()
    now = _now()
    conn.executemany(
        "INSERT INTO messages (thread_id, seq, created_at, payload) VALUES (?, ?, ?, ?)",
        [(thread_id, last + offset, now, payload) for offset, payload in enumerate(payloads, 1)],
    )


def _read(conn: sqlite3.Connection, thread_id: str, limit: int) -> list[ChatMessage]:
    rows = conn.execute(
        "SELECT payload FROM messages WHERE thread_id = ? ORDER BY seq DESC LIMIT ?",
        (thread_id, limit),
    ).fetchall()
    messages = [_decode(payload) for (payload,) in reversed(rows)]
    if len(rows) == limit:
        # The window cut the history: tool results at its start lost the assistant message
        # that called them, and upstream APIs reject such orphans, so they go as well.
        while messages and messages[0].role == "tool":
            messages.pop(0)
    return messages


def _now() -> str:
    return datetime.now(UTC).isoformat()


# --- the stored form of a message ----------------------------------------------------------


def _encode(message: ChatMessage) -> str:
    """The JSON payload of ``message``: only the fields that differ from their defaults.

    Runs in the caller, so a message that cannot be stored fails before any transaction.
    """
    payload: dict[str, Any] = {"role": message.role}
    if message.content is not None:
        payload["content"] = message.content
    if message.name is not None:
        payload["name"] = message.name
    if message.tool_calls:
        payload["tool_calls"] = [
            {"id": call.id, "name": call.name, "arguments": call.arguments}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        payload["tool_call_id"] = message.tool_call_id
    return json.dumps(payload, separators=(",", ":"), default=_encode_extra)


def _encode_extra(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"a {type(value).__name__} cannot be stored in a chat message")


def _decode_extra(value: dict[str, Any]) -> Any:
    if len(value) == 1 and isinstance(value.get(_BYTES_TAG), str):
        return base64.b64decode(value[_BYTES_TAG])
    return value


def _decode(text: str) -> ChatMessage:
    data = json.loads(text, object_hook=_decode_extra)
    return ChatMessage(
        role=data["role"],
        content=data.get("content"),
        name=data.get("name"),
        tool_calls=tuple(
            ToolCall(id=call["id"], name=call["name"], arguments=call["arguments"])
            for call in data.get("tool_calls", ())
        ),
        tool_call_id=data.get("tool_call_id"),
    )
