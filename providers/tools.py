"""Server-side tools the model may call: a registry, schema derivation, and two built-ins.

Rules of this module:

* A tool is plain data plus a callable (:class:`Tool`). Its JSON schema is derived once, when
  the tool is made, from the callable's signature, type hints and docstring.
* :meth:`Tool.run` (and :meth:`ToolRegistry.run`, which delegates to it) is the one place a
  tool is called. Arguments are checked against the signature and the top-level JSON types
  of the schema *before* the call, so a model's bad arguments become a :class:`ToolError`
  whose message the model can read and act on. An exception raised *inside* a tool
  propagates unchanged: the caller decides how to report it.
* Sync tools run in a daemon thread of their own so a slow tool never blocks the
  event loop; async tools are awaited. Cancellation is never caught.
* The built-in ``calculator`` never evaluates Python. It walks the AST of the expression,
  allows only numbers, arithmetic operators and parentheses, and bounds every size that
  could grow (text, nesting, exponents, integer width), so no input is a CPU or memory bomb.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import inspect
import math
import operator
import re
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin, overload

from wirechat.engine.chat import ToolSpec

__all__ = [
    "Tool",
    "ToolError",
    "ToolRegistry",
    "calculator",
    "current_time",
    "default_tools",
    "tool",
]

# OpenAI's rule for function names; holding every tool to it keeps them usable upstream.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolError(Exception):
    """A failure a tool (or the registry) reports deliberately; the message is for the model."""


def _empty_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}, "required": []}


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Tool:
    """A named callable with a JSON schema for its keyword arguments.

    Equality is identity (``eq=False``): two tools with equal fields may still wrap
    different callables, and a schema dict is not hashable anyway.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=_empty_parameters)
    func: Callable[..., Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"invalid tool name {self.name!r}: use 1 to 64 letters, digits, '_' or '-'"
            )
        if not callable(self.func):
            raise TypeError(f"tool {self.name!r}: func must be callable")
        if not isinstance(self.parameters, dict):
            raise TypeError(f"tool {self.name!r}: parameters must be a JSON schema dict")

    @property
    def spec(self) -> ToolSpec:
        """What the model is told about this tool."""
        return ToolSpec(name=self.name, description=self.description, parameters=self.parameters)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A decorated function stays directly callable (handy in tests and in other code).
        return self.func(*args, **kwargs)

    @classmethod
    def from_callable(
        cls,
        func: Callable[..., Any],
        name: str | None = None,
        description: str | None = None,
    ) -> Tool:
        """A tool for ``func``, its schema derived from the signature and type hints.

        ``name`` defaults to ``func.__name__``; ``description`` to the first paragraph of
        the docstring. Per-parameter descriptions come from a Google-style ``Args:``
        section or from ``Annotated[X, "description"]``.

        Raises:
            TypeError: ``func`` is not callable.
            ValueError: no usable name, or a parameter that cannot be passed by keyword.
        """
        if isinstance(func, Tool):
            return dataclasses.replace(
                func,
                name=func.name if name is None else name,
                description=func.description if description is None else description,
            )
        if not callable(func):
            raise TypeError(f"a tool needs a callable, not {type(func).__name__}")
        tool_name = name if name is not None else getattr(func, "__name__", None)
        if not isinstance(tool_name, str):
            raise ValueError(f"{func!r} has no __name__; pass name=...")
        # A partial's own docstring describes functools.partial; the wrapped one is meant.
        documented = func.func if isinstance(func, functools.partial) else func
        summary, arg_docs = _parse_docstring(inspect.getdoc(documented) or "")
        return cls(
            name=tool_name,
            description=summary if description is None else description,
            parameters=_parameters_schema(tool_name, func, arg_docs),
            func=func,
        )

    async def run(self, arguments: Mapping[str, Any]) -> Any:
        """Check ``arguments``, then call the tool with them as keyword arguments.

        Raises:
            ToolError: the arguments do not fit the signature or the schema.
            Exception: whatever the tool itself raises, unchanged.
        """
        kwargs = self._checked_arguments(arguments)
        if _is_async(self.func):
            return await self.func(**kwargs)
        result = await _in_daemon_thread(self.func, kwargs)
        if inspect.isawaitable(result):
            # A sync callable that returns a coroutine (a lambda around an async function).
            result = await result
        return result

    def _checked_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(arguments, Mapping):
            raise ToolError(
                f"the arguments of tool {self.name!r} must be a JSON object, "
                f"not {_json_type_name(arguments)}"
            )
        kwargs = dict(arguments)
        if not all(isinstance(key, str) for key in kwargs):
            raise ToolError(f"the argument names of tool {self.name!r} must be strings")
        try:
            signature = inspect.signature(self.func)
        except (TypeError, ValueError):
            signature = None  # some builtins have none; the call itself will complain
        if signature is not None:
            try:
                signature.bind(**kwargs)
            except TypeError as error:
                raise ToolError(f"invalid arguments for tool {self.name!r}: {error}") from None
        properties = self.parameters.get("properties")
        if isinstance(properties, dict):
            for key, value in kwargs.items():
                schema = properties.get(key)
                if isinstance(schema, dict):
                    kwargs[key] = _check_value(self.name, key, schema, value)
        return kwargs


