"""``GET /openapi.json`` (issue 8 item 5): the document is valid OpenAPI 3.1, names every HTTP
endpoint wirechat serves, and a running server keeps to it under schemathesis.

Rules of this module:

* The document itself is checked without a server: OpenAPI 3.1 validity (with
  ``openapi-spec-validator``, skipped when it is not installed), the paths, the security and
  the error shapes, and that ``engine/openapi.py`` stays a pure module.
* A server started with ``--auth-provider static`` and the example workflows answers every
  path of the document with something other than 404, with and without a token as the
  document says, and serves the document itself without one.
* schemathesis (skipped when it cannot be imported) runs every check it has (``--checks
  all``) on that server: deterministic (the same cases every run) and bounded in examples,
  with a wall-clock limit on the process. The document it loads is ``OPENAPI_JSON`` itself,
  written to a file, so the run does not depend on the route. Its report, with a ``curl``
  line for each failure, is in the assertion message.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerFactory, ServerProcess
from wirechat.engine import openapi
from wirechat.engine.openapi import OPENAPI_JSON, openapi_document

import wirechat

TOKEN = "openapi-test-token"
WORKFLOWS = (
    *("--workflow", "examples/workflows.py:summarize"),
    *("--workflow", "examples/echo_graph.json"),
)
PUBLIC = {"/", "/health", "/ping", "/openapi.json"}
PATHS = {
    "/v1/chat/completions": {"post"},
    "/v1/models": {"get"},
    "/v1/models/{model}": {"get"},
    "/health": {"get"},
    "/ping": {"get"},
    "/workflows": {"get"},
    "/workflows/{workflow_id}/run": {"post"},
    "/workflows/{workflow_id}/run/stream": {"post"},
    "/openapi.json": {"get"},
    "/": {"get"},  # the playground page
    "/metrics": {"get"},  # Prometheus text; the API's auth unless --metrics-public
}
# Values that exist on the server below, for the path parameters of the document.
PATH_VALUES = {"model": "echo", "workflow_id": "summarize"}
BODIES: dict[str, Any] = {
    "/v1/chat/completions": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
    "/workflows/{workflow_id}/run": {"message": "hi"},
    "/workflows/{workflow_id}/run/stream": {"message": "hi"},
}
# The run's bound is examples per operation and phase; it takes about 15 s. No `--max-time`:
# schemathesis 4 repeats fuzzing until that budget is spent, which makes the run as long as
# the budget and its cases depend on the machine's speed. The run is derandomized unless a
# seed is given: set WIRECHAT_SCHEMATHESIS_SEED (and more examples) for a deeper, random run.
SCHEMATHESIS_EXAMPLES = int(os.environ.get("WIRECHAT_SCHEMATHESIS_EXAMPLES", "25"))
SCHEMATHESIS_SEED = os.environ.get("WIRECHAT_SCHEMATHESIS_SEED")
SCHEMATHESIS_TIMEOUT = int(os.environ.get("WIRECHAT_SCHEMATHESIS_TIMEOUT", "120"))

# schemathesis.toml for the run. `GET /v1/models/{model}` has no negative case (its only
# input is a non-empty string in the path, and an empty one cannot be sent), yet in the
# default mode (positive and negative) schemathesis spends 30-40 s failing to draw one while
# Hypothesis hill-climbs towards a success (every id but `echo` is a 404). Positive only.
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path = "/v1/models/{model}"
generation.mode = "positive"
"""

# Loaded by schemathesis (SCHEMATHESIS_HOOKS). JSON Schema cannot say that a named
# `tool_choice` must name one of `tools` (the server answers 400 otherwise, as OpenAI does),
# so a generated *valid* request gets the tool it names. Invalid requests are left alone.
HOOKS = """
import schemathesis
from schemathesis import GenerationMode


@schemathesis.hook
def map_case(context, case):
    meta, body = case.meta, case.body
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return case
    if not isinstance(body, dict) or not isinstance(body.get("tools"), list):
        return case
    choice = body.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    named = {
        tool["function"].get("name")
        for tool in body["tools"]
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    }
    if isinstance(name, str) and name not in named:
        body["tools"].append({"type": "function", "function": {"name": name}})
    return case
"""


