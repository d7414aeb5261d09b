"""Structured output: grammars (JSON schema, JSON object, regex, choice, Lark) that constrain sampling.

``make_grammar_backend(name, tokenizer)`` builds a backend; each request compiles its `GrammarSpec`
(cached), gets a `Matcher`, and each step fills its bitmask row, which ``pd.grammar.mask.apply_bitmask``
applies to the logits before sampling; the sampled token is then `Matcher.accept`-ed. The proxy checks a
spec without a tokenizer with ``pd.grammar.text.validate``.

This package's top level imports no torch (the proxy imports it): the bitmask helpers are in
``pd.grammar.mask``, the backend in ``pd.grammar.llguidance``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pd.grammar.base import CompiledGrammar, GrammarBackend, Matcher
from pd.grammar.spec import GRAMMAR_KINDS, GrammarError, GrammarKind, GrammarSpec

if TYPE_CHECKING:
    from pd.tokenizer import Tokenizer

GRAMMAR_BACKENDS = ("llguidance",)

__all__ = [
    "GRAMMAR_BACKENDS",
    "GRAMMAR_KINDS",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarError",
    "GrammarKind",
    "GrammarSpec",
    "Matcher",
    "make_grammar_backend",
]


def make_grammar_backend(name: str, tokenizer: Tokenizer, vocab_size: int | None = None) -> GrammarBackend:
    """The grammar backend ``name`` (one of GRAMMAR_BACKENDS) for ``tokenizer``. vocab_size: the model's
    logits width, when larger than the tokenizer's vocabulary (padded embedding rows, never allowed)."""
    if name not in GRAMMAR_BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}, expected one of {', '.join(GRAMMAR_BACKENDS)}")
    try:
        from pd.grammar.llguidance import LLGuidanceBackend
    except ModuleNotFoundError as e:
        if e.name != "llguidance":
            raise
        raise RuntimeError(
            "the llguidance grammar backend needs the llguidance package, a dependency of pd: "
            "reinstall pd (pip install -e .) or pip install 'llguidance>=1.9.1'"
        ) from None
    return LLGuidanceBackend(tokenizer, vocab_size)