def _is_async(func: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    # A callable object whose __call__ is async.
    call = getattr(func, "__call__", None)  # noqa: B004 - we want the method itself
    return inspect.iscoroutinefunction(call)


# --- schema derivation ---------------------------------------------------------------------

_SCALAR_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is a subclass of int
    (str, "string"),
    (int, "integer"),
    (float, "number"),
)


def _parameters_schema(
    tool_name: str, func: Callable[..., Any], arg_docs: Mapping[str, str]
) -> dict[str, Any]:
    try:
        # eval_str resolves string annotations (``from __future__ import annotations``) the
        # way typing.get_type_hints does, and also works for partials and callable objects.
        signature = inspect.signature(func, eval_str=True)
    except (NameError, SyntaxError):
        # An annotation that does not resolve: keep the names, describe the types as "any".
        signature = inspect.signature(func)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise ValueError(
                f"tool {tool_name!r}: parameter {parameter.name!r} is positional-only, "
                "but tools are called with keyword arguments"
            )
        annotation = parameter.annotation
        schema = {} if annotation is parameter.empty else _schema_for(annotation)
        if parameter.name in arg_docs and "description" not in schema:
            schema["description"] = arg_docs[parameter.name]
        properties[parameter.name] = schema
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    return {"type": "object", "properties": properties, "required": required}


def _schema_for(annotation: Any) -> dict[str, Any]:
    """The JSON schema of one annotation; ``{}`` (any value) when there is no good one."""
    if annotation is None or annotation is type(None):
        return {"type": "null"}
    for python_type, json_type in _SCALAR_TYPES:
        if annotation is python_type:
            return {"type": json_type}
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is list or origin is list:
        schema: dict[str, Any] = {"type": "array"}
        items = _schema_for(args[0]) if args else {}
        if items:
            schema["items"] = items
        return schema
    if annotation is dict or origin is dict:
        schema = {"type": "object"}
        values = _schema_for(args[1]) if len(args) == 2 else {}
        if values:
            schema["additionalProperties"] = values
        return schema
    if origin is Literal:
        return _literal_schema(args)
    if origin is Union or origin is types.UnionType:
        members = [member for member in args if member is not type(None)]
        if len(members) == 1:
            # Optional[X]: the model is told about X; None is still accepted (_check_value).
            return _schema_for(members[0])
        schemas = [_schema_for(member) for member in members]
        return {"anyOf": schemas} if all(schemas) else {}
    if origin is Annotated:
        schema = _schema_for(args[0])
        notes = [note for note in args[1:] if isinstance(note, str)]
        if notes:
            schema["description"] = notes[0]
        return schema
    return {}


def _literal_schema(values: tuple[Any, ...]) -> dict[str, Any]:
    if not all(value is None or isinstance(value, str | int | float) for value in values):
        return {}  # e.g. enum members: not JSON values
    schema: dict[str, Any] = {"enum": list(values)}
    json_types = {_json_type_name(value) for value in values}
    if len(json_types) == 1:
        schema["type"] = json_types.pop()
    return schema


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    for python_type, json_type in _SCALAR_TYPES:
        if isinstance(value, python_type):
            return json_type
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _check_value(tool_name: str, key: str, schema: Mapping[str, Any], value: Any) -> Any:
    """``value`` if it fits the top level of ``schema`` (an integral float becomes an int).

    Deliberately shallow: it catches the common mistakes of models ("5" for 5, a string for
    a list) without being a JSON Schema validator. ``None`` always passes, because the
    schema of ``X | None`` is the schema of ``X``; the tool decides what ``None`` means.
    """
    if value is None:
        return value
    expected = schema.get("type")
    actual = _json_type_name(value)
    if expected == "integer" and isinstance(value, float) and value.is_integer():
        value, actual = int(value), "integer"
    fits = (
        not isinstance(expected, str)
        or expected == actual
        or (expected == "number" and actual == "integer")
    )
    if not fits:
        raise ToolError(
            f"invalid arguments for tool {tool_name!r}: {key!r} must be {_article(expected)}"
            f" {expected}, not {_article(actual)} {actual}"
        )
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(
        _json_type_name(option) == actual and option == value for option in enum
    ):
        choices = ", ".join(repr(option) for option in enum)
        raise ToolError(
            f"invalid arguments for tool {tool_name!r}: {key!r} must be one of {choices}"
        )
    return value


