"""The web playground served at ``GET /`` (and ``HEAD``): one self-contained HTML page.

Rules of this module:

* Pure: the page's bytes come in from outside, read once at start-up (``wirechat.playground``
  loads the packaged file); nothing here reads a file or a clock. A server built without a
  :class:`Playground` in its ``EngineConfig`` answers ``/`` with 404, as before.
* The page is static and public: it holds no secret, and a token the user pastes stays in
  the browser (``?api_key=`` on the WebSocket, ``Authorization: Bearer`` on fetch).
* Its Content-Security-Policy allows the page's own inline ``<script>`` and ``<style>`` by
  SHA-256 hash (computed once, in :meth:`Playground.from_html`), fetches and WebSockets to
  the origin that served it, and nothing else: no ``'unsafe-inline'``, no other origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

# The bodies of the page's inline elements, exactly as the browser hashes them.
_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
_STYLE = re.compile(rb"<style>(.*?)</style>", re.DOTALL)
# A Host header that may be named in the policy: a DNS name or an IP literal, and a port.
# Anything else (it is the client's own value) leaves only 'self', which modern browsers
# already match against ws:// and wss:// of the same host.
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _hashes(pattern: re.Pattern[bytes], page: bytes) -> tuple[str, ...]:
    return tuple(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + "'"
        for body in pattern.findall(page)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Playground:
    """The page and what its Content-Security-Policy allows."""

    page: bytes
    script_hashes: tuple[str, ...] = ()
    style_hashes: tuple[str, ...] = ()

    @property
    def content_type(self) -> bytes:
        return b"text/html; charset=utf-8"

    @classmethod
    def from_html(cls, page: bytes) -> Playground:
        """The playground for ``page``, allowing exactly its inline scripts and styles."""
        return cls(
            page=page, script_hashes=_hashes(_SCRIPT, page), style_hashes=_hashes(_STYLE, page)
        )

    def content_security_policy(self, host: str) -> str:
        """The policy for a page served to a request whose ``Host`` header was ``host``."""
        connect = "'self'"
        if _HOST.fullmatch(host):
            connect += f" ws://{host} wss://{host}"
        scripts = " ".join(self.script_hashes) or "'none'"
        styles = " ".join(self.style_hashes) or "'none'"
        return (
            f"default-src 'none'; script-src {scripts}; style-src {styles}; img-src data:;"
            f" connect-src {connect}; base-uri 'none'; form-action 'none';"
            " frame-ancestors 'none'"
        )

    def headers(self, host: str) -> tuple[tuple[str, str], ...]:
        """The headers of the page's response, beside content-type and content-length."""
        return (
            ("content-security-policy", self.content_security_policy(host)),
            ("x-content-type-options", "nosniff"),
            # Revalidated on every load: an upgraded server serves its new page at once.
            ("cache-control", "no-cache"),
            ("referrer-policy", "no-referrer"),
            ("x-frame-options", "DENY"),
        )
