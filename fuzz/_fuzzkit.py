"""What every fuzz target shares that does not touch wirechat: the atheris glue and a
deterministic reader of fuzz input.

Rules of this module:

* It never imports ``wirechat`` (nor h11 or wsproto): a target imports those inside
  :func:`instrumented`, and ``atheris.instrument_imports`` only instruments modules imported
  for the first time inside that block.
* atheris is optional. Without it a target still imports, so ``TestOneInput`` runs under
  pytest (the seed-corpus and regression tests); only :func:`main` needs atheris.
* Structured targets read their input with :class:`FuzzInput`, not atheris'
  ``FuzzedDataProvider``: the same bytes decode to the same structure with or without
  atheris, so a crash file found by the fuzzer replays unchanged in a plain pytest run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

try:
    import atheris  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - CI installs atheris only for the fuzz step
    atheris = None

T = TypeVar("T")

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
# The protocol path: our engine and the two parsers it is built on. msgpack and json are C
# extensions (atheris cannot instrument them); everything else is noise for the fuzzer.
INSTRUMENTED = ("wirechat", "h11", "wsproto")

# Findings not fixed yet that a run may be told to look past (comma-separated names in
# WIRECHAT_FUZZ_KNOWN; README.md, "Findings"). Unset, every finding stops the run.
KNOWN = frozenset(filter(None, os.environ.get("WIRECHAT_FUZZ_KNOWN", "").split(",")))


def is_known(exc: BaseException) -> bool:
    """``exc`` is a finding named in ``WIRECHAT_FUZZ_KNOWN``."""
    if "bytes-key" in KNOWN and isinstance(exc, TypeError):
        return "keys must be str" in str(exc)
    return "tool-loop" in KNOWN and type(exc).__name__ == "Unbounded"


def tolerate_known(test_one_input: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Let the known findings pass (the input is abandoned there), raise everything else."""

    @functools.wraps(test_one_input)
    def run(data: bytes) -> None:
        try:
            test_one_input(data)
        except Exception as exc:
            if not is_known(exc):
                raise

    return run


def instrumented(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """``atheris.instrument_imports`` over the protocol modules when fuzzing, else nothing.

    ``enabled`` is ``__name__ == "__main__"`` in a target: importing a target from pytest must
    not instrument (and slow down) the modules the rest of the test run uses.
    """
    if enabled and atheris is not None:
        return atheris.instrument_imports(include=list(INSTRUMENTED))  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Run ``test_one_input`` under libFuzzer with the command line's arguments."""
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def corpus_files(target: str) -> list[Path]:
    """The seed files of ``fuzz/corpus/<target>``, in a stable order."""
    folder = CORPUS_DIR / target
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


class FuzzInput:
    """Consumes fuzz bytes front to back; once they run out every read returns its minimum.

    Integers take as few bytes as their range needs, so small mutations make small changes.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        value = self.data[self.pos]
        self.pos += 1
        return value

    def int_in(self, low: int, high: int) -> int:
        """An integer in ``[low, high]`` (both included)."""
        span = high - low
        if span <= 0:
            return low
        value = 0
        needed = span
        while needed > 0:
            value = value << 8 | self.byte()
            needed >>= 8
        return low + value % (span + 1)

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def chance(self, one_in: int) -> bool:
        """True about once in ``one_in`` draws."""
        return self.int_in(0, one_in - 1) == 0

    def pick(self, items: Sequence[T]) -> T:
        return items[self.int_in(0, len(items) - 1)]

    def take(self, size: int) -> bytes:
        chunk = self.data[self.pos : self.pos + max(0, size)]
        self.pos += len(chunk)
        return chunk

    def blob(self, max_size: int) -> bytes:
        """A length (one or two bytes) then that many bytes."""
        return self.take(self.int_in(0, max_size))

    def text(self, max_size: int) -> str:
        """Text from a blob, decoded leniently (lone surrogates included)."""
        return decode_text(self.blob(max_size), self.byte())

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def decode_text(raw: bytes, mode: int) -> str:
    """Bytes to text in one of four ways, so every code point can occur, lone surrogates too.

    0: UTF-8 with ``surrogatepass`` (``ED A0 80`` is a lone U+D800) and ``replace`` after;
    1: UTF-8 with ``surrogateescape`` (bad bytes become U+DC80-U+DCFF);
    2: Latin-1 (CR, NUL, U+0085 in one byte each); 3: UTF-16-LE with ``surrogatepass``.
    """
    mode %= 4
    if mode == 0:
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")
    if mode == 1:
        return raw.decode("utf-8", "surrogateescape")
    if mode == 2:
        return raw.decode("latin-1")
    return raw[: len(raw) // 2 * 2].decode("utf-16-le", "surrogatepass")


def split_points(source: FuzzInput, size: int, max_cuts: int = 4) -> list[int]:
    """Up to ``max_cuts`` cut offsets in ``[1, size)``, read from ``source``."""
    if size < 2:
        return []
    count = source.int_in(0, max_cuts)
    return sorted({source.int_in(1, size - 1) for _ in range(count)})


def pieces(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut at ``cuts``; never an empty piece (an empty read means EOF in h11)."""
    start = 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            yield data[start:cut]
            start = cut
