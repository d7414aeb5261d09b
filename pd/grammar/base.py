"""The structured-output interface: what a backend compiles a `GrammarSpec` to (`CompiledGrammar`, shared and
cached), and the per-request state that masks each next token (`Matcher`).

Token masks are bitmasks: one int32 row of `bitmask_words = ceil(vocab_size / 32)` words per request, bit
``t % 32`` of word ``t // 32`` set when token ``t`` is allowed (the layout ``pd.grammar.mask`` applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from pd.grammar.spec import GrammarSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

    # A bitmask row as backends fill it: 1-D, int32, contiguous, in host memory.
    BitmaskRow = np.ndarray | torch.Tensor


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
