"""A request's ``tools`` and ``tool_choice``: their checks (``validate_tools``) and the grammar that makes the
model call a tool when the choice asks for one (``tool_call_grammar``). The output formats and their
parsing live in ``pd.proxy.tools``."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from pd.grammar.text import JSON_OPTIONS
from pd.proxy.tools import NAME, ToolParser


class ToolRequestError(ValueError):
    """A bad ``tools`` or ``tool_choice`` value; ``param`` names the field (for the error body)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    """What the request asks: ``mode`` none | auto | required; ``name`` set when one function is forced
    (mode required); ``parallel``: several calls allowed (``parallel_tool_calls``)."""

    mode: str
    name: str | None = None
    parallel: bool = True


NO_TOOLS = ToolChoice("none")  # the choice of a request without tools

_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


def validate_tools(tools: Any, tool_choice: Any) -> tuple[list[dict[str, Any]], ToolChoice]:
    """Checks ``tools`` (null or a list of ``{"type": "function", "function": {name, description?,
    parameters?, strict?}}``) and ``tool_choice`` (null, "none", "auto", "required" or ``{"type":
    "function", "function": {"name": ...}}``). Returns the tools and the choice; a null choice is "auto"
    with tools and "none" without. Raises ToolRequestError naming the field."""
    tools = [] if tools is None else tools
    if not isinstance(tools, list):
        raise ToolRequestError(f"'tools' must be an array, got {type(tools).__name__}", "tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _check_keys(tool, _TOOL_KEYS, where)
        if tool.get("type") != "function":
            raise ToolRequestError(
                f"'{where}.type' must be \"function\", got {tool.get('type')!r}", f"{where}.type"
            )
        function = tool.get("function")
        _check_keys(function, _FUNCTION_KEYS, f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolRequestError(
                f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                f"{where}.function.name",
            )
        if name in names:
            raise ToolRequestError(
                f"'{where}.function.name': function {name!r} is defined twice", f"{where}.function.name"
            )
        names.append(name)
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            value = function.get(key)
            if value is not None and not isinstance(value, kind):
                path = f"{where}.function.{key}"
                raise ToolRequestError(f"'{path}' must be of type {_JSON[kind]}", path)
    return tools, _tool_choice(tool_choice, names)


_JSON = {str: "string", dict: "object", bool: "boolean"}


def _check_keys(obj: Any, allowed: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ToolRequestError(f"'{where}' must be an object, got {type(obj).__name__}", where)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ToolRequestError(f"unknown field '{where}.{unknown[0]}'", f"{where}.{unknown[0]}")


def _tool_choice(choice: Any, names: list[str]) -> ToolChoice:
    if choice is None or (choice == "auto" and not names):
        return ToolChoice("auto" if names else "none")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise ToolRequestError("'tool_choice' is \"required\" but 'tools' is empty", "tool_choice")
        return ToolChoice(choice)
    named = (
        isinstance(choice, dict)
        and set(choice) == {"type", "function"}
        and choice["type"] == "function"
        and isinstance(choice["function"], dict)
        and set(choice["function"]) == {"name"}
        and isinstance(choice["function"]["name"], str)
    )
    if not named:
        raise ToolRequestError(
            '\'tool_choice\' must be "none", "auto", "required" or '
            f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r:.100}',
            "tool_choice",
        )
    name = choice["function"]["name"]
    if name not in names:
        raise ToolRequestError(f"'tool_choice' names function {name!r} that is not in 'tools'", "tool_choice")
    return ToolChoice("required", name)


# ------------------------------------------------------------------------------ forcing a call


def tool_call_grammar(
    parser: ToolParser,
    tools: list[dict[str, Any]],
    name: str | None = None,
    parallel: bool = True,
    token_markers: Collection[str] = (),
) -> str:
    """A Lark grammar (llguidance's dialect) for output that is only a tool-calls section: one call to
    ``name`` if given, else one (``parallel=False``) or more calls to any of ``tools`` (validated by
    ``validate_tools``), each call's arguments held to its function's ``parameters`` JSON schema (any
    object if it has none). For ``tool_choice`` "required" or a named function.

    ``token_markers``: the markers that are single tokens of the model's vocabulary (its added tokens,
    e.g. ``[m for m in parser.markers.all() if tokenizer.token_to_id(m) is not None]``). llguidance
    matches an added token only by its special-token syntax, which for a token spelled ``<...>`` (all
    markers that are tokens are) is its text, bare; other strings are Lark string literals, matched as
    text."""

    def lit(text: str) -> str:
        return text if text in token_markers else json.dumps(text, ensure_ascii=False)

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise ValueError(f"no function to call: {name!r} is not in tools" if name else "no tools to call")
    m = parser.markers
    more = ""  # further calls
    if parallel and name is None:
        more = f"({lit(parser.separator)} call)*" if parser.separator else "call*"
    lines = [
        "%llguidance {}",
        f"start: {lit(m.section_begin)} call {more} {lit(m.section_end)}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(functions))),
    ]
    for i, function in enumerate(functions):
        # No free whitespace in the arguments (as for response_format): a weak model must still finish them.
        schema = {**(function.get("parameters") or {"type": "object"}), "x-guidance": dict(JSON_OPTIONS)}
        lines.append(f"call_{i}: {parser.grammar_call(function['name'], f'args_{i}', lit)}")
        lines.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def forced_call_grammar(
    parser: ToolParser,
    tools: list[dict[str, Any]],
    choice: ToolChoice,
    token_to_id: Callable[[str], int | None],
) -> str | None:
    """The grammar a request's ``tool_choice`` puts on its output: None for "none" and "auto" (the model
    chooses), ``tool_call_grammar``'s for "required" (any of ``tools``) and a named function. Markers spelled
    ``<...>`` that ``token_to_id`` (the model's tokenizer's) knows are matched as those tokens."""
    if choice.mode != "required":
        return None
    markers = [
        m for m in parser.markers.all() if m[:1] == "<" and m[-1:] == ">" and token_to_id(m) is not None
    ]
    return tool_call_grammar(parser, tools, name=choice.name, parallel=choice.parallel, token_markers=markers)
