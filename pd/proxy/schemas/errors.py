"""A request model's ``ValidationError`` as pd's 400: a message naming the field and what it expects,
and the field's path as ``param`` (``messages[0].content``, ``stream_options.include_usage``).

One error is reported: an unknown field first (with its unknown siblings, outermost first), then an error of pd's own
checks or a missing field, then pydantic's first. A field with a ``description`` answers any bad value
with "'<field>' must be <description>", whatever inside it pydantic found wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from pd.proxy.schemas.table import JSON_TYPES, REFUSED, UNICODE, WRONG_TYPE, TableModel, type_name

# Errors more precise than a field's description, said as they are.
_OWN = {"missing", REFUSED, UNICODE}
_TYPE_ERRORS = {
    "string_type": "string",
    "int_type": "integer",
    "float_type": "number",
    "bool_type": "boolean",
    "list_type": "array",
    "dict_type": "object",
    "model_type": "object",
}
_BOUNDS = {  # error type -> (operator, its ctx key)
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def describe(error: ValidationError, model: type[TableModel]) -> tuple[str, str]:
    """(message, param) of ``error``, raised validating ``model``."""
    errors = error.errors(include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return _unknown(model, unknown)
    e = next((e for e in errors if e["type"] in _OWN), errors[0])
    place = _walk(model, e["loc"])
    ctx = e.get("ctx") or {}
    if "field" in ctx:  # a rule of pd.proxy.fields, checked on the object holding the field
        path = _join(place.path, ctx["field"])
        return f"'{path}' {e['msg']}", path
    if place.described is None:
        return f"'{place.path}' {_predicate(e)}", place.path
    path, description = place.described
    if e["type"] in _OWN:
        return f"'{path}' {_predicate(e)}", path
    shown = _show(e["input"]) if place.path == path and not isinstance(e["input"], list) else None
    return f"'{path}' must be {description}{f', got {shown}' if shown else ''}", path


def _unknown(model: type[TableModel], unknown: list[ErrorDetails]) -> tuple[str, str]:
    """The unknown keys of the outermost object holding one."""
    parent = min(unknown, key=lambda e: len(e["loc"]))["loc"][:-1]
    place = _walk(model, parent)
    paths = [_join(place.path, str(e["loc"][-1])) for e in unknown if e["loc"][:-1] == parent]
    where = (place.model or model).where
    names = ", ".join(f"'{p}'" for p in paths)
    return f"unknown field{'s' if len(paths) > 1 else ''} {names}: not a field of {where}", paths[0]


def _predicate(e: ErrorDetails) -> str:
    """What is wrong, said after the field's name."""
    kind, ctx, value = e["type"], e.get("ctx") or {}, e["input"]
    if kind == "missing":
        return "is required"
    if kind in (REFUSED, UNICODE):
        return e["msg"]
    if kind == WRONG_TYPE:
        return f"{e['msg']}, got {type_name(value)}"
    if kind in _TYPE_ERRORS:
        return f"must be of type {_TYPE_ERRORS[kind]}, got {type_name(value)}"
    if kind in _BOUNDS:
        operator, key = _BOUNDS[kind]
        return f"must be {operator} {ctx[key]}, got {_show(value)}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must be a non-empty array"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_show(value)}"
    return f"is invalid: {e['msg'][0].lower()}{e['msg'][1:]}"  # pydantic's own words


@dataclass(frozen=True)
class _Place:
    path: str  # in the body: "messages[0].content"
    model: type[TableModel] | None  # the object the path ends in, if it is one
    described: tuple[str, str] | None  # (path, description) of the last field, if it has a description


def _walk(model: type[TableModel], loc: tuple[int | str, ...]) -> _Place:
    """Follows a pydantic error location through the models. A name that is no field of the model at
    hand is a union member's tag, not part of the path."""
    path, described = "", None
    at: type[TableModel] | None = model
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif at is not None and part in at.json_fields:
            path = _join(path, part)
            description = at.json_fields[part].description
            described = (path, description) if description else None
            at = at.submodels.get(part)
    return _Place(path, at, described)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: Any, limit: int = 40) -> str:
    """A bad value in JSON, cut at ``limit`` characters (its type, for an array or an object)."""
    if isinstance(value, (list, dict)):
        return f"an {JSON_TYPES[type(value)]}"
    text = json.dumps(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
