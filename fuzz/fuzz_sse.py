"""Fuzz target: whatever text a provider streams, an ``openai`` client reads exactly that text.

Input: ``[mode][cut count][cut: 2 bytes]*[read cut count][read cut: 2 bytes]*`` then the
text's bytes. ``mode & 3`` picks the decoding (``_fuzzkit.decode_text``: UTF-8 with
surrogatepass, surrogateescape, Latin-1, UTF-16 — lone surrogates, CR, NUL, U+0085, U+2028
all occur); ``mode & 4`` asks for ``stream_options.include_usage``; ``mode & 8`` for ``n=2``.
The text is cut into ``TextDelta`` items at the first cut list (code-point offsets), streamed
through a ``POST /v1/chat/completions`` with ``stream: true``, and the SSE body, read by an
``h11`` client, is fed to openai-python's ``SSEDecoder`` in pieces cut at the second list.

Invariant: the concatenated ``delta.content`` of every choice equals the text exactly (as
JSON can carry it: adjacent surrogate halves read back as one pair, see ``utf16``); the
stream holds only ``data`` events (no ``event``, ``id`` or ``retry``), exactly one
``[DONE]``, last; no error event; every chunk has the same id. Also holds for the plain
JSON reply (``stream: false``): ``message.content`` equals the text.

Run: ``python fuzz/fuzz_sse.py -max_total_time=600 fuzz/corpus/sse`` (see README.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from _fuzzkit import FuzzInput, decode_text, instrumented, main, pieces, tolerate_known

with instrumented(__name__ == "__main__"):
    from _driver import CONFIGS, HOST, Driver, Script, check_http, strict_json

try:
    from openai._streaming import SSEDecoder as OpenAIDecoder
except ImportError:  # pragma: no cover - openai is a test dependency
    OpenAIDecoder = None  # type: ignore[assignment, misc]


class StrictSSEDecoder:
    """The WHATWG event-stream grammar, for when openai is not installed: lines end at CRLF,
    LF or CR; ``field: value`` with one optional space; a blank line dispatches."""

    def iter_bytes(self, chunks: Iterator[bytes]) -> Iterator[Any]:
        text = b"".join(chunks).decode("utf-8")
        data: list[str] = []
        event: str | None = None
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            if not line:
                if data or event:
                    yield _Event(event, "\n".join(data))
                data, event = [], None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value


class _Event:
    def __init__(self, event: str | None, data: str) -> None:
        self.event, self.data, self.id, self.retry = event, data, None, None


def utf16(text: str) -> str:
    """``text`` as a JSON parser reads it back: JSON escapes are UTF-16 code units, so a high
    and a low surrogate side by side (Python lets a str hold them apart) become one pair."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _request(stream: bool, usage: bool, n: int) -> bytes:
    body: dict[str, Any] = {
        "model": "echo",
        "messages": [{"role": "user", "content": "say it"}],
        "stream": stream,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    if n != 1:
        body["n"] = n
    raw = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode("ascii") + raw


def run_sse(
    deltas: Sequence[str],
    *,
    usage: bool = False,
    n: int = 1,
    read_cuts: Sequence[int] = (),
    stream: bool = True,
) -> None:
    """Stream ``deltas`` and check that a client reads back exactly their concatenation."""
    text = utf16("".join(deltas))
    driver = Driver(CONFIGS[0], Script(provider=0, texts=tuple(deltas), usage=usage))
    driver.feed(_request(stream, usage, n))
    assert driver.calls == n, driver.calls
    result = check_http(driver)  # the h11 client oracle, the SSE framing check
    assert len(result.replies) == 1 and result.replies[0].status == 200, result.replies
    body = result.replies[0].body
    if not stream:
        choices = strict_json(body)["choices"]
        got = [utf16(c["message"]["content"]) for c in choices]
        assert got == [text] * n, (got, text)
        return
    decoder: Any = OpenAIDecoder() if OpenAIDecoder is not None else StrictSSEDecoder()
    cuts = sorted({c % len(body) for c in read_cuts})
    events = list(decoder.iter_bytes(iter(list(pieces(body, cuts)))))
    assert events and events[-1].data == "[DONE]", events[-2:]
    assert sum(e.data.startswith("[DONE]") for e in events) == 1, "more than one [DONE]"
    contents = [""] * n
    ids = set()
    for event in events[:-1]:
        assert event.event is None and event.id is None and event.retry is None, event
        chunk = json.loads(event.data)  # what openai-python's Stream does with each event
        assert "error" not in chunk, chunk
        assert chunk["object"] == "chat.completion.chunk", chunk
        ids.add(chunk["id"])
        for choice in chunk["choices"]:
            content = choice["delta"].get("content")
            if content:
                contents[choice["index"]] += content
    assert len(ids) == 1, ids
    assert [utf16(c) for c in contents] == [text] * n, (contents, text)


def encode_seed(
    text: bytes,
    *,
    mode: int = 0,
    cuts: Sequence[int] = (),
    read_cuts: Sequence[int] = (),
) -> bytes:
    """The fuzz input for this run (used by make_corpus.py)."""
    head = bytes([mode, len(cuts)]) + b"".join(c.to_bytes(2, "big") for c in cuts)
    head += bytes([len(read_cuts)]) + b"".join(c.to_bytes(2, "big") for c in read_cuts)
    return head + text


@tolerate_known
def TestOneInput(data: bytes) -> None:
    source = FuzzInput(data)
    mode = source.byte()
    cuts = [source.int_in(0, 0xFFFF) for _ in range(source.byte() % 8)]
    read_cuts = [source.int_in(0, 0xFFFF) for _ in range(source.byte() % 8)]
    text = decode_text(source.rest(), mode & 3)
    # Cuts in code points; equal or out-of-order cuts make empty deltas, which must vanish.
    offsets = sorted(c % (len(text) + 1) for c in cuts)
    deltas = [text[a:b] for a, b in zip([0, *offsets], [*offsets, len(text)], strict=True)]
    run_sse(deltas, usage=bool(mode & 4), n=2 if mode & 8 else 1, read_cuts=read_cuts)
    if mode & 16:
        run_sse(deltas, n=2 if mode & 8 else 1, stream=False)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
