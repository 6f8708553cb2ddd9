"""Write the seed corpora of the fuzz targets into ``fuzz/corpus/<target>/``.

Run once from the repository root (``python fuzz/make_corpus.py``); its output is kept in the
repository. It is deterministic: the same script writes the same files. Only files named
``seed-*`` are replaced; inputs a fuzzer added to a corpus folder are left alone.

Each seed is a valid (or deliberately almost valid) request, frame or text, wrapped in the
target's input format by the target's own ``encode_seed`` so the two cannot drift apart.
The structured targets (``predict``, and ``ws`` in structured mode) read their input as a
stream of choices; their seeds are picked from seeded random inputs so that together they
reach every command and frame type.
"""

from __future__ import annotations

import json
import random
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_http
import fuzz_predict
import fuzz_sse
import fuzz_ws
import msgpack  # type: ignore[import-untyped]
from _driver import HOST, TOKEN, upgrade_bytes
from _fuzzkit import CORPUS_DIR, FuzzInput
from _wsgen import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frames, ws_frame

Seeds = dict[str, bytes]


def _write(target: str, seeds: Seeds) -> int:
    folder = CORPUS_DIR / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    for name, data in seeds.items():
        (folder / f"seed-{name}").write_bytes(data)
    return len(seeds)


# --- HTTP ------------------------------------------------------------------------------------


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    lines = [f"{method} {target} {version}", f"Host: {HOST}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return json.dumps(body).encode()


JSON = [("Content-Type", "application/json")]
AUTH = [("Authorization", f"Bearer {TOKEN}")]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def chunked(pieces: list[bytes], ext: str = "") -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext.encode(), p) for p in pieces)
    return out + b"0\r\n\r\n"


def http_requests() -> Seeds:
    completion = request("POST", "/v1/chat/completions", JSON, chat_body())
    streaming = request(
        "POST",
        "/v1/chat/completions",
        JSON,
        chat_body(stream=True, stream_options={"include_usage": True}),
    )
    body = chat_body(stream=True)
    return {
        "health": request("GET", "/health"),
        "head-health": request("HEAD", "/health"),
        "ping": request("GET", "/ping"),
        "models": request("GET", "/v1/models", AUTH),
        "model-slash": request("GET", "/v1/models/meta-llama%2FLlama-3", AUTH),
        "model-missing": request("GET", "/models/nope/"),
        "completion": completion,
        "completion-auth": request("POST", "/v1/chat/completions", JSON + AUTH, chat_body()),
        "stream-usage": streaming,
        "stream-n2": request("POST", "/chat/completions", JSON, chat_body(stream=True, n=2)),
        "tools": request(
            "POST",
            "/v1/chat/completions",
            JSON,
            chat_body(
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                stream=True,
            ),
        ),
        "history": request(
            "POST",
            "/v1/chat/completions",
            JSON,
            chat_body(
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                ],
                temperature=0.5,
                stop=["\n"],
                max_completion_tokens=5,
            ),
        ),
        "chunked": request(
            "POST",
            "/v1/chat/completions",
            [*JSON, ("Transfer-Encoding", "chunked")],
            chunked([body[:10], body[10:]], ";name=value"),
            length=False,
        ),
        "pipelined": completion + request("GET", "/health") + streaming,
        "keepalive-close": request("GET", "/health")
        + request("GET", "/v1/models", [("Connection", "close")]),
        "expect-continue": request(
            "POST", "/v1/chat/completions", [*JSON, ("Expect", "100-continue")], chat_body()
        ),
        "http10": request("GET", "/health", version="HTTP/1.0"),
        "http10-stream": request(
            "POST", "/v1/chat/completions", JSON, chat_body(stream=True), version="HTTP/1.0"
        ),
        "preflight": request(
            "OPTIONS",
            "/v1/chat/completions",
            [
                ("Origin", "https://app.test"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, x-stainless-os"),
            ],
        ),
        "cors-get": request("GET", "/v1/models", [("Origin", "https://app.test")]),
        "request-id": request("GET", "/health", [("X-Request-Id", "my-id.1")]),
        "upgrade-chat": upgrade_bytes("/chat")
        + ws_frame(OP_TEXT, json.dumps({"type": "message", "content": "hi"}).encode()),
        "upgrade-predict": upgrade_bytes(f"/predict?api_key={TOKEN}")
        + ws_frame(OP_TEXT, json.dumps({"command": "get_status", "data": {}}).encode()),
        "upgrade-bad-key": upgrade_bytes("/chat", key="short"),
        "workflows": request("GET", "/workflows", AUTH),
        "workflow-run": request(
            "POST", "/workflows/summarize/run", JSON + AUTH, b'{"message": "hi"}'
        ),
        "workflow-stream": request(
            "POST", "/workflows/summarize/run/stream", JSON, b'{"message": "hi"}'
        ),
        "method-not-allowed": request("DELETE", "/v1/models"),
        "bad-json": request(
            "POST", "/v1/chat/completions", JSON, b'{"model": "echo", "messages": ['
        ),
        "smuggle-cl-te": request(
            "POST", "/v1/chat/completions", [("Transfer-Encoding", "chunked")], chunked([body])
        ),
        "smuggle-double-cl": request(
            "POST", "/v1/chat/completions", [("Content-Length", "3")], body
        ),
        "obs-fold": b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
        "bare-lf": b"GET /health HTTP/1.1\nHost: a\n\n",
        "huge-chunk": request(
            "POST",
            "/v1/chat/completions",
            [("Transfer-Encoding", "chunked")],
            b"fffffffffffffffff\r\nabc",
            length=False,
        ),
        "te-gzip": request(
            "POST", "/v1/chat/completions", [("Transfer-Encoding", "gzip, chunked")], b"0\r\n\r\n"
        ),
        "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "long-header": request("GET", "/health", [("X-Long", "a" * 200)]),
        "big-body": request("POST", "/v1/chat/completions", JSON, chat_body(pad="x" * 400)),
        "big-chunked-body": request(
            "POST",
            "/v1/chat/completions",
            [("Transfer-Encoding", "chunked")],
            chunked([chat_body(pad="x" * 200), b"y" * 200]),
            length=False,
        ),
        "workflow-bad-params": request("POST", "/workflows/summarize/run", JSON, b"[1, 2]"),
        "workflow-missing": request("POST", "/workflows/nope/run", JSON, b"{}"),
    }


