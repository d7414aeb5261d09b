"""The structured-output interface: what a request asks for (`GrammarSpec`), what a backend compiles it to
(`CompiledGrammar`, shared and cached), and the per-request state that masks each next token (`Matcher`).

Token masks are bitmasks: one int32 row of `bitmask_words = ceil(vocab_size / 32)` words per request, bit
``t % 32`` of word ``t // 32`` set when token ``t`` is allowed (the layout ``pd.grammar.mask`` applies).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "lark"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

# A bitmask row as backends fill it: 1-D, int32, contiguous, in host memory.
BitmaskRow = np.ndarray | torch.Tensor


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


class CompiledGrammar(Protocol):
    """A spec compiled for one backend's tokenizer. Immutable and shared by every request with the spec;
    it lives as long as the backend's compile cache (or a matcher made from it) holds it."""

    @property
    def spec(self) -> GrammarSpec: ...


class Matcher(Protocol):
    """One request's position in its grammar. Used by one thread at a time; lives as long as the request.

    The caller's loop: `fill_bitmask` (mask the logits, sample) then `accept` the sampled token. Once
    `finished`, only an EOS token is allowed (and accepted); `eos_allowed` says whether the output may end
    now (the grammar is complete, though it might go on, e.g. the regex ``a+`` after "a")."""

    def fill_bitmask(self, out_row: BitmaskRow) -> None:
        """Writes the allowed next tokens into ``out_row``: int32, shape ``[bitmask_words]``, contiguous,
        in host memory (a numpy array or a CPU tensor, pinned or not). Every word is overwritten."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advances past ``token_id``. False, and no change, when the grammar does not allow it here
        (after a masked sample that is a bug of the caller)."""
        ...

    def rollback(self, n: int) -> None:
        """Undoes the last ``n`` accepted tokens (0 <= n <= num_tokens; ValueError otherwise)."""
        ...

    def reset(self) -> None:
        """Back to the start of the grammar (rolls back every accepted token)."""
        ...

    @property
    def num_tokens(self) -> int:
        """Tokens accepted and not rolled back."""
        ...

    @property
    def finished(self) -> bool:
        """The grammar can take no more text: only EOS is allowed next (also true after an internal error)."""
        ...

    @property
    def eos_allowed(self) -> bool:
        """The output matches the grammar as it stands: EOS is allowed next."""
        ...

    @property
    def error(self) -> str | None:
        """Why the matcher stopped in error (e.g. a parser resource limit), else None. A matcher in error
        allows only EOS."""
        ...


class GrammarBackend(Protocol):
    """Compiles specs for one tokenizer and makes matchers. `compile` and `matcher` are thread-safe."""

    name: str

    @property
    def vocab_size(self) -> int:
        """Token ids a bitmask row covers: the model's logits width this backend was made for."""
        ...

    @property
    def bitmask_words(self) -> int:
        """int32 words per bitmask row: ceil(vocab_size / 32)."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens a matcher allows when its grammar is complete."""
        ...

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for ``spec``, from an LRU cache (equal specs: the same object) or compiled
        now (may take milliseconds to seconds: call it off the engine's step loop). Raises GrammarError."""
        ...

    def matcher(self, compiled: CompiledGrammar) -> Matcher:
        """A fresh matcher at the start of ``compiled`` (cheap: microseconds)."""
        ...

    def fill_bitmasks(self, bitmask: BitmaskRow, rows: Sequence[tuple[int, Matcher]]) -> None:
        """`fill_bitmask` for many matchers at once (in parallel where the backend can): matcher ``m`` of
        ``(i, m)`` fills ``bitmask[i]``. ``bitmask``: int32 ``[B, bitmask_words]``, contiguous, in host
        memory; rows not named are left as they are."""
        ...
