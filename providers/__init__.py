"""Everything the engine asks the outside world for, starting with the language models.

``ChatProvider`` is the interface; ``ProviderRouter`` picks a provider per model id;
``EchoProvider`` is the embedded default model ``echo`` (PROTOCOL.md §1).
"""

from __future__ import annotations

from .base import ChatProvider
from .echo import ECHO_MODEL, EchoProvider
from .registry import ProviderRouter, default_router

__all__ = ["ECHO_MODEL", "ChatProvider", "EchoProvider", "ProviderRouter", "default_router"]

# Server-side tools and the conversation store of the NodeTool /chat WebSocket (PROTOCOL.md §4).
from .threads import ThreadAccessError, ThreadStore, default_db_path
from .tools import Tool, ToolError, ToolRegistry, default_tools, tool

__all__ += [
    "ThreadAccessError",
    "ThreadStore",
    "Tool",
    "ToolError",
    "ToolRegistry",
    "default_db_path",
    "default_tools",
    "tool",
]
