"""Structured output through llguidance (the Rust core of Guidance, MIT).

Why llguidance, not xgrammar (checked with llguidance 1.9.1 and xgrammar 0.2.8, on pd's tiny model):
  - Dependencies: llguidance is one abi3 wheel with no Python dependencies. xgrammar 0.2.8 requires
    transformers, torch, pydantic, apache-tvm-ffi and, on Linux x86_64, triton (pd's CPU CI has no triton).
  - Tokenizer: ``LLTokenizer`` takes the tokenizer.json text itself (pd's `Tokenizer.to_json`), with our
    EOS ids and vocabulary size; no transformers object is needed at run time.
  - Grammars: JSON schema (with an option that forbids free whitespace), regex, Lark (choices become a
    Lark alternation); a bad spec leaves the matcher in an error state naming the problem
    ("Invalid type: nonsense", "Unimplemented keys: [\"uniqueItems\"]", "regex parse error ... unclosed
    group"), raised here as GrammarError.
  - Matcher: fills an int32 bitmask row through a pointer (any host buffer, so a row of a pinned torch
    tensor), batched over threads by ``LLExecutor``; consume, validate, rollback(n), is_stopped,
    is_accepting; deep_copy of a compiled matcher (about 6 µs) starts a request.
  - Speed (2 CPU cores, tiny vocab of 1024): compiling a medium schema (nested object, enum, array with
    maxItems, bounded integer, pattern, 7 properties) about 1 ms; filling one bitmask row about 10 µs
    (median; the first steps, which build the lexer lazily, up to about 1 ms).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance as llg
import numpy as np
import torch

from pd.grammar.spec import GrammarSpec
from pd.grammar.text import error_message, grammar_text
from pd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pd.grammar.base import BitmaskRow, Matcher

COMPILE_CACHE_SIZE = 256  # compiled grammars kept (LRU)
_LOG_LEVEL = 0  # llguidance prints nothing; warnings are kept on the compiled grammar, errors raised


def _buffer_address(buf: BitmaskRow, shape: tuple[int, ...]) -> int:
    """The address of a bitmask buffer llguidance may write to, after checking it is a contiguous int32
    host buffer of ``shape``."""
    if isinstance(buf, torch.Tensor):
        ok = buf.dtype == torch.int32 and buf.device.type == "cpu" and buf.is_contiguous()
        address = buf.data_ptr()
    else:
        ok = buf.dtype == np.int32 and bool(buf.flags["C_CONTIGUOUS"]) and bool(buf.flags["WRITEABLE"])
        address = buf.ctypes.data
    if not ok or tuple(buf.shape) != shape:
        raise ValueError(f"a bitmask must be a contiguous, writable int32 host array of shape {shape}")
    return address


class LLGuidanceGrammar:
    """A compiled spec: llguidance's matcher at the start of the grammar, copied for each request (the
    template itself never advances). ``warnings``: what llguidance ignored (strict=False schemas)."""

    def __init__(self, spec: GrammarSpec, template: llg.LLMatcher) -> None:
        self.spec = spec
        self.warnings: tuple[str, ...] = tuple(template.get_grammar_warnings())
        self._template = template
        self._lock = threading.Lock()

    def new_matcher(self) -> llg.LLMatcher:
        with self._lock:
            return self._template.deep_copy()


class LLGuidanceMatcher:
    """`pd.grammar.base.Matcher` over an ``llguidance.LLMatcher``.

    Tokens the caller accepted are tracked here too: llguidance records nothing for an EOS accepted after
    the grammar has finished, so ``rollback(n)`` rolls back only what it recorded."""

    def __init__(self, matcher: llg.LLMatcher, eos_token_ids: frozenset[int], words: int) -> None:
        self._m = matcher
        self._eos = eos_token_ids
        self._words = words
        self._recorded: list[bool] = []  # per accepted token: whether llguidance recorded it

    @property
    def ll_matcher(self) -> llg.LLMatcher:
        return self._m

    def fill_bitmask(self, out_row: BitmaskRow) -> None:
        self._m.unsafe_compute_mask_ptr(_buffer_address(out_row, (self._words,)), self._words * 4)

    def accept(self, token_id: int) -> bool:
        if self._m.is_stopped():
            if token_id not in self._eos or self._m.is_error():
                return False
            self._recorded.append(False)
            return True
        # validate first: consume_token of a disallowed token would leave llguidance in an error state.
        if self._m.validate_tokens([token_id]) != 1 or not self._m.consume_token(token_id):
            return False
        self._recorded.append(True)
        return True

    def rollback(self, n: int) -> None:
        if not 0 <= n <= len(self._recorded):
            raise ValueError(f"cannot roll back {n} tokens: {len(self._recorded)} accepted")
        if n == 0:
            return
        recorded = sum(self._recorded[-n:])
        del self._recorded[-n:]
        if recorded and not self._m.rollback(recorded):
            raise RuntimeError(f"llguidance failed to roll back {recorded} tokens: {self._m.get_error()}")

    def reset(self) -> None:
        self._m.reset()
        self._recorded.clear()

    @property
    def num_tokens(self) -> int:
        return len(self._recorded)

    @property
    def finished(self) -> bool:
        return self._m.is_stopped()

    @property
    def eos_allowed(self) -> bool:
        return self._m.is_stopped() or self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class LLGuidanceBackend:
    """`pd.grammar.base.GrammarBackend` for one tokenizer. Building it converts the vocabulary (about a
    second for a 100k-token vocabulary): make one per process and keep it."""

    name = "llguidance"

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int | None = None, cache_size: int = COMPILE_CACHE_SIZE
    ) -> None:
        """vocab_size: the model's logits width (default: the tokenizer's); ids past the tokenizer's
        vocabulary (padded embedding rows) are never allowed."""
        vocab = tokenizer.vocab_size if vocab_size is None else vocab_size
        if vocab < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's ({tokenizer.vocab_size})")
        if not tokenizer.eos_token_ids:
            raise ValueError("structured output needs an EOS token: the tokenizer names none")
        self._eos = tokenizer.eos_token_ids
        self._ll_tokenizer = llg.LLTokenizer(tokenizer.to_json(), n_vocab=vocab, eos_token=sorted(self._eos))
        self._vocab_size = vocab
        self._words = (vocab + 31) // 32
        self._cache: OrderedDict[GrammarSpec, LLGuidanceGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor = llg.LLExecutor()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bitmask_words(self) -> int:
        return self._words

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        with self._lock:
            if (hit := self._cache.get(spec)) is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile(spec)  # outside the lock: llguidance drops the GIL while it compiles
        with self._lock:
            # A thread that compiled the same spec meanwhile wins: equal specs share one object.
            compiled = self._cache.setdefault(spec, compiled)
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        template = llg.LLMatcher(self._ll_tokenizer, grammar_text(spec), log_level=_LOG_LEVEL)
        if template.is_error():
            raise error_message(spec, template.get_error())
        return LLGuidanceGrammar(spec, template)

    def matcher(self, compiled: object) -> LLGuidanceMatcher:
        if not isinstance(compiled, LLGuidanceGrammar):
            raise TypeError(f"not a grammar compiled by the llguidance backend: {type(compiled).__name__}")
        return LLGuidanceMatcher(compiled.new_matcher(), self._eos, self._words)

    def fill_bitmasks(self, bitmask: BitmaskRow, rows: Sequence[tuple[int, Matcher]]) -> None:
        batch = bitmask.shape[0] if bitmask.ndim == 2 else 0
        address = _buffer_address(bitmask, (batch, self._words))
        tasks = []
        for i, m in rows:
            if not isinstance(m, LLGuidanceMatcher) or not 0 <= i < batch:
                raise ValueError(f"row {i}: expects an llguidance matcher and a row index below {batch}")
            tasks.append((m.ll_matcher, i))
        if tasks:
            self._executor.unsafe_compute_mask_ptr(tasks, address, self._words * 4, batch)
