"""The strictness layer in front of h11: checks a raw request head before h11 parses it.

Rules of this module:

* Input is the raw bytes a client sent for one request head (possibly incomplete, possibly
  followed by a body and pipelined requests). Output is the length of the head when it is
  complete and acceptable, ``None`` when more bytes are needed, or a raised
  :class:`RemoteProtocolError` with the status to answer.
* It rejects what h11 lets through but gunicorn and nginx refuse (reference/reliability.md
  §2.1): bare LF or CR line endings, obs-fold, Content-Length with Transfer-Encoding,
  duplicate Content-Length or Transfer-Encoding, Transfer-Encoding on HTTP/1.0 or other than
  ``chunked``, request versions other than HTTP/1.0 and 1.1. And it applies the size limits
  h11 lacks or lets a one-read head bypass: head bytes, request line, field count and size.
* Everything else (token syntax, header value characters, Host rules) is h11's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import EngineConfig
from .errors import RemoteProtocolError

_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_METHOD = re.compile(rb"[A-Z]{1,20}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,20}")  # h11's own grammar, so both agree


def _reject(status: int, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, status=status)


def _check_line_endings(head: bytes | bytearray, complete: bool) -> None:
    # In a valid head every LF is preceded by CR and every CR followed by LF (RFC 9112 §2.2).
    # A CR at the very end of an incomplete head may still be followed by its LF.
    crlf = head.count(b"\r\n")
    cr = head.count(b"\r") - (0 if complete or not head.endswith(b"\r") else 1)
    if head.count(b"\n") != crlf or cr != crlf:
        raise _reject(400, "Invalid line ending in request head (bare CR or LF)")


@dataclass(frozen=True, slots=True)
class Head:
    length: int  # bytes of the head, final CRLF CRLF included
    chunked: bool  # the body is chunked: its framing lines must be checked too


def check_request_head(buffer: bytes | bytearray, config: EngineConfig) -> Head | None:
    """Return the complete head at the start of ``buffer``, or ``None`` if incomplete.

    Raises :class:`RemoteProtocolError` (400, 414, 431, 501 or 505) for a head we refuse.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > config.max_head_bytes:
            if buffer.find(b"\r\n") < 0 and len(buffer) > config.max_request_line_bytes:
                raise _reject(414, "Request line too long")
            raise _reject(431, "Request header block too large")
        first_line_end = buffer.find(b"\r\n")
        if first_line_end < 0 and len(buffer) > config.max_request_line_bytes:
            raise _reject(414, "Request line too long")
        _check_line_endings(buffer, complete=False)
        return None
    length = end + 4
    if length > config.max_head_bytes:
        raise _reject(431, "Request header block too large")
    head = bytes(buffer[:end])
    _check_line_endings(head, complete=True)

    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > config.max_request_line_bytes:
        raise _reject(414, "Request line too long")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise _reject(400, "Malformed request line")
    method, _target, version = parts
    if not _METHOD.fullmatch(method):
        raise _reject(400, "Malformed request method")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise _reject(400, "Malformed HTTP version")
    if match.group(1) != b"1" or match.group(2) not in (b"0", b"1"):
        raise _reject(505, "HTTP version not supported")

    fields = lines[1:]
    if len(fields) > config.max_header_count:
        raise _reject(431, "Too many header fields")
    content_length = 0
    transfer_encoding: bytes | None = None
    for line in fields:
        if len(line) > config.max_header_field_bytes:
            raise _reject(431, "Header field too large")
        if line[:1] in (b" ", b"\t"):
            raise _reject(400, "Obsolete line folding is not allowed")
        name, colon, value = line.partition(b":")
        if not colon:
            raise _reject(400, "Malformed header field")
        lowered = name.lower()
        if lowered == b"content-length":
            content_length += 1
            # h11 merges "3, 3" into one value; a proxy may read it otherwise (smuggling).
            if not value.strip(b" \t").isdigit():
                raise _reject(400, "Malformed Content-Length")
        elif lowered == b"transfer-encoding":
            if transfer_encoding is not None:
                raise _reject(400, "Duplicate Transfer-Encoding")
            transfer_encoding = value.strip(b" \t").lower()
    if content_length > 1:
        raise _reject(400, "Duplicate Content-Length")
    if transfer_encoding is not None:
        if content_length:
            raise _reject(400, "Content-Length together with Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise _reject(400, "Transfer-Encoding on HTTP/1.0")
        if transfer_encoding != b"chunked":
            raise _reject(501, "Unsupported Transfer-Encoding")
    return Head(length=length, chunked=transfer_encoding is not None)


class ChunkedBodyCheck:
    """Checks the framing lines of a chunked body as its bytes arrive, before h11 does.

    h11 parses the chunks; this refuses only what h11 lets through (reliability §2.1,
    HTTP Garden #36): a CR, LF or NUL inside a chunk-size line or its extensions, or in a
    trailer line, and over-long framing lines. Chunk data is skipped, never copied.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self, max_line: int = 4096) -> None:
        self._state = self._SIZE
        self._line = bytearray()
        self._remaining = 0
        self._max_line = max_line

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._state != self._DONE:
            if self._state == self._DATA or self._state == self._DATA_END:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                if self._remaining == 0:
                    if self._state == self._DATA:
                        self._state, self._remaining = self._DATA_END, 2
                    else:
                        self._state = self._SIZE
                continue
            end = bytes(view[: self._max_line + 2]).find(b"\n")
            if end < 0:
                self._line += view
                view = view[len(view) :]
                if len(self._line) > self._max_line:
                    raise _reject(400, "Chunk framing line too long")
                continue
            self._line += view[:end]
            view = view[end + 1 :]
            self._line_done()

    def _line_done(self) -> None:
        line = bytes(self._line)
        self._line.clear()
        if len(line) > self._max_line or not line.endswith(b"\r"):
            raise _reject(400, "Malformed chunk framing line")
        line = line[:-1]
        if b"\r" in line or b"\0" in line:
            raise _reject(400, "Bare CR or NUL in chunk framing")
        if self._state == self._TRAILER:
            if not line:
                self._state = self._DONE
            return
        size_text = line.split(b";", 1)[0].rstrip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise _reject(400, "Malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            self._state = self._TRAILER
        else:
            self._state, self._remaining = self._DATA, size
