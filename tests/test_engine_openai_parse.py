"""Validation of ``POST /v1/chat/completions`` bodies: ``openai.parse_chat_request`` directly,
and the same bodies end to end through the engine (a 400 with the OpenAI envelope and the
right ``param``, the connection kept open, no provider call).

Specs: reference/openai-compat.md §2 (request body), §6.1 and §6.4 (errors), §9.1 item 2;
reference/reliability.md §2.7 and checklist §6 items 31-32; PROTOCOL.md §2 and §6.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from engine_peer import EnginePeer, chat_body
from hypothesis import given, settings
from hypothesis import strategies as st
from wirechat.engine import Finish, RequestError, TextDelta, Usage
from wirechat.engine.openai import ParsedChatRequest, parse_chat_request

USER = {"role": "user", "content": "hi"}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}


def parse(**fields: Any) -> ParsedChatRequest:
    return parse_chat_request(chat_body(**fields))


def rejected(body: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    error = info.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert error.message
    return error


def end_to_end(body: bytes, param: str | None) -> dict[str, Any]:
    """POST ``body``; assert a 400 with ``param`` and a connection that stays usable."""
    peer = EnginePeer()
    call = peer.post_chat(body)
    assert call is None
    reply = peer.last_reply()
    assert reply.status == 400, reply.body
    assert reply.header("content-type") == "application/json"
    assert reply.header("x-request-id")
    error = reply.error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert not peer.transport_closed()
    assert peer.completed[-1].status == 400
    # Still usable: a valid request on the same connection reaches the provider.
    assert peer.post_chat(chat_body()) is not None
    return error


# --- bodies that are not JSON, or not the JSON we accept ----------------------------------

MALFORMED = [
    b"",
    b"{",
    b"nope",
    b'{"model": "echo",}',
    b"{'model': 'echo'}",
    b"\xff\xfe\xfd",
    b'{"model": "echo", "messages": [}',
    b'{"model": "echo"} trailing',
    b'{"model": "\xff"}',
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_json_is_400(body: bytes) -> None:
    error = rejected(body)
    assert error.param is None
    end_to_end(body, None)


@pytest.mark.parametrize("body", [b"[]", b"null", b'"text"', b"42", b"true"])
def test_json_that_is_not_an_object_is_400(body: bytes) -> None:
    rejected(body)
    peer = EnginePeer()
    assert peer.post_chat(body) is None
    assert peer.last_reply().status == 400


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_non_finite_numbers_are_400(constant: str, field: str) -> None:
    body = chat_body()[:-1] + f', "{field}": {constant}}}'.encode()
    error = rejected(body)
    assert error.param in (None, field)
    peer = EnginePeer()
    assert peer.post_chat(body) is None
    assert peer.last_reply().status == 400


@pytest.mark.parametrize("constant", ["NaN", "Infinity"])
def test_nan_is_refused_anywhere_in_the_body(constant: str) -> None:
    body = chat_body()[:-1] + f', "metadata": {{"x": [{constant}]}}}}'.encode()
    rejected(body)


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_nesting_100k_deep_is_400_not_recursion_error(opening: str) -> None:
    depth = 100_000
    closing = "]" if opening == "[" else "}"
    nested = opening * depth + "1" + closing * depth
    body = chat_body()[:-1] + f', "metadata": {nested}}}'.encode()
    rejected(body)
    end_to_end(body, None)


def test_nesting_beyond_the_configured_depth_is_400() -> None:
    # PROTOCOL.md §6: JSON nesting depth is limited (default 64); a body nested far deeper
    # (but not deep enough to hit Python's recursion limit) must be refused as well.
    depth = 500
    nested = "[" * depth + "1" + "]" * depth
    body = chat_body()[:-1] + f', "metadata": {nested}}}'.encode()
    peer = EnginePeer()
    assert peer.post_chat(body) is None
    assert peer.last_reply().status == 400


@pytest.mark.parametrize("depth", [3, 63, 64, 65, 80])
@pytest.mark.parametrize("noise", ["", "[[{{" * 40])
def test_the_depth_limit_holds_exactly_whatever_brackets_the_strings_hold(
    depth: int, noise: str
) -> None:
    """The body object is level 1: ``metadata`` nested ``depth`` levels reaches depth + 1.
    Brackets inside strings only make the decoder look closer (they nest nothing)."""
    from wirechat.engine.codec import loads_json

    nested = "[" * depth + json.dumps(noise) + "]" * depth
    text = f'{{"metadata": {nested}}}'
    if depth + 1 <= 64:
        assert loads_json(text, 64) == {"metadata": json.loads(nested)}
    else:
        with pytest.raises(ValueError, match="nesting deeper than 64"):
            loads_json(text, 64)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" * 400 + ".0", "1e-400"])
def test_a_float_that_overflows_is_refused_while_parsing(number: str) -> None:
    from wirechat.engine.codec import loads_json

    if number == "1e-400":  # underflows to 0.0: finite, accepted like OpenAI does
        assert loads_json(f"[{number}]", 64) == [0.0]
    else:
        with pytest.raises(ValueError, match="finite"):
            loads_json(f"[{number}]", 64)


@pytest.mark.parametrize("field", ["n", "max_tokens", "seed", "metadata"])
def test_5000_digit_integer_is_400(field: str) -> None:
    body = chat_body()[:-1] + f', "{field}": {"9" * 5000}}}'.encode()
    rejected(body)
    peer = EnginePeer()
    assert peer.post_chat(body) is None
    assert peer.last_reply().status == 400


# --- required fields and param paths -----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"model": 5}, "model"),
        ({"model": ["echo"]}, "model"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": {"role": "user", "content": "hi"}}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages.[0]"),
        ({"messages": [{"content": "hi"}]}, "messages.[0].role"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.[0].role"),
        ({"messages": [{"role": 5, "content": "hi"}]}, "messages.[0].role"),
        ({"messages": [{"role": "User", "content": "hi"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user"}]}, "messages.[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.[0].content"),
        ({"messages": [{"role": "system"}]}, "messages.[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages.[0].content"),
        ({"messages": [{"role": "user", "content": []}]}, "messages.[0].content"),
        ({"messages": [USER, {"role": "user", "content": 1}]}, "messages.[1].content"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.[0].content.[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages.[0].content.[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.[0].content.[0].text",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": [{"type": "image_url", "image_url": "x"}]}
                ]
            },
            "messages.[0].content.[0].type",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages.[0].name"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}]},
            "messages.[0].tool_calls",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": 5},
                            }
                        ],
                    }
                ]
            },
            "messages.[0].tool_calls.[0].function.arguments",
        ),
    ],
)
def test_invalid_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    body = chat_body(**fields)
    error = rejected(body)
    assert error.param == param
    assert error.code is None or isinstance(error.code, str)
    end_to_end(body, param)


def test_missing_model_and_messages_keys_entirely() -> None:
    assert rejected(json.dumps({"messages": [USER]}).encode()).param == "model"
    assert rejected(json.dumps({"model": "echo"}).encode()).param == "messages"
    assert rejected(b"{}").param in ("model", "messages")


def test_unknown_role_message_names_the_path() -> None:
    error = rejected(chat_body(messages=[USER, USER, {"role": "robot", "content": "x"}]))
    assert error.param == "messages.[2].role"
    assert "messages.[2].role" in error.message


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant"])
def test_known_roles_are_accepted(role: str) -> None:
    parsed = parse(messages=[{"role": role, "content": "be brief"}, USER])
    assert parsed.request.messages[0].role == role
    assert parsed.request.messages[0].text == "be brief"


def test_developer_role_is_accepted_end_to_end() -> None:
    peer = EnginePeer()
    call = peer.post_chat(chat_body(messages=[{"role": "developer", "content": "terse"}, USER]))
    assert call is not None
    assert [m.role for m in call.request.messages] == ["developer", "user"]


def test_tool_and_function_messages() -> None:
    parsed = parse(
        messages=[
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4}'},
            {"role": "function", "name": "legacy", "content": None},
        ]
    )
    messages = parsed.request.messages
    assert messages[1].content is None
    assert messages[1].tool_calls[0].arguments == '{"city":"Oslo"}'
    assert messages[2].tool_call_id == "call_1"
    assert messages[3].role == "function"


# --- numeric ranges and options --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"n": -1}, "n"),
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"n": 1e300}, "n"),
        # max_tokens is checked even when max_completion_tokens (which wins) is present.
        ({"max_tokens": 0, "max_completion_tokens": 5}, "max_tokens"),
        ({"max_tokens": "10", "max_completion_tokens": 5}, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"),
        # logprobs is checked with or without top_logprobs.
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": "yes", "top_logprobs": 2}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": "yes"}, "stream_options"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ({"user": 5}, "user"),
        ({"seed": 2**63}, "seed"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_out_of_range_and_wrong_types(fields: dict[str, Any], param: str) -> None:
    body = chat_body(**fields)
    assert rejected(body).param == param
    end_to_end(body, param)


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1},
        {"n": 128},
        {"temperature": 0},
        {"temperature": 2},
        {"temperature": 0.7},
        {"top_p": 0},
        {"top_p": 1},
        {"presence_penalty": -2},
        {"frequency_penalty": 2.0},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": "END"},
        {"stop": ""},
        {"top_logprobs": 0, "logprobs": True},
        {"top_logprobs": 20, "logprobs": True},
        {"seed": -(2**63)},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        {"max_tokens": 1},
    ],
)
def test_in_range_values_are_accepted(fields: dict[str, Any]) -> None:
    parse(**fields)


@pytest.mark.parametrize("field", ["n", "max_tokens", "max_completion_tokens", "seed"])
@pytest.mark.parametrize("raw", ["1e999", "-1e999"])
def test_infinite_integer_is_400(field: str, raw: str) -> None:
    # `1e999` is valid JSON and decodes to inf: never a whole number (refused on decoding).
    body = chat_body()[:-1] + f', "{field}": {raw}}}'.encode()
    rejected(body)
    end_to_end(body, None)


def test_whole_number_floats_are_integers() -> None:
    # OpenAI types these fields as integer, and JSON Schema counts 2.0 as an integer.
    parsed = parse(n=2.0, max_tokens=5.0, seed=7.0, logprobs=True, top_logprobs=3.0)
    assert parsed.n == 2 and type(parsed.n) is int
    assert parsed.request.max_tokens == 5 and type(parsed.request.max_tokens) is int
    # Passed on to the provider as integers, as sent by a client that writes 7 as 7.
    options = parsed.request.options
    assert options["seed"] == 7 and type(options["seed"]) is int
    assert options["top_logprobs"] == 3 and type(options["top_logprobs"]) is int
    assert parse(max_completion_tokens=1.0).request.max_tokens == 1
    assert parse(seed=-9.0e18).request.options["seed"] == -9 * 10**18


def test_whole_number_floats_end_to_end() -> None:
    peer = EnginePeer()
    first = peer.chat(n=2.0, max_completion_tokens=4.0, max_tokens=9.0)
    assert first.request.max_tokens == 4 and type(first.request.max_tokens) is int
    peer.answer(
        first.stream_id,
        TextDelta(text="one"),
        Finish(usage=Usage(prompt_tokens=1, completion_tokens=1)),
    )
    second = peer.calls[-1]
    assert second.stream_id != first.stream_id  # n=2.0 is two choices
    peer.answer(
        second.stream_id,
        TextDelta(text="two"),
        Finish(usage=Usage(prompt_tokens=1, completion_tokens=1)),
    )
    reply = peer.last_reply()
    assert reply.status == 200
    assert [c["message"]["content"] for c in reply.json["choices"]] == ["one", "two"]


def test_n_is_kept_for_the_engine_and_defaults_to_one() -> None:
    assert parse().n == 1
    assert parse(n=None).n == 1
    assert parse(n=3).n == 3


def test_stop_forms() -> None:
    assert parse(stop="END").request.stop == ("END",)
    assert parse(stop=["a", "b"]).request.stop == ("a", "b")
    assert parse(stop=None).request.stop == ()


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse(max_tokens=10, max_completion_tokens=20).request.max_tokens == 20
    assert parse(max_tokens=30, max_completion_tokens=5).request.max_tokens == 5
    assert parse(max_tokens=10).request.max_tokens == 10
    assert parse(max_completion_tokens=7).request.max_tokens == 7
    assert parse(max_tokens=8, max_completion_tokens=None).request.max_tokens == 8
    assert parse().request.max_tokens is None


def test_max_completion_tokens_reaches_the_provider() -> None:
    peer = EnginePeer()
    call = peer.post_chat(chat_body(max_tokens=10, max_completion_tokens=20))
    assert call is not None and call.request.max_tokens == 20


# --- tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "function", "function": {"name": "get weather"}}], "tools.[0].function.name"),
        ([{"type": "function", "function": {"name": "a" * 65}}], "tools.[0].function.name"),
        ([{"type": "function", "function": {"name": ""}}], "tools.[0].function.name"),
        ([{"type": "function", "function": {"name": "f\u00e9"}}], "tools.[0].function.name"),
        ([{"type": "function", "function": {"name": "get.weather"}}], "tools.[0].function.name"),
        ([{"type": "function", "function": {}}], "tools.[0].function.name"),
        ([WEATHER_TOOL, {"type": "function", "function": {"name": 5}}], "tools.[1].function.name"),
        ([{"type": "function"}], "tools.[0].function"),
        (["get_weather"], "tools.[0]"),
        ({"get_weather": {}}, "tools"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            "tools.[0].function.parameters",
        ),
        # Falsy values are wrong types too, not "absent": only null is absent.
        *(
            (
                [WEATHER_TOOL, {"type": "function", "function": {"name": "f", key: value}}],
                f"tools.[1].function.{key}",
            )
            for key in ("description", "parameters")
            for value in (False, 0, [], 0.0)
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {}, "description": 1}}],
            "tools.[0].function.description",
        ),
    ],
)
def test_bad_tools_are_400(tools: Any, param: str) -> None:
    body = chat_body(tools=tools)
    assert rejected(body).param == param
    end_to_end(body, param)


def test_tool_description_and_parameters_null_or_empty_are_absent() -> None:
    for function in (
        {"name": "f", "description": None, "parameters": None},
        {"name": "f", "description": "", "parameters": {}},
    ):
        (tool,) = parse(tools=[{"type": "function", "function": function}]).request.tools
        assert (tool.description, tool.parameters) == ("", {})


def test_good_tool_names() -> None:
    names = ["get_weather", "a", "A-b_9", "x" * 64]
    tools = [{"type": "function", "function": {"name": n}} for n in names]
    parsed = parse(tools=tools)
    assert [t.name for t in parsed.request.tools] == names
    assert parsed.request.tools[0].parameters == {}


@pytest.mark.parametrize(
    "tool_choice",
    [
        {"type": "function", "function": {"name": "get_stock"}},
        {"type": "function", "function": {}},
        {"type": "function"},
        {"function": {"name": "get_weather"}},
        "sometimes",
        5,
    ],
)
def test_bad_tool_choice_is_400(tool_choice: Any) -> None:
    body = chat_body(tools=[WEATHER_TOOL], tool_choice=tool_choice)
    assert rejected(body).param == "tool_choice"
    end_to_end(body, "tool_choice")


def test_tool_choice_required_needs_tools() -> None:
    assert rejected(chat_body(tool_choice="required")).param == "tool_choice"
    assert rejected(chat_body(tool_choice={"type": "function", "function": {"name": "x"}}))


def test_tool_choice_forms() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    parsed = parse(tools=[WEATHER_TOOL], tool_choice=named)
    assert parsed.named_tool_choice and parsed.request.tool_choice == named
    parsed = parse(tools=[WEATHER_TOOL], tool_choice="auto")
    assert not parsed.named_tool_choice and parsed.request.tool_choice == "auto"
    assert parse(tools=[WEATHER_TOOL], tool_choice="required").request.tool_choice == "required"
    # "none" forbids tool calls: the tools are not offered to the model.
    assert parse(tools=[WEATHER_TOOL], tool_choice="none").request.tools == ()
    assert parse(tools=[WEATHER_TOOL]).request.tool_choice is None


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"city": "Oslo", "days": 2}, '{"city":"Oslo","days":2}'),
        ({}, "{}"),
        ('{"city": "Oslo"}', '{"city": "Oslo"}'),
        ("", ""),
    ],
)
def test_assistant_tool_call_arguments_object_becomes_a_string(
    arguments: Any, expected: str
) -> None:
    history = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        ],
    }
    parsed = parse(
        messages=[USER, history, {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    )
    (call,) = parsed.request.messages[1].tool_calls
    assert isinstance(call.arguments, str)
    assert call.arguments == expected
    if expected:
        assert json.loads(call.arguments) == (
            arguments if isinstance(arguments, dict) else json.loads(arguments)
        )


# --- leniency: unknown fields, null, stream_options, image_url ---------------------------------


def test_unknown_fields_are_accepted_and_passed_in_options() -> None:
    extra = {
        "top_k": 40,
        "min_p": 0.05,
        "chat_template_kwargs": {"enable_thinking": False},
        "reasoning_effort": "low",
        "service_tier": "auto",
        "logit_bias": {"50256": -100},
    }
    parsed = parse(
        temperature=0.2, seed=7, top_k=40, **{k: v for k, v in extra.items() if k != "top_k"}
    )
    options = parsed.request.options
    for key, value in extra.items():
        assert options[key] == value
    assert options["temperature"] == 0.2 and options["seed"] == 7
    for consumed in ("model", "messages", "stream", "n", "tools", "stop", "max_tokens"):
        assert consumed not in options


def test_unknown_fields_reach_the_provider() -> None:
    peer = EnginePeer()
    call = peer.post_chat(chat_body(top_k=40, chat_template_kwargs={"x": 1}))
    assert call is not None
    assert call.request.options["top_k"] == 40
    assert call.request.options["chat_template_kwargs"] == {"x": 1}


def test_null_is_treated_as_absent_everywhere() -> None:
    nulls = {
        key: None
        for key in (
            "stream",
            "stream_options",
            "n",
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "logprobs",
            "top_logprobs",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "seed",
            "user",
            "logit_bias",
            "metadata",
            "store",
            "top_k",
        )
    }
    parsed = parse(messages=[{"role": "user", "content": "hi", "name": None}], **nulls)
    baseline = parse()
    assert parsed == baseline
    assert parsed.request.options == {}
    assert parsed.stream is False and parsed.n == 1 and not parsed.include_usage


def test_assistant_null_fields_in_history() -> None:
    parsed = parse(
        messages=[
            USER,
            {"role": "assistant", "content": "sure", "tool_calls": None, "name": None},
            USER,
        ]
    )
    assert parsed.request.messages[1].tool_calls == ()


@pytest.mark.parametrize(
    ("fields", "stream", "include_usage"),
    [
        ({"stream_options": {"include_usage": True}}, False, False),
        ({"stream": False, "stream_options": {"include_usage": True}}, False, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
        ({"stream": True, "stream_options": {}}, True, False),
        ({"stream": True}, True, False),
        ({}, False, False),
    ],
)
def test_stream_options_are_accepted_with_or_without_stream(
    fields: dict[str, Any], stream: bool, include_usage: bool
) -> None:
    parsed = parse(**fields)
    assert parsed.stream is stream
    assert parsed.include_usage is include_usage


def test_stream_options_without_stream_end_to_end() -> None:
    peer = EnginePeer()
    call = peer.post_chat(chat_body(stream_options={"include_usage": True}))
    assert call is not None
    peer.done(call.stream_id)
    reply = peer.last_reply()
    assert reply.status == 200 and reply.header("content-type") == "application/json"
    assert reply.json["object"] == "chat.completion"


def test_image_url_as_bare_string_is_accepted() -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": "data:image/png;base64,iVBORw0K"},
        {"type": "image_url", "image_url": {"url": "https://x.example/a.png", "detail": "low"}},
    ]
    parsed = parse(messages=[{"role": "user", "content": content}])
    parts = parsed.request.messages[0].content
    assert isinstance(parts, list)
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}
    assert parts[2]["image_url"] == {"url": "https://x.example/a.png", "detail": "low"}
    assert parsed.request.messages[0].text == "what is this?"


def test_user_content_part_types() -> None:
    content = [
        {"type": "text", "text": "a"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ]
    parts = parse(messages=[{"role": "user", "content": content}]).request.messages[0].content
    assert isinstance(parts, list) and len(parts) == 3
    refusal = [{"type": "refusal", "refusal": "no"}]
    parse(messages=[USER, {"role": "assistant", "content": refusal}, USER])


def test_user_field_and_model_are_kept() -> None:
    parsed = parse(model="meta-llama/Llama-3-8B", user="u-42")
    assert parsed.request.model == "meta-llama/Llama-3-8B"
    assert parsed.request.user == "u-42"


def test_unicode_and_escapes_survive_parsing() -> None:
    text = "h\u00e9llo \u2028 \U0001f600 \\n \x00"
    parsed = parse(messages=[{"role": "user", "content": text}])
    assert parsed.request.messages[0].content == text


def test_chunked_request_body_is_parsed() -> None:
    peer = EnginePeer()
    body = chat_body(temperature=0.5)
    peer.request("POST", "/v1/chat/completions", [], [body[:1], body[1:9], body[9:]], chunked=True)
    (call,) = peer.calls
    assert call.request.options == {"temperature": 0.5}


# --- any JSON body: a parsed request or a RequestError, nothing else --------------------------


def _words(text: str) -> list[str]:
    return text.split()


_WORDS = st.sampled_from(
    _words(
        "user assistant tool system developer function text image_url auto none required"
        " refusal json_schema f"
    )
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | _WORDS
)
_KEYS = st.sampled_from(
    _words(
        "role content type text image_url tool_calls id function name arguments tool_call_id"
        " url include_usage parameters description"
    )
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    _words(
        "model messages stream stream_options n tools tool_choice stop max_tokens"
        " max_completion_tokens user temperature top_p logprobs top_logprobs seed"
        " response_format parallel_tool_calls extra"
    )
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    fields=st.dictionaries(_FIELDS, _VALUES, max_size=8),
    messages=st.lists(st.dictionaries(_KEYS, _VALUES, max_size=4), max_size=3),
)
def test_any_json_body_is_parsed_or_refused_with_a_request_error(
    fields: dict[str, Any], messages: list[dict[str, Any]]
) -> None:
    fields.setdefault("model", "m")
    if messages:
        fields["messages"] = messages
    try:
        parsed = parse_chat_request(json.dumps(fields).encode())
    except RequestError as error:
        assert error.status == 400
        assert error.param is None or isinstance(error.param, str)
    else:
        assert parsed.request.messages
        assert 1 <= parsed.n <= 128
        for message in parsed.request.messages:
            for call in message.tool_calls:
                assert isinstance(call.arguments, str)