def http_seeds() -> Seeds:
    seeds: Seeds = {}
    for name, raw in http_requests().items():
        seeds[name] = fuzz_http.encode_seed(raw)
    # The same requests under the other configs, scripts and read patterns.
    variants: list[tuple[str, dict[str, Any]]] = [
        ("tiny", {"config": 1, "cuts": [3, 40]}),
        ("auth", {"config": 2, "script": 8}),
        ("openai-only", {"config": 3, "script": 4}),
        ("fail", {"script": 1, "timers": False}),
        ("midfail", {"script": 2, "cuts": [1]}),
        ("toolcall", {"script": 3}),
        ("hang", {"config": 1, "script": 5}),
        ("stall", {"config": 1, "script": 6}),
        ("shutdown", {"shutdown": 1}),
        ("shutdown-hang", {"config": 1, "script": 5, "shutdown": 2}),
    ]
    base = ["completion", "stream-usage", "pipelined", "chunked", "upgrade-chat", "tools"]
    requests = http_requests()
    for suffix, options in variants:
        for name in base:
            seeds[f"{name}-{suffix}"] = fuzz_http.encode_seed(requests[name], **options)
    for name in ("cors-get", "preflight", "big-chunked-body", "workflow-stream"):
        seeds[f"{name}-tiny"] = fuzz_http.encode_seed(requests[name], config=1)
    seeds["workflow-run-fails"] = fuzz_http.encode_seed(requests["workflow-run"], script=0xC0)
    return seeds


# --- OpenAI bodies ------------------------------------------------------------------------


