"""The hypothesis fuzzers of ``fuzz/hypothesis_fuzz.py``, with few, derandomized examples.

The properties live with the fuzz targets (their checks are the targets' own); this module
only brings them into the default test run. Long runs: ``fuzz/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

from hypothesis_fuzz import (  # noqa: F401 - collected by pytest from this module
    test_chat_frames,
    test_codec_any_value,
    test_codec_bytes,
    test_codec_round_trip,
    test_http_requests,
    test_openai_parse,
    test_openai_parse_bytes,
    test_predict_frames,
    test_predict_one_reply_per_command,
    test_sse_round_trip,
    test_valid_openai_bodies_parse,
)
