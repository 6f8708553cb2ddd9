"""Our side of an HTTP/1.1 exchange, written straight to bytes.

Rules of this module:

* h11 reads every request (framing, syntax, their side's state); what we answer is written
  here. Sending a response through h11 cost about as much as parsing the request (an event
  object, header validation by regular expression, a state machine per event: about half
  of h11's cost per request), and the response is ours: its names and values come from the
  engine, or are values h11 already validated as request fields (Origin, Host, ...).
* The bytes follow h11's own rules for a server: the status line says ``HTTP/1.1``; a body
  of unknown length is chunked to an HTTP/1.1 client and delimited by the close to an
  HTTP/1.0 one; an exchange that will not be kept alive says ``connection: close``. The
  tests read every response with an h11 client.
* The one check kept is the one that matters for a head we build: no CR or LF inside a
  name or value (they would split it). Finding one is our bug (``LocalProtocolError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

from .errors import LocalProtocolError

Headers = Sequence[tuple[bytes, bytes]]

# The end of a chunked body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"

_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def keeps_alive(http_version: bytes, headers: Headers) -> bool:
    """Whether the client lets the connection live past this exchange (h11's rule: an
    HTTP/1.1 request without ``connection: close``). ``headers`` as h11 parsed them."""
    if http_version < b"1.1":
        return False
    for name, value in headers:
        if name == b"connection" and b"close" in (
            token.strip() for token in value.lower().split(b",")
        ):
            return False
    return True


def response_head(status: int, headers: Headers) -> bytes:
    """The status line and header block, final blank line included."""
    fields = b"".join([b"%s: %s\r\n" % field for field in headers])
    # Each field adds exactly one CR and one LF; any other is inside a name or value.
    if fields.count(b"\n") != len(headers) or fields.count(b"\r") != len(headers):
        raise LocalProtocolError(f"CR or LF inside a response header: {headers!r}")
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason(status), fields)
