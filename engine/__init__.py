"""wirechat's sans-IO protocol engine: bytes and provider results in; bytes and effects out.

Nothing here performs I/O, reads a clock or imports asyncio; see DESIGN.md.
"""

from .chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    ModelInfo,
    ProviderError,
    ProviderItem,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from .config import AuthMode, EngineConfig, MetricsAccess, StaticKey, Surface
from .connection import ServerConnection
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, RequestError
from .events import (
    CallProvider,
    CancelProvider,
    CloseTransport,
    ConnectionFailed,
    Effect,
    ListModels,
    Notice,
    Output,
    RequestAbandoned,
    RequestCompleted,
    VerifyToken,
)
from .state import Phase

__all__ = [
    "AuthMode",
    "CallProvider",
    "CancelProvider",
    "ChatMessage",
    "ChatRequest",
    "CloseTransport",
    "ConnectionFailed",
    "Effect",
    "EngineConfig",
    "Finish",
    "ListModels",
    "LocalProtocolError",
    "MetricsAccess",
    "ModelInfo",
    "Notice",
    "Output",
    "Phase",
    "ProtocolError",
    "ProviderError",
    "ProviderItem",
    "RemoteProtocolError",
    "RequestAbandoned",
    "RequestCompleted",
    "RequestError",
    "ServerConnection",
    "StaticKey",
    "Surface",
    "TextDelta",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "VerifyToken",
]
