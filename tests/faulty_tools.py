"""Server tools that misbehave on purpose, for the fault tests (``tests/test_e2e_faults.py``).

Load them into a server with ``--tools faulty_tools:TOOLS`` (``faulty_tools:SYNC_HANG_TOOLS``
for ``hang_sync``) and ``PYTHONPATH`` set to this directory. None of them touches the network
or the disk.

* ``explode`` raises every time.
* ``hang`` (async) never returns: only a cancellation ends it.
* ``hang_sync`` (sync, so it runs in a worker thread) blocks its thread for a long time; a
  thread cannot be cancelled, so this is the worst case for a tool timeout and for shutdown.
* ``slow`` sleeps ``seconds`` (bounded) and then answers.
"""

from __future__ import annotations

import asyncio
import threading

# A sync tool "hangs" this long: forever for a test, yet a leaked thread still ends one day.
SYNC_HANG_SECONDS = 600.0
MAX_SLOW_SECONDS = 30.0


class ToolExploded(RuntimeError):
    """What ``explode`` raises."""


def explode(reason: str = "kaboom") -> str:
    """Fail on purpose.

    Args:
        reason: Text put into the error message.
    """
    raise ToolExploded(f"tool exploded: {reason}")


async def hang() -> str:
    """Never answer (until cancelled)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def hang_sync() -> str:
    """Block the worker thread for a long time, then answer."""
    threading.Event().wait(SYNC_HANG_SECONDS)
    return "woke up"


async def slow(seconds: float = 0.5) -> str:
    """Answer after a while.

    Args:
        seconds: How long to sleep first (at most 30).
    """
    delay = max(0.0, min(float(seconds), MAX_SLOW_SECONDS))
    await asyncio.sleep(delay)
    return f"slept {delay:g}"


TOOLS = [explode, hang, slow]
# Apart: a server that ran it keeps a worker thread busy for SYNC_HANG_SECONDS.
SYNC_HANG_TOOLS = [hang_sync]
