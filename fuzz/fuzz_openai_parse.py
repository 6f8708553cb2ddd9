"""Fuzz target: a request body into ``wirechat.engine.openai.parse_chat_request``.

Input: the body itself (libFuzzer's dictionary and the JSON seeds do the structure).

Invariant: the parser returns a well-formed ``ParsedChatRequest`` or raises
``RequestError`` carrying a 400 and a message (the OpenAI envelope); any other exception,
``RecursionError`` included, is a finding. A parsed request holds at least one message, ``n``
between 1 and 128, and only the value types the parser promises.

Run: ``python fuzz/fuzz_openai_parse.py -max_total_time=600 fuzz/corpus/openai_parse``.
"""

from __future__ import annotations

import sys

from _fuzzkit import instrumented, main, tolerate_known

with instrumented(__name__ == "__main__"):
    from wirechat.engine import ChatMessage, RequestError
    from wirechat.engine.openai import error_body, load_json, parse_chat_request


@tolerate_known
def TestOneInput(data: bytes) -> None:
    max_depth = 4 if data[:1] == b" " else 64  # a leading space: the tiny-limit config
    try:
        parsed = parse_chat_request(data, max_depth=max_depth)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and exc.message, exc
        assert exc.param is None or isinstance(exc.param, str)
        body = error_body(exc)  # the envelope must be encodable as the engine encodes it
        assert body["error"]["message"] == exc.message
        return
    request = parsed.request
    assert isinstance(request.model, str) and request.model
    assert request.messages and all(isinstance(m, ChatMessage) for m in request.messages)
    assert 1 <= parsed.n <= 128
    assert parsed.include_usage <= parsed.stream
    assert all(isinstance(s, str) and s for s in request.stop) and len(request.stop) <= 4
    assert isinstance(load_json(data, max_depth), dict)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