def _start(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("--auth-provider", "static", *WORKFLOWS, env={"WORKER_AUTH_TOKEN": TOKEN})


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        *_, kind, name = node["$ref"].split("/")
        node = document["components"][kind][name]
    return node


# --- the document -------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    try:
        from openapi_spec_validator import validate
    except ImportError:
        pytest.skip("openapi-spec-validator is not installed: pip install openapi-spec-validator")
    document = openapi_document()
    assert document["openapi"].startswith("3.1.")
    validate(document)


def test_served_bytes_are_the_compact_document() -> None:
    assert json.dumps(openapi_document(), separators=(",", ":")).encode() == OPENAPI_JSON
    assert json.loads(OPENAPI_JSON) == openapi_document()
    assert openapi_document() is not openapi_document()  # a fresh dict: callers may mutate it
    assert wirechat.__version__ == openapi.API_VERSION


def test_document_lists_every_http_endpoint_once() -> None:
    document = openapi_document()
    assert {path: set(item) for path, item in document["paths"].items()} == PATHS
    # The aliases without /v1 are said once in the description, not listed.
    assert "without it" in document["info"]["description"]
    ids = [op["operationId"] for _, _, op in _operations(document)]
    assert len(ids) == len(set(ids))


def test_bearer_auth_everywhere_but_the_public_paths() -> None:
    document = openapi_document()
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"bearerAuth": []}]
    for path, _, operation in _operations(document):
        if path in PUBLIC:
            assert operation["security"] == [], path
            assert "401" not in operation["responses"], path
        else:
            assert "security" not in operation, path
            assert "401" in operation["responses"], path


def test_errors_use_the_envelope_and_every_response_names_its_headers() -> None:
    document = openapi_document()
    envelope = document["components"]["schemas"]["ErrorResponse"]
    assert envelope["required"] == ["error", "detail"]
    error = _resolve(document, envelope["properties"]["error"])
    assert error["required"] == ["message", "type", "param", "code"]
    assert error["properties"]["code"]["type"] == ["string", "null"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "404", "405", "413", "429", "502", "503", "504"):
        assert status in chat, status
    for path, method, operation in _operations(document):
        for status, response in operation["responses"].items():
            response = _resolve(document, response)
            headers = response["headers"]
            assert _resolve(document, headers["x-request-id"])["required"] is True
            assert "openai-processing-ms" in headers
            if status in ("429", "503"):
                assert "retry-after" in headers, (path, method, status)
            if status == "401":
                assert "www-authenticate" in headers
            if status == "405":
                assert "allow" in headers
            if not status.startswith("2"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)