def _article(word: object) -> str:
    return "an" if str(word)[:1] in ("a", "e", "i", "o", "u") else "a"


_SECTION = re.compile(
    r"(Args|Arguments|Parameters|Params|Returns?|Raises|Yields?|Examples?|Notes?)\s*:\s*"
)
_ARG_SECTIONS = ("Args", "Arguments", "Parameters", "Params")
_ARG_LINE = re.compile(r"(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph (lines joined) and the ``Args:`` descriptions of a docstring."""
    lines = doc.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.fullmatch(line.strip()):
            break
        summary.append(line.strip())
    return " ".join(summary), _parse_args_section(lines)


def _parse_args_section(lines: list[str]) -> dict[str, str]:
    docs: dict[str, str] = {}
    in_section = False
    section_indent = entry_indent = -1
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        match = _SECTION.fullmatch(stripped)
        if match and (not in_section or indent <= section_indent):
            in_section = match.group(1) in _ARG_SECTIONS
            section_indent, entry_indent, current = indent, -1, None
            continue
        if not in_section or not stripped:
            continue
        if indent <= section_indent:
            in_section = False  # the section ended with a dedented line
            continue
        if entry_indent < 0:
            entry_indent = indent
        entry = _ARG_LINE.fullmatch(stripped)
        if indent == entry_indent and entry:
            current = entry.group(1).lstrip("*")
            docs[current] = entry.group(2).strip()
        elif indent > entry_indent and current is not None:
            docs[current] = f"{docs[current]} {stripped}".strip()  # a continuation line
    return docs


# --- the decorator and the registry --------------------------------------------------------


@overload
def tool(func: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    func: None = None, /, *, name: str | None = None, description: str | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a :class:`Tool` of a function: ``@tool`` or ``@tool(name=..., description=...)``."""
    if func is not None:
        return Tool.from_callable(func, name=name, description=description)

    def decorate(function: Callable[..., Any]) -> Tool:
        return Tool.from_callable(function, name=name, description=description)

    return decorate


class ToolRegistry:
    """The server tools by name, in the order they were added."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def add(self, tool_or_callable: Tool | Callable[..., Any], *, replace: bool = False) -> Tool:
        """Register a tool (a callable is made into one) and return it.

        Raises:
            ValueError: another tool already has that name (unless ``replace``), so a
                ``--tools`` module cannot silently shadow a built-in.
        """
        item = (
            tool_or_callable
            if isinstance(tool_or_callable, Tool)
            else Tool.from_callable(tool_or_callable)
        )
        existing = self._tools.get(item.name)
        if existing is not None and existing is not item and not replace:
            raise ValueError(f"a tool named {item.name!r} is already registered")
        self._tools[item.name] = item
        return item

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(item.spec for item in self._tools.values())

    async def run(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """Run the tool ``name`` with ``arguments`` (see :meth:`Tool.run`).

        Raises:
            ToolError: no such tool, or arguments that do not fit it.
        """
        item = self._tools.get(name)
        if item is None:
            known = ", ".join(self._tools) or "none"
            raise ToolError(f"unknown tool {name!r} (available: {known})")
        return await item.run(arguments)

    def load(self, spec: str) -> list[Tool]:
        """Add the tools named by ``spec``: ``module:attr`` or several, comma-separated.

        ``attr`` (dotted for nested attributes) may be a :class:`Tool`, a callable, a
        :class:`ToolRegistry`, or a list, tuple or dict of tools and callables (a dict's
        keys name its tools). Either every tool of ``spec`` is added or none is.

        Raises:
            ValueError: a malformed spec, a module that fails to import, a missing
                attribute, something that is not a tool, or a name already taken.
        """
        pieces = [piece.strip() for piece in spec.split(",")]
        if not any(pieces):
            raise ValueError("empty --tools spec: expected module:attribute")
        loaded = [item for piece in pieces if piece for item in _resolve(piece)]
        taken = dict(self._tools)
        for item in loaded:
            existing = taken.setdefault(item.name, item)
            if existing is not item:
                raise ValueError(f"tool spec {spec!r}: a tool named {item.name!r} already exists")
        for item in loaded:
            self.add(item)
        return loaded


def _resolve(piece: str) -> list[Tool]:
    module_name, colon, attr_path = piece.partition(":")
    if not colon or not module_name.strip() or not attr_path.strip():
        raise ValueError(f"bad tool spec {piece!r}: expected module:attribute, e.g. mytools:search")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:
        # Any import-time failure, not just a missing module: the CLI reports one clear line.
        raise ValueError(f"tool spec {piece!r}: cannot import {module_name!r}: {error}") from error
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"tool spec {piece!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    try:
        return _tools_of(target)
    except (TypeError, ValueError) as error:
        raise ValueError(f"tool spec {piece!r}: {error}") from error


def _tools_of(target: Any) -> list[Tool]:
    if isinstance(target, ToolRegistry):
        return list(target)
    if isinstance(target, Mapping):
        return [_as_tool(value, name=str(key)) for key, value in target.items()]
    if isinstance(target, list | tuple):
        return [_as_tool(value) for value in target]
    return [_as_tool(target)]


def _as_tool(value: Any, name: str | None = None) -> Tool:
    if isinstance(value, Tool):
        return value if name is None else dataclasses.replace(value, name=name)
    if inspect.isclass(value) or not callable(value):
        raise TypeError(
            f"{value!r} is not a tool: expected a Tool, a function, or a list/tuple/dict of them"
        )
    return Tool.from_callable(value, name=name)


# --- built-in tools (PROTOCOL.md §4) -------------------------------------------------------

MAX_EXPRESSION_CHARS = 1000
MAX_EXPONENT = 10_000
# Integers stay under ~3900 decimal digits: below CPython's 4300-digit int/str conversion
# limit, so every result serialises, and each operation on such ints takes microseconds.
MAX_INT_BITS = 13_000
# The AST walk recurses once per level. A sum of 500 terms is 500 levels deep and passes;
# a chain of 999 unary minus signs does not, which keeps clear of the recursion limit.
_MAX_DEPTH = 600
# Floats that are whole numbers come back as ints only while they are exact.
_EXACT_FLOAT_INT = 2**53

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression and return the number: numbers, + - * / and
    // (floor division), % (remainder), ** (power), unary minus and parentheses only;
    no variables or functions.

    Example: "(2 + 3) * 4 / 3". The result is an integer when it is exact.

    Args:
        expression: The arithmetic expression to evaluate, e.g. "2 + 3 * 4".
    """
    if not isinstance(expression, str):
        raise ToolError("the expression must be a string")
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        raise ToolError(f"invalid expression: {error.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        # Null bytes; nesting beyond what the parser accepts.
        raise ToolError("invalid expression") from None
    try:
        value = _evaluate(tree.body, 0)
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT_FLOAT_INT:
        return int(value)
    return value


def _evaluate(node: ast.expr, depth: int) -> int | float:
    if depth > _MAX_DEPTH:
        raise ToolError("the expression is nested too deeply")
    if isinstance(node, ast.Constant):
        # type() rather than isinstance(): True, False and subclasses are not numbers here.
        if type(node.value) in (int, float):
            return _checked(node.value)
        raise ToolError(f"only numbers are allowed, not {type(node.value).__name__} literals")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _evaluate(node.operand, depth + 1)
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp):
        function = _BINARY_OPERATORS.get(type(node.op))
        if function is None:
            raise ToolError(_refusal(node.op))
        left = _evaluate(node.left, depth + 1)
        right = _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(function(left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
    raise ToolError(_refusal(node))


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power before computing it when the result would be huge."""
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponents are limited to ±{MAX_EXPONENT}")
    # An int power has more than (bits(base) - 1) * exponent bits: refuse before paying for
    # it. What passes is at most twice MAX_INT_BITS wide, and _checked() then looks exactly.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        raise ToolError("the result is too large")


def _checked(value: Any) -> int | float:
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise ToolError("the result is too large")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        return value
    # A negative number to a fractional power is complex in Python.
    raise ToolError("the result is not a real number")


def _refusal(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"names such as {node.id!r} are not allowed; use numbers only"
    if isinstance(node, ast.Call):
        return "function calls are not allowed"
    if isinstance(node, ast.Attribute):
        return "attribute access is not allowed"
    if isinstance(node, ast.BitXor):
        return "'^' is not allowed; use ** for powers"
    return f"{type(node).__name__} is not allowed; use numbers, + - * / // % ** and parentheses"


def current_time() -> str:
    """Return the current date and time in UTC as an ISO 8601 string.

    Example: "2025-01-31T14:05:09+00:00".
    """
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_tools() -> ToolRegistry:
    """A new registry holding the built-in tools ``calculator`` and ``current_time``."""
    return ToolRegistry([calculator, current_time])


async def _in_daemon_thread(func: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run a sync tool in a daemon thread.

    Not ``asyncio.to_thread``: a tool that hangs would then hold the default executor, and
    ``asyncio.run`` waits for that executor at exit, so one stuck tool (already timed out
    and reported to the model) would keep the server from ever shutting down.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = func(**kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(
        target=work, name=f"wirechat-tool-{getattr(func, '__name__', 'tool')}", daemon=True
    ).start()
    return await future
