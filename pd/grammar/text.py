"""A `GrammarSpec` as llguidance grammar text, and its check without a tokenizer (`validate`).

No torch here: the proxy checks every request's grammar with `validate` before any rank hears of it, and
the ranks compile the same text (``pd.grammar.llguidance``), so both agree on what a valid spec is.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import llguidance as llg

from pd.grammar.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON without free whitespace: whitespace_flexible=False allows no whitespace between tokens and the
# separators are exactly "," and ":". A model (random ones included) cannot run away emitting blanks, so it
# finishes its objects. Passed as overrides: a schema's own "x-guidance" options cannot turn it back on.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
JSON_OBJECT_SCHEMA = '{"type":"object"}'
MAX_ERROR_CHARS = 1000  # of a library error message, in a GrammarError


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar (its JSON form) for ``spec``. Raises GrammarError for a schema that is not
    a JSON object; other problems show when the text is compiled or validated."""
    if spec.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema(JSON_OBJECT_SCHEMA, overrides=JSON_OPTIONS)
    if spec.kind == "json_schema":
        # lenient: ignore keywords llguidance does not implement (warnings) instead of failing.
        options: JsonCompileOptions = {**JSON_OPTIONS, "lenient": not spec.strict}
        try:
            return llg.LLMatcher.grammar_from_json_schema(str(spec.value), overrides=options)
        except ValueError as e:  # only when the schema is not a JSON object
            raise GrammarError(f"invalid json_schema: {e}") from None
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(str(spec.value))
    if spec.kind == "choice":
        # Lark string literals take JSON's escapes.
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.value))
    return llg.LLMatcher.grammar_from_lark(str(spec.value))


def error_message(spec: GrammarSpec, message: str) -> GrammarError:
    """The GrammarError for llguidance's ``message`` about ``spec`` (trimmed to MAX_ERROR_CHARS)."""
    message = message.strip()
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "..."
    return GrammarError(f"invalid {spec.kind}: {message}")


def validate(spec: GrammarSpec) -> tuple[str, ...]:
    """Checks that ``spec`` compiles, without a tokenizer; returns llguidance's warnings (keywords a
    ``strict=False`` schema has that are ignored). Raises GrammarError naming the problem. Takes about as
    long as compiling (milliseconds; up to a second for huge schemas): call it off an event loop."""
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar_text(spec))
    if is_error:
        raise error_message(spec, messages[0] if messages else "rejected by the grammar library")
    return tuple(messages)
