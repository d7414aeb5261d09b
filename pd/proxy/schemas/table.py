"""``TableModel``: a pydantic model whose fields are a table of ``pd.proxy.fields``.

A subclass declares ``table`` and, as typed pydantic fields, exactly the table's implemented fields (a
mismatch fails at import; a field whose JSON name is taken by pydantic, such as ``schema``, is declared
under another name with the JSON name as its alias). The table's other fields (``noop``, ``metadata``) are checked against their
rule and dropped before pydantic validates the rest; a key in no row is refused (``extra="forbid"``).
``null`` is the default of every field: a null value is dropped like an absent one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from pd.proxy import fields

# The error types of pd's own checks. Each message is a predicate: "'<field>' " + message.
REFUSED = "pd_refused"  # a value refused: the message says why, and is said as is
WRONG_TYPE = "pd_type"  # not the JSON type expected: "got <type>" follows
UNICODE = "pd_unicode"  # text with a lone surrogate

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def json_type_names(types: type | tuple[type, ...]) -> str:
    """``"string"``, ``"integer or number"``: JSON's names for Python types."""
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(JSON_TYPES.get(t, t.__name__) for t in ts))


def type_name(value: Any) -> str:
    """How a message names a bad value's type: Python's name, and "a boolean" (never a number here)."""
    return "a boolean" if isinstance(value, bool) else type(value).__name__


class TableModel(BaseModel):
    """A JSON object of a request whose fields are ``table``; ``where`` names the object in the message
    refusing an unknown field ("not a field of <where>")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    table: ClassVar[Mapping[str, fields.Rule]]
    where: ClassVar[str]
    implemented: ClassVar[frozenset[str]] = frozenset()  # the table's implemented fields
    # JSON name (a field's alias, else its name) -> the field: error locations use JSON names.
    json_fields: ClassVar[dict[str, FieldInfo]] = {}
    # JSON name -> the TableModel its value holds (directly or in a list or union), for error paths.
    submodels: ClassVar[dict[str, type[TableModel]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "table" not in cls.__dict__:  # a base holding shared fields
            return
        cls.implemented = frozenset(name for name, rule in cls.table.items() if rule.kind == "implemented")
        cls.json_fields = {info.alias or name: info for name, info in cls.model_fields.items()}
        if set(cls.json_fields) != cls.implemented:
            raise TypeError(
                f"{cls.__name__} declares {sorted(cls.json_fields)}, but its table implements "
                f"{sorted(cls.implemented)}"
            )
        cls.submodels = {
            name: sub for name, info in cls.json_fields.items() if (sub := _model_in(info.annotation))
        }

    @model_validator(mode="before")
    @classmethod
    def _apply_table(cls, data: Any) -> Any:
        """Drops nulls, checks and drops the fields not implemented; an unknown key is left for pydantic
        to refuse, and then no rule is checked (as the key is reported first)."""
        if not isinstance(data, dict) or (data.keys() <= cls.implemented and None not in data.values()):
            return data  # nothing to do (the common case)
        table = cls.table
        known = all(key in table for key in data)
        kept = {}
        for key, value in data.items():
            rule = table.get(key)
            if rule is None or (rule.kind == "implemented" and value is not None):
                kept[key] = value
            elif value is not None and known:
                _check(rule, key, value)
        return kept


def _check(rule: fields.Rule, key: str, value: Any) -> None:
    """Raises if ``value`` (not null) breaks a ``metadata`` or ``noop`` rule."""
    if rule.kind == "metadata":
        if isinstance(value, bool) or not isinstance(value, rule.type):
            message = "must be of type {expected}, got {got}"
            ctx = {"field": key, "expected": json_type_names(rule.type), "got": type_name(value)}
            raise PydanticCustomError(REFUSED, message, ctx)
    elif not any(_same(value, v) for v in rule.values):
        accepted = " or ".join(json.dumps(v) for v in (None, *rule.values))
        message = "is not supported by this server (accepted only as {accepted})"
        raise PydanticCustomError(REFUSED, message, {"field": key, "accepted": accepted})


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality: a number equals a number (0 == 0.0), never a boolean."""
    if isinstance(accepted, (int, float)) and not isinstance(accepted, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == accepted
    return type(value) is type(accepted) and value == accepted


def _model_in(annotation: Any) -> type[TableModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, TableModel):
        return annotation
    return next((m for arg in get_args(annotation) if (m := _model_in(arg))), None)