def test_chat_request_schema_accepts_unknown_fields() -> None:
    schemas = openapi_document()["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert request["additionalProperties"] is True
    assert request["required"] == ["model", "messages"]
    for field in (
        "model", "messages", "stream", "stream_options", "n", "temperature", "top_p",
        "max_tokens", "max_completion_tokens", "stop", "tools", "tool_choice",
        "response_format", "seed", "user",
    ):  # fmt: skip
        assert field in request["properties"], field
    roles = {schemas[ref["$ref"].rsplit("/", 1)[1]]["properties"]["role"]["const"]
             for ref in schemas["ChatMessage"]["oneOf"]}  # fmt: skip
    assert roles >= {"system", "developer", "user", "assistant", "tool"}


def test_the_module_is_pure() -> None:
    tree = ast.parse(Path(openapi.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"__future__", "json", "typing"}


# A request body, and whether it is valid. The document and the parser must agree on each:
# what the document allows, the server accepts (no 400), and what it forbids, the server
# refuses. schemathesis finds such disagreements at random; these are the known ones.
def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **fields}


def _tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


AGREEMENT: list[tuple[str, dict[str, Any], bool]] = [
    ("minimal", _chat(), True),
    ("unknown field", _chat(frobnicate={"x": 1}), True),
    ("null is absent", _chat(n=None, stop=None, tools=None, user=None), True),
    ("integral float n", _chat(n=2.0), True),
    ("integral float max_tokens", _chat(max_tokens=5.0), True),
    ("integral float seed", _chat(seed=7.0), True),
    ("integral float top_logprobs", _chat(logprobs=True, top_logprobs=2.0), True),
    ("fractional n", _chat(n=1.5), False),
    ("fractional max_tokens", _chat(max_tokens=5.5), False),
    ("boolean n", _chat(n=True), False),
    ("n too large", _chat(n=129), False),
    ("temperature too high", _chat(temperature=2.5), False),
    ("boolean temperature", _chat(temperature=True), False),
    ("no model", {"messages": [{"role": "user", "content": "hi"}]}, False),
    ("empty model", _chat(model=""), False),
    ("no messages", _chat(messages=[]), False),
    ("unknown role", _chat(messages=[{"role": "robot", "content": "hi"}]), False),
    ("user content null", _chat(messages=[{"role": "user", "content": None}]), False),
    ("user content []", _chat(messages=[{"role": "user", "content": []}]), False),
    ("assistant content null", _chat(messages=[{"role": "assistant"}]), True),
    ("legacy function role", _chat(messages=[{"role": "function", "name": "f"}]), True),
    (
        "user image part",
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]),
        True,
    ),
    (
        "system image part",
        _chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": "u"}]}]),
        False,
    ),
    (
        "text part without text",
        _chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        False,
    ),
    ("tool without tool_call_id", _chat(messages=[{"role": "tool", "content": "r"}]), False),
    (
        "tool call arguments as an object",
        _chat(
            messages=[
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}],
                }
            ]
        ),
        True,
    ),
    (
        "tool call arguments null",
        _chat(
            messages=[
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": None}}],
                }
            ]
        ),
        False,
    ),
    ("name not a string", _chat(messages=[{"role": "user", "content": "x", "name": 1}]), False),
    ("stop of 5", _chat(stop=["a", "b", "c", "d", "e"]), False),
    ("stop of []", _chat(stop=[]), True),
    ("tool", _chat(tools=[_tool(description="d", parameters={"type": "object"})]), True),
    ("tool name pattern", _chat(tools=[_tool(name="a b")]), False),
    ("tool of another type", _chat(tools=[{"type": "custom", "function": {"name": "f"}}]), False),
    (
        "tool description and parameters null",
        _chat(tools=[_tool(description=None, parameters=None)]),
        True,
    ),
    ("tool description false", _chat(tools=[_tool(description=False)]), False),
    ("tool description 0", _chat(tools=[_tool(description=0)]), False),
    ("tool parameters false", _chat(tools=[_tool(parameters=False)]), False),
    ("tool parameters []", _chat(tools=[_tool(parameters=[])]), False),
    ("tool_choice required without tools", _chat(tool_choice="required"), False),
    ("tool_choice required", _chat(tools=[_tool()], tool_choice="required"), True),
    (
        "tool_choice named",
        _chat(tools=[_tool()], tool_choice={"type": "function", "function": {"name": "f"}}),
        True,
    ),
    (
        "tool_choice named without tools",
        _chat(tool_choice={"type": "function", "function": {"name": "f"}}),
        False,
    ),
    ("tool_choice unknown string", _chat(tool_choice="sometimes"), False),
    ("top_logprobs with logprobs", _chat(logprobs=True, top_logprobs=3), True),
    ("top_logprobs without logprobs", _chat(top_logprobs=3), False),
    ("logprobs not a boolean", _chat(logprobs="yes"), False),
    ("logprobs null", _chat(logprobs=None), True),
    ("logprobs 0", _chat(logprobs=0), False),
    (
        "max_tokens 0 beside max_completion_tokens",
        _chat(max_tokens=0, max_completion_tokens=5),
        False,
    ),
    ("max_completion_tokens 0", _chat(max_completion_tokens=0), False),
    ("seed past int64", _chat(seed=2**63), False),
    ("response_format json_schema", _chat(response_format={"type": "json_schema"}), True),
    ("response_format without type", _chat(response_format={}), False),
    ("stream_options without stream", _chat(stream_options={"include_usage": True}), True),
    ("include_usage not a boolean", _chat(stream_options={"include_usage": "x"}), False),
    ("user not a string", _chat(user=5), False),
]