def openai_seeds() -> Seeds:
    bodies: dict[str, Any] = {
        "minimal": json.loads(chat_body()),
        "stream": json.loads(chat_body(stream=True, stream_options={"include_usage": True})),
        "tools": json.loads(chat_body(tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)),
        "named-tool": json.loads(
            chat_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
        ),
        "sampling": json.loads(
            chat_body(
                temperature=2,
                top_p=0.1,
                n=3,
                seed=-1,
                presence_penalty=-2.0,
                logprobs=True,
                top_logprobs=3,
                max_tokens=10,
                stop=["a", "b"],
                user="u",
                response_format={"type": "json_schema", "json_schema": {"name": "s"}},
            )
        ),
        "parts": json.loads(
            chat_body(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {"type": "image_url", "image_url": "https://x.test/a.png"},
                            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                    {"role": "developer", "content": "d", "name": "dev"},
                ]
            )
        ),
        "tool-history": json.loads(
            chat_body(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": {"a": 1}},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "1"},
                    {"role": "function", "name": "f", "content": None},
                ]
            )
        ),
        "nulls": {
            "model": "echo",
            "messages": [{"role": "user", "content": "x"}],
            "stream": None,
            "n": None,
            "tools": None,
            "stop": None,
            "temperature": None,
        },
        "wrong-types": {"model": 1, "messages": {}, "n": "2", "stream": "yes"},
        "empty-messages": {"model": "echo", "messages": []},
        "bad-role": {"model": "echo", "messages": [{"role": "robot", "content": "x"}]},
    }
    seeds: Seeds = {name: json.dumps(b).encode() for name, b in bodies.items()}
    seeds["deep"] = (
        b'{"model":"echo","messages":[{"role":"user","content":' + b"[" * 200 + b"]" * 200 + b"}]}"
    )
    seeds["nan"] = b'{"model":"echo","messages":[{"role":"user","content":"x"}],"temperature":NaN}'
    seeds["huge-int"] = (
        b'{"model":"echo","messages":[{"role":"user","content":"x"}],"n":' + b"9" * 5000 + b"}"
    )
    seeds["bigint-seed"] = (
        b'{"model":"echo","messages":[{"role":"user","content":"x"}],"seed":99999999999999999999}'
    )
    seeds["not-utf8"] = b'{"model":"\xff","messages":[]}'
    seeds["utf16"] = json.dumps(bodies["minimal"]).encode("utf-16")
    seeds["lone-surrogate"] = b'{"model":"echo","messages":[{"role":"user","content":"\\ud800"}]}'
    seeds["tiny-depth"] = b" " + json.dumps(bodies["tools"]).encode()
    seeds["trailing"] = json.dumps(bodies["minimal"]).encode() + b" {}"
    return seeds


# --- codec -----------------------------------------------------------------------------------


def codec_seeds() -> Seeds:
    chat = {
        "type": "message",
        "content": "hi",
        "thread_id": "t1",
        "model": "echo",
        "tools": ["calculator"],
    }
    predict = {
        "command": "run_job",
        "data": {"workflow_id": "summarize", "params": {"message": "hi"}},
    }
    seeds: Seeds = {
        "json-chat": json.dumps(chat).encode(),
        "json-predict": json.dumps(predict).encode(),
        "msgpack-chat": msgpack.packb(chat, use_bin_type=True),
        "msgpack-predict": msgpack.packb(predict, use_bin_type=True),
        "msgpack-bin": msgpack.packb(
            {"type": "message", "content": b"\x00\x01"}, use_bin_type=True
        ),
        "msgpack-ext": msgpack.packb({"x": msgpack.ExtType(5, b"abc")}),
        "msgpack-timestamp": b"\x81\xa1t\xd6\xff\x00\x00\x00\x01",
        "msgpack-int-key": msgpack.packb({1: 2}),
        "msgpack-nan": msgpack.packb({"x": float("nan"), "y": float("inf")}),
        "array32-huge": b"\x81\xa1a\xdd\xff\xff\xff\xff",
        "map32-huge": b"\xdf\xff\xff\xff\xff",
        "str32-huge": b"\x81\xa1a\xdb\xff\xff\xff\xff",
        "bin32-huge": b"\x81\xa1a\xc6\xff\xff\xff\xff",
        "msgpack-deep": b"\x81\xa1a" + b"\x91" * 2000 + b"\x90",
        "msgpack-trailing": msgpack.packb({"a": 1}) + b"\xc0",
        "json-deep": b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
        "json-nan": b'{"a": NaN, "b": -Infinity}',
        "json-huge-int": b'{"a": ' + b"1" * 5000 + b"}",
        "json-not-object": b"[1, 2, 3]",
        "json-surrogate": b'{"content": "\\udc80\\ud800"}',
        "tiny-depth": b"\x01" + json.dumps({"a": [[[[1]]]]}).encode(),
    }
    return seeds


