"""JSON schemas the structured-output tests generate against: nested objects, enums, arrays, bounded
integers, strings with length limits, arrays of objects, anyOf. Every one is finite enough that a random
model finishes an output in a few dozen tokens."""

from __future__ import annotations


def _object(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


SCHEMAS = {
    "nested": _object(
        {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": _object(
                {
                    "street": {"type": "string", "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                ["street", "zip"],
            ),
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        },
        ["name", "age", "address"],
    ),
    "enums": _object(
        {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3, None]},
            "ok": {"type": "boolean"},
        },
        ["color", "size", "ok"],
    ),
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    "integers": _object(
        {
            "a": {"type": "integer", "minimum": 10, "maximum": 99},
            "b": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
        },
        ["a", "b"],
    ),
    "strings": _object(
        {"s": {"type": "string", "minLength": 2, "maxLength": 6}, "t": {"type": "string", "maxLength": 3}},
        ["s", "t"],
    ),
    "array_of_objects": {
        "type": "array",
        "maxItems": 3,
        "items": _object(
            {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "v": {"type": "number"}}, ["id"]
        ),
    },
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "none"}]},
}