@pytest.mark.parametrize(
    ("body", "valid"), [c[1:] for c in AGREEMENT], ids=[c[0] for c in AGREEMENT]
)
def test_request_schema_and_parser_agree(body: dict[str, Any], valid: bool) -> None:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema comes with openapi-spec-validator"
    )
    from wirechat.engine.errors import RequestError
    from wirechat.engine.openai import parse_chat_request

    document = openapi_document()
    root = {
        "$ref": "#/components/schemas/ChatCompletionRequest",
        "components": document["components"],
    }
    errors = [e.message for e in jsonschema.Draft202012Validator(root).iter_errors(body)]
    assert (not errors) is valid, f"the document disagrees: {errors}"
    try:
        parse_chat_request(json.dumps(body).encode())
    except RequestError as exc:
        assert not valid, f"the server refuses a request the document allows: {exc.message}"
    else:
        assert valid, "the server accepts a request the document forbids"


# --- a running server ---------------------------------------------------------------------


def test_every_path_is_served_as_documented(server_factory: ServerFactory) -> None:
    srv = _start(server_factory)
    document = openapi_document()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=srv.base_url, timeout=10) as client:
        for path, method, _ in _operations(document):
            url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
            body = BODIES.get(path)
            answer = client.request(method.upper(), url, json=body, headers=auth)
            assert answer.status_code != 404, (method, path, answer.text)
            # Existing model and workflow, valid bodies: every operation succeeds.
            assert answer.status_code == 200, (method, path, answer.status_code, answer.text)
            anonymous = client.request(method.upper(), url, json=body)
            if path in PUBLIC:
                assert anonymous.status_code == 200, (method, path, anonymous.text)
            else:
                assert anonymous.status_code == 401, (method, path, anonymous.text)
                assert anonymous.headers["www-authenticate"] == "Bearer"
                assert set(anonymous.json()) == {"error", "detail"}
        served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("application/json")
    assert served.content == OPENAPI_JSON


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    if importlib.util.find_spec("schemathesis") is None:
        pytest.skip("schemathesis is not installed: pip install schemathesis")
    srv = _start(server_factory)
    schema = tmp_path / "openapi.json"
    schema.write_bytes(OPENAPI_JSON)
    (tmp_path / "wirechat_schemathesis_hooks.py").write_text(HOOKS, encoding="utf-8")
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG, encoding="utf-8")
    argv = [
        sys.executable, "-m", "schemathesis.cli", "--no-color",
        "--config-file", str(config),
        "run", str(schema),
        "--url", srv.base_url,
        "--header", f"Authorization: Bearer {TOKEN}",
        "--checks", "all",
        "--max-examples", str(SCHEMATHESIS_EXAMPLES),
        # One worker: the same requests in the same order every run. (Several workers also
        # crash schemathesis' coverage phase on Python 3.11: ast.parse is not thread-safe.)
        "--workers", "1",
        "--request-timeout", "10",
        "--output-sanitize", "false",  # it would hide `max_tokens` (a "token") in reports
        "--continue-on-failure",
    ]  # fmt: skip
    if SCHEMATHESIS_SEED is None:
        argv += ["--generation-deterministic"]  # implies no example database
    else:
        argv += ["--seed", SCHEMATHESIS_SEED, "--generation-database", "none"]
    if httpx.get(srv.base_url + "/openapi.json", timeout=10).status_code == 404:
        # The route is not there yet: test_every_path_is_served_as_documented says so.
        argv += ["--exclude-path", "/openapi.json"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "wirechat_schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        argv,
        cwd=tmp_path,  # schemathesis keeps a cache directory in its working directory
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = SCHEMATHESIS_TIMEOUT  # several times the usual run: a slow, loaded machine
    try:
        out, _ = process.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=10)
        pytest.fail(f"schemathesis ran past {deadline}s:\n{out.decode(errors='replace')}")
    report = out.decode("utf-8", "replace")
    assert process.returncode == 0, (
        f"schemathesis ({'seed ' + SCHEMATHESIS_SEED if SCHEMATHESIS_SEED else 'deterministic'})"
        " found problems:\n" + report[max(0, report.find("FAILURES") - 40) :]
    )
    # A provider that crashes reaches the client as a documented 502: the log tells.
    assert "Traceback" not in srv.log(), srv.log()
