"""Everything the engine asks the outside world for, starting with the language models.

``ChatProvider`` is the interface; ``ProviderRouter`` picks a provider per model id;
``EchoProvider`` is the embedded default model ``echo`` (PROTOCOL.md §1).
"""

from __future__ import annotations

from .base import ChatProvider
from .echo import ECHO_MODEL, EchoProvider
from .registry import ProviderRouter, default_router

__all__ = ["ECHO_MODEL", "ChatProvider", "EchoProvider", "ProviderRouter", "default_router"]