# --- WebSocket -------------------------------------------------------------------------------


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _m(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def ws_seeds() -> Seeds:
    message = {"type": "message", "content": "hi", "thread_id": "t1", "tools": ["calculator"]}
    manifest = {
        "type": "client_tools_manifest",
        "tools": [{"name": "browser", "description": "b", "parameters": {"type": "object"}}],
    }
    tool_result = {"type": "tool_result", "tool_call_id": "call_1", "ok": True, "result": {"a": 1}}
    payload = _j(message)
    raw: dict[str, tuple[bytes, dict[str, Any]]] = {
        "json-message": (ws_frame(OP_TEXT, payload), {}),
        "msgpack-message": (ws_frame(OP_BINARY, _m(message)), {}),
        "chat-message-image": (
            ws_frame(
                OP_TEXT,
                _j(
                    {
                        "type": "chat_message",
                        "content": [
                            {"type": "text", "text": "see"},
                            {"type": "image_url", "image": {"uri": "https://x.test/i.png"}},
                        ],
                    }
                ),
            ),
            {},
        ),
        "manifest-then-message": (
            ws_frame(OP_TEXT, _j(manifest)) + ws_frame(OP_TEXT, payload),
            {"script": 3},
        ),
        "tool-round": (
            ws_frame(OP_TEXT, _j(manifest))
            + ws_frame(OP_TEXT, payload)
            + ws_frame(OP_TEXT, _j(tool_result)),
            {"script": 3},
        ),
        "stop": (ws_frame(OP_TEXT, payload) + ws_frame(OP_TEXT, _j({"type": "stop"})), {}),
        "ping-frames": (
            ws_frame(OP_TEXT, _j({"type": "ping"})) + ws_frame(OP_PING, b"hi") + ws_frame(OP_PONG),
            {},
        ),
        "workflow-turn": (
            ws_frame(
                OP_BINARY, _m({"type": "message", "content": "go", "workflow_id": "summarize"})
            ),
            {},
        ),
        "fragmented": (
            ws_frame(OP_TEXT, payload[:9], fin=False) + ws_frame(0, payload[9:]),
            {"cuts": [3, 12]},
        ),
        "close": (ws_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye"), {}),
        "close-empty": (ws_frame(OP_CLOSE), {}),
        "close-3000": (
            ws_frame(OP_TEXT, payload) + ws_frame(OP_CLOSE, struct.pack("!H", 3000)),
            {},
        ),
        "unmasked": (ws_frame(OP_TEXT, payload, mask=None), {}),
        "rsv": (ws_frame(OP_TEXT, payload, rsv=4), {}),
        "big-ping": (ws_frame(OP_PING, b"p" * 126), {}),
        "bad-utf8": (ws_frame(OP_TEXT, b'{"type":"\xff"}'), {}),
        "huge-length": (ws_frame(OP_BINARY, b"abc", declared=2**40), {}),
        "too-big-tiny": (
            ws_frame(OP_TEXT, _j({"type": "message", "content": "x" * 200})),
            {"config": 1},
        ),
        "predict-run": (
            ws_frame(OP_TEXT, _j({"command": "run_job", "data": {"workflow_id": "summarize"}})),
            {"predict": True},
        ),
        "predict-mode": (
            ws_frame(OP_TEXT, _j({"command": "set_mode", "data": {"mode": "binary"}}))
            + ws_frame(OP_BINARY, _m({"command": "get_status", "data": {"job_id": "j1"}})),
            {"predict": True},
        ),
        "predict-auth": (
            ws_frame(OP_BINARY, _m({"command": "reconnect_job", "data": {"job_id": "j1"}})),
            {"predict": True, "config": 2},
        ),
        "together": (ws_frame(OP_TEXT, payload), {"together": True}),
    }
    # The same turns against the other worlds: hanging and failing providers, tools that fail
    # or hang, short timeouts, shutdown, no token. (Not script 7, the model that never stops
    # calling tools: it reproduces finding "tool-loop" at once; tests/ has that reproduction.)
    turns = {"message": raw["json-message"][0], "tool-round": raw["tool-round"][0]}
    worlds: dict[str, dict[str, Any]] = {
        "hang": {"config": 1, "script": 5},
        "stall": {"config": 1, "script": 6},
        "tool-fails": {"script": 0x23},
        "tool-hangs": {"config": 1, "script": 0x33},
        "store-fails": {"script": 0x10},
        "shutdown": {"config": 1, "script": 5, "shutdown": True},
        "anonymous": {"config": 2, "anonymous": True},
    }
    for turn, frames in turns.items():
        for world, opts in worlds.items():
            raw[f"{turn}-{world}"] = (frames, opts)
    predict_run = raw["predict-run"][0]
    raw["predict-anonymous"] = (predict_run, {"predict": True, "config": 2, "anonymous": True})
    seeds: Seeds = {
        name: fuzz_ws.encode_seed(frames, **opts) for name, (frames, opts) in raw.items()
    }
    seeds.update(
        _structured(
            "structured",
            lambda data: fuzz_ws.encode_seed(data, structured=True),
            lambda src: _ws_features(src),
            count=24,
        )
    )
    seeds.update(
        _structured(
            "structured-predict",
            lambda data: fuzz_ws.encode_seed(data, structured=True, predict=True),
            lambda src: _ws_features(src, predict=True),
            count=12,
        )
    )
    return seeds


def _ws_features(src: FuzzInput, predict: bool = False) -> set[str]:
    before = src.pos
    frames, codes = client_frames(src, predict)
    return {
        f"op{frames[0] & 0xF}" if frames else "none",
        f"len{min(len(frames) // 64, 4)}",
        f"codes{len(codes)}",
        f"used{min((src.pos - before) // 32, 3)}",
    }


def _structured(
    prefix: str,
    wrap: Callable[[bytes], bytes],
    features: Callable[[FuzzInput], set[str]],
    *,
    count: int,
) -> Seeds:
    """Seeded random inputs for a structured target, each kept only if it shows something
    the ones before it did not."""
    rng = random.Random(prefix)
    seen: set[str] = set()
    seeds: Seeds = {}
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(16, 400))
        new = features(FuzzInput(data)) - seen
        if new:
            seen |= new
            seeds[f"{prefix}-{len(seeds):02d}"] = wrap(data)
        if len(seeds) >= count:
            break
    return seeds


# --- /predict --------------------------------------------------------------------------------


def _predict_features(src: FuzzInput) -> set[str]:
    features = set()
    for binary, payload in fuzz_predict.read_commands(src):
        try:
            value = msgpack.unpackb(payload, raw=False) if binary else json.loads(payload)
        except Exception:
            features.add("garbage")
            continue
        command = value.get("command") if isinstance(value, dict) else None
        data = value.get("data") if isinstance(value, dict) else None
        features.add(f"{command if isinstance(command, str) else 'odd'}:{type(data).__name__}")
    return features


def predict_seeds() -> Seeds:
    def wrap(data: bytes) -> bytes:
        return data

    seeds = _structured(
        "predict", wrap, lambda src: (src.take(3), _predict_features(src))[1], count=40
    )
    return seeds


# --- SSE -------------------------------------------------------------------------------------


def sse_seeds() -> Seeds:
    utf8 = 0  # surrogatepass
    texts: dict[str, tuple[bytes, int]] = {
        "plain": (b"Hello, world!", utf8),
        "done-injection": (b"a\n\ndata: [DONE]\n\nb", utf8),
        "event-injection": (b'x\nevent: error\ndata: {"error": 1}\n\n', utf8),
        "cr": (b"line\rline\r\nline", utf8),
        "nul": (b"\x00a\x00", utf8),
        "u2028": ("sep\u2028par\u2029nel\x85".encode(), utf8),
        "bom": ("\ufeffbom".encode(), utf8),
        "emoji": ("🙂👍🏽 family: 👨‍👩‍👧".encode(), utf8),
        "lone-high": (b"a\xed\xa0\x80b", utf8),
        "lone-low-escape": (b"a\xff\xfeb", 1),
        "latin1-nel": (b"a\x85b\r\n\x00", 2),
        "utf16-pair-split": ("x\U0001f600y".encode("utf-16-le"), 3),
        "colon-comment": (b": ping\n\ndata:", utf8),
        "long": (b"lorem ipsum " * 60, utf8),
        "empty": (b"", utf8),
    }
    seeds: Seeds = {}
    for name, (text, mode) in texts.items():
        seeds[name] = fuzz_sse.encode_seed(text, mode=mode, cuts=[1, 3, 7], read_cuts=[5, 100])
    seeds["usage-n2"] = fuzz_sse.encode_seed(b"two choices\n\n", mode=4 | 8, cuts=[4])
    seeds["nonstream"] = fuzz_sse.encode_seed(b"a\xed\xa0\x80\n", mode=16, cuts=[1, 2])
    return seeds


def main() -> None:
    counts = {
        "http": _write("http", http_seeds()),
        "openai_parse": _write("openai_parse", openai_seeds()),
        "codec": _write("codec", codec_seeds()),
        "ws": _write("ws", ws_seeds()),
        "predict": _write("predict", predict_seeds()),
        "sse": _write("sse", sse_seeds()),
    }
    for target, count in counts.items():
        print(f"fuzz/corpus/{target}: {count} seeds")


if __name__ == "__main__":
    main()
