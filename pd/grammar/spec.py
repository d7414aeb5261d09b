"""What a request's output must match (`GrammarSpec`), in plain Python: the proxy, ``pd.types`` and the
wire format use it without importing torch or a grammar library."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "lark"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)


class GrammarError(ValueError):
    """A grammar spec that cannot be compiled (bad JSON schema, regex or grammar). The message names the
    problem in words a client can act on: it becomes the HTTP 400 of the request."""


def _canonical_json(value: Any, what: str) -> str:
    """``value`` (a JSON string or a JSON-able object) as compact JSON. Keys keep their order: a schema's
    property order is the order the output's properties are generated in."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{what} is not valid JSON: {e}") from None
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{what} is not JSON-serializable: {e}") from None


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match; hashable, the key of a backend's compile cache.

    kind and value:
      - ``json_object``: any JSON object; value "".
      - ``json_schema``: value is the schema as compact JSON (build it with `GrammarSpec.json_schema`).
        strict=True: a schema keyword the backend does not implement is a GrammarError; strict=False (the
        OpenAI API's default): such keywords are ignored, so the output may not satisfy them.
      - ``regex``: value is the pattern (Rust regex syntax, anchored at both ends).
      - ``choice``: value is a non-empty tuple of strings; the output is exactly one of them.
      - ``lark``: value is a grammar in the backend's Lark dialect.
    JSON is generated without free whitespace (see the backend): a JSON output is compact.
    """

    kind: GrammarKind
    value: str | tuple[str, ...] = ""
    strict: bool = False

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(
                f"unknown grammar kind {self.kind!r}, expected one of {', '.join(GRAMMAR_KINDS)}"
            )
        if self.strict and self.kind != "json_schema":
            raise GrammarError(f"strict applies to json_schema only, not to {self.kind}")
        if self.kind == "choice":
            if not isinstance(self.value, tuple) or not self.value:
                raise GrammarError("choice needs a non-empty tuple of strings")
            if not all(isinstance(c, str) for c in self.value):
                raise GrammarError(f"choice options must be strings, got {self.value!r:.200}")
        elif not isinstance(self.value, str):
            raise GrammarError(f"{self.kind} takes a string value, got {type(self.value).__name__}")
        elif self.kind == "json_object" and self.value:
            raise GrammarError("json_object takes no value")
        elif self.kind in ("regex", "lark") and not self.value:
            raise GrammarError(f"{self.kind} must not be empty")

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str, strict: bool = False) -> GrammarSpec:
        """``schema``: a JSON schema as an object or as JSON text."""
        return cls("json_schema", _canonical_json(schema, "the JSON schema"), strict)

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Iterable[str]) -> GrammarSpec:
        return cls("choice", tuple(options))

    @classmethod
    def lark(cls, grammar: str) -> GrammarSpec:
        return cls("lark", grammar)
