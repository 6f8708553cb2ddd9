"""The web playground's page (``playground.html``, package data), loaded for the engine.

The engine serves the page as constant bytes and reads no file itself: this module reads it
once, on first use, and the CLI passes it in (``EngineConfig(playground=...)``). An embedding
program can do the same: ``EngineConfig(playground=wirechat.playground.load())``.
"""

from __future__ import annotations

import functools
from importlib import resources

from wirechat.engine.playground import Playground

PAGE = "playground.html"


@functools.cache
def load() -> Playground:
    """The packaged page and its Content-Security-Policy hashes (read once per process)."""
    return Playground.from_html(resources.files(__package__).joinpath(PAGE).read_bytes())
