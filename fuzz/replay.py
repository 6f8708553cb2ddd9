"""Replay inputs through a fuzz target without atheris: crash files, corpus folders, or both.

    python fuzz/replay.py TARGET PATH...    e.g.  python fuzz/replay.py codec fuzz/crashes/
    python -m coverage run --source=wirechat.engine fuzz/replay.py http fuzz/corpus/http /tmp/w

Runs every file (folders: every file in them) through ``fuzz_TARGET.TestOneInput``, strictly
(``WIRECHAT_FUZZ_KNOWN`` is ignored), prints one line per failing input with its exception and
a summary; exits 1 if any input failed. Under ``coverage`` it measures how much of the engine
a corpus reaches (the figures in README.md).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    target, paths = argv[0], [Path(p) for p in argv[1:]]
    module = importlib.import_module(f"fuzz_{target}")
    test_one_input = getattr(module.TestOneInput, "__wrapped__", module.TestOneInput)
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    failed = 0
    for file in files:
        try:
            test_one_input(file.read_bytes())
        except Exception as exc:
            failed += 1
            print(f"FAIL {file}: {type(exc).__name__}: {exc}"[:400])
            if len(files) == 1:
                traceback.print_exc()
    print(f"fuzz_{target}: {len(files)} inputs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
