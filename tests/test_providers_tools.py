"""Server-side tools: schema derivation, the registry, ``--tools`` loading and the built-ins.

Coroutines are driven with ``asyncio.run`` so the tests need no pytest plugin.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from wirechat.engine.chat import ToolSpec
from wirechat.providers import Tool, ToolError, ToolRegistry, default_tools, tool
from wirechat.providers.tools import MAX_EXPRESSION_CHARS, calculator, current_time

# --- schema derivation ---------------------------------------------------------------------


def test_scalar_parameters_and_required_follow_the_signature() -> None:
    def lookup(city: str, days: int, ratio: float = 0.5, metric: bool = True) -> str:
        """Look up the weather.

        A second paragraph that is not part of the description.
        """
        return city

    made = Tool.from_callable(lookup)
    assert made.name == "lookup"
    assert made.description == "Look up the weather."
    assert made.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "ratio": {"type": "number"},
            "metric": {"type": "boolean"},
        },
        "required": ["city", "days"],
    }


def test_containers_optional_literal_and_unsupported_annotations() -> None:
    def search(  # type: ignore[no-untyped-def]  # `untyped` is deliberate
        terms: list[str],
        tags: list,  # type: ignore[type-arg]
        filters: dict[str, int],
        meta: dict,  # type: ignore[type-arg]
        limit: int | None = None,
        mode: Literal["fast", "exact"] = "fast",
        level: Literal[1, 2, 3] = 1,
        anything: Any = None,
        unknown: set[int] | None = None,
        untyped=None,
        either: int | str = 0,
    ) -> None:
        return None

    properties = Tool.from_callable(search).parameters["properties"]
    assert properties["terms"] == {"type": "array", "items": {"type": "string"}}
    assert properties["tags"] == {"type": "array"}
    assert properties["filters"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert properties["meta"] == {"type": "object"}
    assert properties["limit"] == {"type": "integer"}
    assert properties["mode"] == {"enum": ["fast", "exact"], "type": "string"}
    assert properties["level"] == {"enum": [1, 2, 3], "type": "integer"}
    assert properties["anything"] == {}
    assert properties["unknown"] == {}
    assert properties["untyped"] == {}
    assert properties["either"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert Tool.from_callable(search).parameters["required"] == ["terms", "tags", "filters", "meta"]


def test_args_section_and_annotated_describe_parameters() -> None:
    def convert(amount: float, currency: Annotated[str, "ISO 4217 code"], *args: Any) -> float:
        """Convert money.

        Args:
            amount (float): How much money,
                in the source currency.
            currency: Overridden by Annotated.
            *args: Not a parameter of the schema.

        Returns:
            The converted amount.
        """
        return amount

    parameters = Tool.from_callable(convert).parameters
    assert parameters["properties"] == {
        "amount": {"type": "number", "description": "How much money, in the source currency."},
        "currency": {"type": "string", "description": "ISO 4217 code"},
    }
    assert Tool.from_callable(convert).description == "Convert money."


def test_description_stops_at_a_section_and_string_annotations_resolve() -> None:
    # This module uses `from __future__ import annotations`: every annotation is a string.
    def ping(host: str) -> str:
        """Ping a host
        over the network.
        Args:
            host: The host name.
        """
        return host

    made = Tool.from_callable(ping)
    assert made.description == "Ping a host over the network."
    assert made.parameters["properties"]["host"] == {
        "type": "string",
        "description": "The host name.",
    }


def test_decorator_forms_and_overrides() -> None:
    @tool
    def plain(x: int) -> int:
        """Double it."""
        return 2 * x

    @tool(name="renamed", description="Custom text.")
    def original(x: int) -> int:
        return x

    assert isinstance(plain, Tool)
    assert plain.name == "plain"
    assert plain.description == "Double it."
    assert plain(4) == 8  # still callable directly
    assert (original.name, original.description) == ("renamed", "Custom text.")
    assert original.spec == ToolSpec(
        name="renamed", description="Custom text.", parameters=original.parameters
    )
    renamed_again = Tool.from_callable(plain, name="again")
    assert (renamed_again.name, renamed_again.func) == ("again", plain.func)


def test_invalid_tools_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid tool name"):
        Tool.from_callable(lambda: None)
    with pytest.raises(ValueError, match="positional-only"):
        Tool.from_callable(lambda x, /: x, name="positional")
    with pytest.raises(TypeError):
        Tool.from_callable(42)  # type: ignore[arg-type]


# --- running -------------------------------------------------------------------------------


def test_sync_tools_run_in_a_worker_thread_and_async_tools_are_awaited() -> None:
    seen: list[str] = []

    def sync_tool(text: str) -> str:
        seen.append(threading.current_thread().name)
        return text.upper()

    async def async_tool(a: int, b: int = 2) -> int:
        await asyncio.sleep(0)
        return a * b

    class AsyncCallable:
        async def __call__(self, value: str) -> str:
            return value[::-1]

    registry = ToolRegistry([sync_tool, async_tool])
    registry.add(Tool.from_callable(AsyncCallable(), name="reverse"))

    async def main() -> list[Any]:
        return [
            await registry.run("sync_tool", {"text": "hi"}),
            await registry.run("async_tool", {"a": 3}),
            await registry.run("async_tool", {"a": 3, "b": 5.0}),  # integral float → int
            await registry.run("reverse", {"value": "abc"}),
        ]

    assert asyncio.run(main()) == ["HI", 6, 15, "cba"]
    assert seen and seen[0] != threading.main_thread().name


def test_bad_arguments_and_unknown_tools_are_tool_errors() -> None:
    registry = default_tools()

    def run(name: str, arguments: Any) -> Any:
        return asyncio.run(registry.run(name, arguments))

    with pytest.raises(ToolError, match="unknown tool 'nope'"):
        run("nope", {})
    with pytest.raises(ToolError, match="missing a required argument: 'expression'"):
        run("calculator", {})
    with pytest.raises(ToolError, match="unexpected keyword argument 'x'"):
        run("calculator", {"expression": "1", "x": 2})
    with pytest.raises(ToolError, match="'expression' must be a string, not an integer"):
        run("calculator", {"expression": 5})
    with pytest.raises(ToolError, match="must be a JSON object"):
        run("calculator", ["1 + 1"])
    with pytest.raises(ToolError, match="unexpected keyword argument"):
        run("current_time", {"zone": "UTC"})

    @tool
    def pick(mode: Literal["a", "b"], count: int | None = None) -> str:
        return f"{mode}{count}"

    registry.add(pick)
    with pytest.raises(ToolError, match="must be one of 'a', 'b'"):
        run("pick", {"mode": "c"})
    with pytest.raises(ToolError, match="'count' must be an integer, not a string"):
        run("pick", {"mode": "a", "count": "5"})
    assert run("pick", {"mode": "b", "count": None}) == "bNone"  # None passes for X | None


def test_exceptions_from_a_tool_propagate_unchanged() -> None:
    @tool
    def broken() -> None:
        raise KeyError("inner")

    @tool
    async def deliberate() -> None:
        raise ToolError("nothing to do")

    registry = ToolRegistry([broken, deliberate])
    with pytest.raises(KeyError, match="inner"):
        asyncio.run(registry.run("broken", {}))
    with pytest.raises(ToolError, match="nothing to do"):
        asyncio.run(registry.run("deliberate", {}))


def test_cancellation_propagates() -> None:
    @tool
    async def slow() -> None:
        await asyncio.sleep(60)

    async def main() -> None:
        task = asyncio.create_task(ToolRegistry([slow]).run("slow", {}))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_registry_names_specs_and_duplicates() -> None:
    registry = default_tools()
    assert registry.names() == ["calculator", "current_time"]
    assert [spec.name for spec in registry.specs()] == ["calculator", "current_time"]
    assert "calculator" in registry and len(registry) == 2
    assert registry.get("missing") is None
    calc = registry.get("calculator")
    assert calc is not None
    assert registry.add(calc) is calc  # the same tool again: no-op
    with pytest.raises(ValueError, match="already registered"):
        registry.add(Tool.from_callable(lambda expression: 0, name="calculator"))
    replacement = registry.add(Tool(name="calculator", func=lambda: 0), replace=True)
    assert registry.get("calculator") is replacement


# --- built-ins -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", 14),
        ("2 ** 10", 1024),
        ("7 / 2", 3.5),
        ("-(3)", -3),
        ("(1+2)*3", 9),
        ("6 / 3", 2),
        ("7 // 2", 3),
        ("7 % 4", 3),
        ("+5 - -5", 10),
        ("2 ** -1", 0.5),
        ("0.1 + 0.2", 0.1 + 0.2),
        ("2 ** 0.5", 2**0.5),
        ("  1_000 * 3  ", 3000),
        ("2 ** 10000 // 2 ** 9990", 1024),
        ("+".join(["1"] * 500), 500),
    ],
)
def test_calculator_results(expression: str, expected: float) -> None:
    result = calculator(expression)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "function calls"),
        ("__import__('os').system('true')", "function calls"),
        ("x + 1", "names such as 'x'"),
        ("(1).real", "attribute access"),
        ("abs(-1)", "function calls"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("1j * 2", "only numbers"),
        ("2 ^ 3", "use \\*\\* for powers"),
        ("1 < 2", "Compare is not allowed"),
        ("[1, 2]", "List is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 << 5", "LShift is not allowed"),
        ("9**9**9", "exponents are limited"),
        ("2 ** 100000", "exponents are limited"),
        ("(10**3000) ** 10", "too large"),
        ("3 ** 10000", "too large"),
        ("1e308 * 10", "not a finite number"),
        ("1e999", "not a finite number"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1 +", "invalid expression"),
        ("", "empty"),
        ("1\x00", "invalid expression"),
        ("1 + " * 300 + "1", "longer than"),
        ("-" * 999 + "1", "nested too deeply"),
        ("(" * 300 + "1" + ")" * 300, "invalid expression"),
    ],
)
def test_calculator_rejections(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        calculator(expression)


def test_calculator_length_cap_is_exact() -> None:
    ok = "1+" * ((MAX_EXPRESSION_CHARS - 1) // 2) + "1"
    assert len(ok) <= MAX_EXPRESSION_CHARS
    assert calculator(ok) == (MAX_EXPRESSION_CHARS - 1) // 2 + 1
    with pytest.raises(ToolError, match="longer than"):
        calculator("1" * (MAX_EXPRESSION_CHARS + 1))


def test_calculator_through_the_registry() -> None:
    assert asyncio.run(default_tools().run("calculator", {"expression": "2 + 3 * 4"})) == 14


def test_current_time_is_iso_8601_utc_and_close_to_now() -> None:
    text = asyncio.run(default_tools().run("current_time", {}))
    assert isinstance(text, str)
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 5
    assert datetime.fromisoformat(current_time()).tzinfo is not None


def test_builtin_specs_describe_their_parameters() -> None:
    calc, clock = default_tools().specs()
    assert calc.parameters["required"] == ["expression"]
    assert calc.parameters["properties"]["expression"]["type"] == "string"
    assert "arithmetic" in calc.description
    assert clock.parameters == {"type": "object", "properties": {}, "required": []}
    assert "ISO 8601" in clock.description


# --- loading ``--tools module:attr`` -------------------------------------------------------


@pytest.fixture
def tools_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "wirechat_test_user_tools"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            '''
            from wirechat.providers import tool

            @tool
            def shout(text: str) -> str:
                """Shout the text."""
                return text.upper()

            def whisper(text: str) -> str:
                """Whisper the text."""
                return text.lower()

            async def echo(text: str) -> str:
                return text

            TOOL_LIST = [shout, whisper]
            TOOL_DICT = {"loud": whisper, "quiet": shout}

            class Holder:
                tools = (echo,)

            def calculator(expression: str) -> str:
                return "shadowed"

            NOT_A_TOOL = 42
            MIXED = [whisper, 42]
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_load_a_tool_a_callable_and_collections(tools_module: str) -> None:
    registry = ToolRegistry()
    assert [t.name for t in registry.load(f"{tools_module}:shout")] == ["shout"]
    assert [t.name for t in registry.load(f"{tools_module}:whisper")] == ["whisper"]
    assert registry.get("whisper") is not None
    assert registry.get("whisper").description == "Whisper the text."  # type: ignore[union-attr]

    other = ToolRegistry()
    loaded = other.load(f" {tools_module}:TOOL_DICT , {tools_module}:Holder.tools ")
    assert [t.name for t in loaded] == ["loud", "quiet", "echo"]
    assert asyncio.run(other.run("loud", {"text": "HeY"})) == "hey"
    assert asyncio.run(other.run("echo", {"text": "x"})) == "x"

    listed = ToolRegistry()
    listed.load(f"{tools_module}:TOOL_LIST")
    assert listed.names() == ["shout", "whisper"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        (" , ", "empty"),
        ("no_colon", "expected module:attribute"),
        (":shout", "expected module:attribute"),
        ("{module}:", "expected module:attribute"),
        ("wirechat_no_such_module_xyz:thing", "cannot import 'wirechat_no_such_module_xyz'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:NOT_A_TOOL", "is not a tool"),
        ("{module}:MIXED", "is not a tool"),
        ("{module}:Holder", "is not a tool"),
    ],
)
def test_bad_load_specs_are_clear_value_errors(tools_module: str, spec: str, message: str) -> None:
    registry = ToolRegistry()
    with pytest.raises(ValueError, match=message):
        registry.load(spec.format(module=tools_module))
    assert registry.names() == []


def test_load_is_all_or_nothing_and_refuses_duplicates(tools_module: str) -> None:
    registry = default_tools()
    with pytest.raises(ValueError, match="cannot import"):
        registry.load(f"{tools_module}:shout,wirechat_no_such_module_xyz:x")
    with pytest.raises(ValueError, match="'calculator' already exists"):
        registry.load(f"{tools_module}:shout,{tools_module}:calculator")
    with pytest.raises(ValueError, match="'loud' already exists"):
        registry.load(f"{tools_module}:TOOL_DICT,{tools_module}:TOOL_DICT")
    assert registry.names() == ["calculator", "current_time"]
    # The same Tool object named twice is one tool, not a conflict.
    assert registry.load(f"{tools_module}:shout,{tools_module}:TOOL_LIST")
    assert registry.names() == ["calculator", "current_time", "shout", "whisper"]
