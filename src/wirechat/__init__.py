"""wirechat: an OpenAI-compatible and NodeTool-compatible chat server.

``wirechat.engine`` is the sans-IO protocol engine, ``wirechat.transport`` the asyncio server
that drives it, ``wirechat.providers`` the models and tools. Importing ``wirechat`` (or
``wirechat.engine``) does not load asyncio: ``start`` and ``RunningServer`` (from
``wirechat.embed``) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RunningServer", "__version__", "start"]

if TYPE_CHECKING:
    from .embed import RunningServer, start


def __getattr__(name: str) -> Any:
    if name in ("start", "RunningServer"):
        from . import embed

        return getattr(embed, name)
    raise AttributeError(f"module 'wirechat' has no attribute {name!r}")
