"""Structured output in the engine: one grammar matcher per request that asks for one, and each step's
token bitmask.

A request's matcher is made the first time it is needed (the step that samples its first token here, or,
on a decode rank, the admission that records the first token sampled by the prefill rank) and released
with the request's other state when it ends (``LogitsProcessor.release``, from the scheduler's ``on_end``:
finish, abort, failure, or leaving a prefill rank). Its state is a function of ``req.output_ids``: before
each use it consumes the output tokens it has not seen (``_sync``), so a matcher made late, a token
sampled on another rank, or a preempted request that recomputes its prompt all need nothing else.

Each step: ``fill`` writes one bitmask row per sampled row on the host (after the forward was launched:
the host work overlaps the device's) into a reused buffer, pinned on CUDA, and copies it to the device
without waiting (a speculative verify fills one bitmask per offset, each in a buffer of its own: the copy of
one may not have run when the host fills the next); ``pd.grammar.mask.apply_bitmask`` applies it before
sampling. After the step ``advance`` says whether the request's grammar is complete (it ends with ``stop``)
or failed (it fails, alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pd.grammar import GrammarBackend, GrammarError, GrammarSpec, Matcher
from pd.grammar.mask import ALL_ALLOWED, new_bitmask
from pd.types import Req

NO_BACKEND = "structured output is not available on this rank (its engine has no tokenizer with an EOS token)"


@dataclass
class _Entry:
    matcher: Matcher
    error: str | None = None  # why the request's output left its grammar, once it did


class GrammarMatchers:
    """The matchers of one engine's requests (by request id) over ``backend`` (None: no structured output
    here; requests asking for it are refused), for logits on ``device``."""

    def __init__(self, backend: GrammarBackend | None, device: torch.device) -> None:
        self.backend, self.device = backend, device
        self._entries: dict[Req, _Entry] = {}  # by sequence: the n choices of a request have one each
        # Per part (see ``fill``): int32 [rows, words], grown on demand; reused every step.
        self._host: list[torch.Tensor] = []

    @property
    def active(self) -> int:
        """Requests holding a matcher."""
        return len(self._entries)

    def check(self, spec: GrammarSpec) -> None:
        """Compiles ``spec`` (a cache hit when the worker compiled it already off the engine thread). Raises
        GrammarError (a ValueError) naming the problem."""
        if self.backend is None:
            raise GrammarError(NO_BACKEND)
        self.backend.compile(spec)

    def release(self, req: Req) -> None:
        """The request ended: its matcher goes. Idempotent."""
        self._entries.pop(req, None)

    def fill(
        self, reqs: Sequence[Req], drafted: Sequence[Sequence[int]] | None = None, part: int = 0
    ) -> torch.Tensor | None:
        """The bitmask of a step's sampled rows ``reqs`` on the device, int32 ``[len(reqs), words]`` (rows
        without a grammar all ones); None when no row has a grammar. The copy to the device is queued, not
        waited for; the host buffer of ``part`` is reused next step (the step's results are read back before
        that): the parts of one step (a verify's offsets) must differ.

        ``drafted[i]``: tokens row ``i`` is to be taken as having generated after its output (a speculative
        verify's drafts before this offset): the mask is the one after them, and the matcher is rolled back
        afterwards. A row whose grammar refuses one of them gets all ones: that offset is never emitted
        (acceptance stops at the refused draft, which the masked target cannot sample)."""
        rows = [(i, r) for i, r in enumerate(reqs) if r.sampling.grammar is not None]
        if not rows:
            return None
        backend = self._backend()
        host = self._buffer(part, len(reqs), backend.bitmask_words)
        host.fill_(ALL_ALLOWED)
        live: list[tuple[int, Matcher]] = []
        taken: list[tuple[Matcher, int]] = []  # drafts each matcher consumed, rolled back after the fill
        for i, req in rows:
            entry = self._sync(req)
            if entry.error is not None:  # only EOS: the request fails after this step (``advance``)
                host[i].zero_()
                for t in backend.eos_token_ids:
                    host[i, t // 32] |= _bit(t % 32)
                continue
            m, ahead = entry.matcher, drafted[i] if drafted is not None else ()
            n = 0
            while n < len(ahead) and m.accept(ahead[n]):
                n += 1
            if n:
                taken.append((m, n))
            if n == len(ahead):
                live.append((i, m))
        backend.fill_bitmasks(host, live)
        for m, n in taken:
            m.rollback(n)
        return host.to(self.device, non_blocking=True)

    def advance(self, req: Req) -> tuple[bool, str | None]:
        """After ``req`` sampled (its token in ``output_ids``): (complete, error). complete: the grammar can
        take no more text (the request ends with ``stop``); error: why the output left the grammar or the
        matcher failed (the request fails with it)."""
        entry = self._sync(req)
        return entry.matcher.finished and entry.error is None, entry.error

    def _sync(self, req: Req) -> _Entry:
        entry = self._entries.get(req)
        if entry is None:
            spec = req.sampling.grammar
            assert spec is not None, "only requests with a grammar have a matcher"
            backend = self._backend()
            entry = self._entries[req] = _Entry(backend.matcher(backend.compile(spec)))
        m = entry.matcher
        if entry.error is None:
            for position in range(m.num_tokens, len(req.output_ids)):
                token = req.output_ids[position]
                if not m.accept(token):
                    why = m.error or "not allowed by the grammar here"
                    entry.error = f"structured output failed at output token {position} (id {token}): {why}"
                    break
            else:
                if m.error is not None:
                    entry.error = f"structured output failed after {m.num_tokens} tokens: {m.error}"
        return entry

    def _backend(self) -> GrammarBackend:
        if self.backend is None:
            raise GrammarError(NO_BACKEND)
        return self.backend

    def _buffer(self, part: int, rows: int, words: int) -> torch.Tensor:
        while len(self._host) <= part:
            self._host.append(new_bitmask(8, words, pin_memory=self.device.type == "cuda"))
        if self._host[part].shape[0] < rows:
            self._host[part] = new_bitmask(rows, words, pin_memory=self.device.type == "cuda")
        return self._host[part][:rows]


def _bit(b: int) -> int:
    """Bit ``b`` of an int32 word, as the signed value torch stores (bit 31 is the sign)."""
    return (1 << b) - (1 << 32) if b == 31 else 1 << b
