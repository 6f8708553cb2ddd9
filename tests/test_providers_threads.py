"""The SQLite conversation store: ownership, persistence, concurrency, exact round-trips.

Coroutines are driven with ``asyncio.run`` so the tests need no pytest plugin; "another
connection" is a second :class:`ThreadStore` on the same file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from wirechat.engine.chat import ChatMessage, ToolCall
from wirechat.providers import ThreadAccessError, ThreadStore, default_db_path
from wirechat.providers.threads import HISTORY_LIMIT


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "nested" / "dir" / "threads.db")


def test_open_creates_the_thread_and_returns_history_with_the_appended(db: str) -> None:
    async def main() -> None:
        async with ThreadStore(db) as store:
            assert await store.history("t1", "alice") == []
            assert await store.open("t1", "alice") == []
            assert await store.open("t1", "alice", [user("hi")]) == [user("hi")]
            await store.append("t1", "alice", [assistant("hello"), user("again")])
            history = await store.open("t1", "alice", [assistant("sure")])
            assert history == [user("hi"), assistant("hello"), user("again"), assistant("sure")]
            assert await store.history("t1", "alice") == history
            assert await store.history("t2", "alice") == []  # unknown thread: nothing created

    asyncio.run(main())
    assert Path(db).exists()


def test_history_survives_a_restart_and_is_shared_between_connections(db: str) -> None:
    async def first() -> None:
        store = ThreadStore(db)
        await store.open("t", "u", [user("one")])
        other = ThreadStore(db)  # another process or server node on the same file
        assert await other.open("t", "u", [assistant("two")]) == [user("one"), assistant("two")]
        assert await store.history("t", "u") == [user("one"), assistant("two")]
        other.close()
        store.close()

    async def after_restart() -> None:
        async with ThreadStore(db) as store:
            assert await store.history("t", "u") == [user("one"), assistant("two")]
            assert await store.open("t", "u", [user("three")]) == [
                user("one"),
                assistant("two"),
                user("three"),
            ]

    asyncio.run(first())
    asyncio.run(after_restart())
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        seqs = raw.execute("SELECT seq FROM messages WHERE thread_id = 't' ORDER BY seq")
        assert [seq for (seq,) in seqs] == [1, 2, 3]


def test_another_users_thread_is_refused_and_left_untouched(db: str) -> None:
    async def main() -> None:
        async with ThreadStore(db) as store:
            await store.open("secret", "alice", [user("mine")])
            with pytest.raises(ThreadAccessError) as caught:
                await store.open("secret", "mallory", [user("let me in")])
            assert "alice" not in str(caught.value)  # the owner is not revealed
            with pytest.raises(ThreadAccessError):
                await store.open("secret", "mallory")
            with pytest.raises(ThreadAccessError):
                await store.append("secret", "mallory", [user("sneak")])
            with pytest.raises(ThreadAccessError):
                await store.history("secret", "mallory")
            assert await store.history("secret", "alice") == [user("mine")]
            # append() creates a thread it does not find, owned by the caller.
            await store.append("fresh", "bob", [])
            with pytest.raises(ThreadAccessError):
                await store.history("fresh", "alice")
            assert await store.history("fresh", "bob") == []

    asyncio.run(main())


def test_memory_store_works_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    async def main() -> None:
        async with ThreadStore(":memory:") as store:
            assert await store.open("t", "u", [user("a")]) == [user("a")]
            await store.append("t", "u", [assistant("b")])
            assert await store.history("t", "u") == [user("a"), assistant("b")]

    asyncio.run(main())
    assert list(tmp_path.iterdir()) == []


def test_concurrent_opens_are_serialised_in_one_consistent_order() -> None:
    async def main() -> None:
        async with ThreadStore(":memory:") as store:
            await store.open("t", "u", [user("start")])
            results = await asyncio.gather(
                *(store.open("t", "u", [user(f"m{i}"), assistant(f"r{i}")]) for i in range(50))
            )
            final = await store.history("t", "u")
            assert len(final) == 1 + 2 * 50
            assert len({m.content for m in final}) == len(final)  # nothing lost or doubled
            for i, history in enumerate(results):
                # Each open saw a prefix of the final order that ends with its own pair.
                assert history == final[: len(history)]
                assert history[-2:] == [user(f"m{i}"), assistant(f"r{i}")]
            # Every message right after one "m<i>" is its own "r<i>": pairs never interleave.
            for first, second in zip(final[1::2], final[2::2], strict=True):
                assert first.content == "m" + str(second.content)[1:]

    asyncio.run(main())


def test_every_message_field_round_trips_exactly(db: str) -> None:
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="developer", content=""),
        ChatMessage(
            role="user",
            content=[
                {"type": "text", "text": "what is this? \u00e9\u4e2d\U0001f600 \ud800"},
                {"type": "image_url", "image_url": {"url": "data:,x", "detail": "low"}},
                {"type": "image", "image": {"data": b"\x00\xffraw", "nested": [1, 2.5, None]}},
                {"type": "input_audio", "flags": [True, False], "empty": {}},
            ],
            name="alice",
        ),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=(
                ToolCall(id="call_1", name="calculator", arguments='{"expression": "1+1"}'),
                ToolCall(id="call_2", name="current_time", arguments="{}"),
            ),
        ),
        ChatMessage(role="tool", content="2", tool_call_id="call_1", name="calculator"),
        ChatMessage(role="function", content='{"ok": true}', name="legacy"),
        ChatMessage(role="assistant", content=[]),
    ]

    async def write() -> None:
        async with ThreadStore(db) as store:
            assert await store.open("t", "u", messages) == messages

    async def read() -> None:
        async with ThreadStore(db) as store:
            restored = await store.history("t", "u")
            assert restored == messages
            assert restored[2].content[2]["image"]["data"] == b"\x00\xffraw"  # type: ignore[index]
            assert [type(m.tool_calls) for m in restored] == [tuple] * len(messages)

    asyncio.run(write())
    asyncio.run(read())


def test_history_keeps_the_latest_messages_and_drops_orphaned_tool_results() -> None:
    async def main() -> None:
        async with ThreadStore(":memory:", history_limit=5) as store:
            await store.append("t", "u", [user(str(i)) for i in range(8)])
            assert [m.content for m in await store.history("t", "u")] == list("34567")
            call = ToolCall(id="c", name="calculator", arguments="{}")
            await store.append(
                "t",
                "u",
                [
                    ChatMessage(role="assistant", tool_calls=(call,)),
                    ChatMessage(role="tool", content="1", tool_call_id="c"),
                    ChatMessage(role="tool", content="2", tool_call_id="c"),
                    assistant("a"),
                    user("b"),
                    assistant("c"),
                ],
            )
            # The window of 5 starts with two tool results whose call was cut off.
            assert [m.content for m in await store.history("t", "u")] == ["a", "b", "c"]

        async with ThreadStore(":memory:", history_limit=5) as store:
            # Not truncated: stored exactly as written, even when it starts with a tool result.
            stored = [ChatMessage(role="tool", content="x", tool_call_id="c"), user("y")]
            assert await store.open("t", "u", stored) == stored

    asyncio.run(main())
    assert HISTORY_LIMIT == 1000


def test_an_unstorable_message_fails_before_writing() -> None:
    async def main() -> None:
        async with ThreadStore(":memory:") as store:
            bad = ChatMessage(role="user", content=[{"type": "text", "text": object()}])
            with pytest.raises(TypeError, match="cannot be stored"):
                await store.open("t", "u", [user("ok"), bad])
            assert await store.history("t", "u") == []

    asyncio.run(main())


def test_close_is_idempotent_and_later_calls_fail_clearly(db: str) -> None:
    store = ThreadStore(db)
    asyncio.run(store.open("t", "u", [user("x")]))
    store.close()
    store.close()
    asyncio.run(store.aclose())
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(store.history("t", "u"))


def test_close_finishes_queued_calls_first(db: str) -> None:
    async def main() -> None:
        store = ThreadStore(db)
        pending = [asyncio.ensure_future(store.append("t", "u", [user(str(i))])) for i in range(20)]
        await asyncio.sleep(0)  # the appends are submitted to the worker
        await store.aclose()
        await asyncio.gather(*pending)
        async with ThreadStore(db) as again:
            assert len(await again.history("t", "u")) == 20

    asyncio.run(main())


def test_a_bad_path_fails_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        ThreadStore(str(blocker / "threads.db"))


def test_default_db_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WIRECHAT_DB", "/srv/chat.db")
    assert default_db_path() == "/srv/chat.db"
    monkeypatch.delenv("WIRECHAT_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == str(tmp_path / "wirechat" / "threads.db")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "wirechat" / "threads.db"
    assert default_db_path() == str(expected)
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_db_path() == str(expected)
