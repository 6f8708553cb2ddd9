"""wirechat: an OpenAI-compatible and NodeTool-compatible chat server.

``wirechat.engine`` is the sans-IO protocol engine, ``wirechat.transport`` the asyncio server
that drives it, ``wirechat.providers`` the models and tools. Importing ``wirechat`` (or
``wirechat.engine``) does not load asyncio.
"""

__version__ = "0.1.0"
