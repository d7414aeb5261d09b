"""Logits processing before sampling (penalties, logit bias, min_tokens, grammar masks) and the logprobs
requests ask for.

Order, per row that asks for it (``SamplingParams``): repetition penalty (transformers' rule: a seen
token's logit is divided by the penalty if positive, multiplied if not; seen = in the prompt or the
output), frequency and presence penalties (OpenAI's: ``-= frequency * count + presence * (count > 0)``
over generated tokens), logit bias, then min_tokens (EOS and ``stop_token_ids`` to -inf while fewer than
``min_tokens`` are out), and last the grammar's token mask (``pd.engine.grammar``: disallowed tokens to
-inf). Rows that ask for nothing are left as they are, and a batch where no row asks
costs nothing.

Per-request state lives on the logits' device in slot rows, so no step sends token histories from the
host: ``counts [slots, V]`` int32 (generated-token counts) and ``seen [slots, V]`` bool (prompt or output
tokens). A request takes a slot the first time it samples with a penalty (the slot is filled from its
prompt and the tokens it already has, e.g. the first token sampled on a prefill rank), every token it
samples afterwards is recorded on the device, and ``release`` (called when the request ends, from the
scheduler) gives the slot back. ``slots`` must be at least the requests that can sample in one engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pd.engine.grammar import GrammarMatchers
from pd.grammar.mask import apply_bitmask
from pd.types import LOGIT_BIAS_LIMIT, Req


@dataclass
class Penalties:
    """The rows of a step with a penalty (int64 ``[P]``), their slots, and their penalties (float32 ``[P]``)."""

    rows: torch.Tensor
    slots: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor


@dataclass
class StepLogits:
    """What one step's processing needs on the device; rows index the sampled rows of the logits."""

    penalties: Penalties | None
    bias: (
        tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    )  # rows, token ids (int64 [K]), biases (f32 [K])
    masked: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids set to -inf (min_tokens)
    bitmask: torch.Tensor | None = None  # int32 [B, words]: the grammars' allowed tokens (pd.grammar.mask)


class LogitsProcessor:
    """Penalties, bias, min_tokens and grammars for a vocabulary of ``vocab`` logits, with ``slots`` request
    states. ``grammar``: the engine's grammar matchers (None: requests with a grammar are not served)."""

    def __init__(
        self,
        vocab: int,
        slots: int,
        device: torch.device,
        eos_token_ids: frozenset[int],
        grammar: GrammarMatchers | None = None,
    ) -> None:
        self.vocab, self.device, self.eos = vocab, device, sorted(eos_token_ids)
        self.grammar = grammar
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self._free = list(range(slots - 1, -1, -1))
        self._slot: dict[Req, int] = {}  # sequence (each choice of a request its own) -> slot

    @property
    def slots_in_use(self) -> int:
        return len(self._slot)

    def release(self, req: Req) -> None:
        """The request ended: its slot and its grammar matcher (if it had them) are free again. Idempotent."""
        if self.grammar is not None:
            self.grammar.release(req)
        slot = self._slot.pop(req, None)
        if slot is not None:
            self._free.append(slot)

    def prepare(
        self,
        reqs: Sequence[Req],
        drafted: Sequence[Sequence[int]] | None = None,
        ahead: Sequence[int] | None = None,
        part: int = 0,
    ) -> StepLogits | None:
        """The device inputs for the rows ``reqs`` (one per sampled row, in order); None if no row asks.
        Called after the step's forward was launched: the grammars' bitmask is filled on the host while the
        device runs it. ``drafted[i]``: tokens row ``i`` counts as generated before the token it scores (a
        speculative verify's drafts before an offset): min_tokens counts them, grammars consume them.
        ``ahead[i]``: tokens row ``i`` sampled in a step still in flight (recorded on the device already, not
        on the host; rows without a grammar): min_tokens counts them. ``part``: which of the step's inputs these
        are (a verify prepares one per offset; see ``GrammarMatchers.fill``)."""
        if not any(r.sampling.needs_processing for r in reqs):
            return None
        bitmask = None
        if any(r.sampling.grammar is not None for r in reqs):
            if self.grammar is None:
                raise ValueError("a request with a grammar reached an engine without grammar matchers")
            bitmask = self.grammar.fill(reqs, drafted, part)
        prows, pslots, rep, freq, pres = [], [], [], [], []
        brows, bids, bvals, mrows, mids = [], [], [], [], []
        for row, req in enumerate(reqs):
            sp = req.sampling
            if sp.needs_penalties:
                prows.append(row)
                pslots.append(self._slot_of(req))
                rep.append(sp.repetition_penalty)
                freq.append(sp.frequency_penalty)
                pres.append(sp.presence_penalty)
            for token, bias in sp.logit_bias:
                if token < self.vocab:
                    brows.append(row)
                    bids.append(token)
                    bvals.append(max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, bias)))
            generated = len(req.output_ids) + (len(drafted[row]) if drafted is not None else 0)
            if generated + (ahead[row] if ahead is not None else 0) < sp.min_tokens:
                ends = {t for t in sp.stop_token_ids if t < self.vocab}
                if not sp.ignore_eos:
                    ends.update(t for t in self.eos if t < self.vocab)
                mrows += [row] * len(ends)
                mids += sorted(ends)

        def ints(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int64).to(self.device, non_blocking=True)

        def floats(v: list[float]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32).to(self.device, non_blocking=True)

        penalties = None
        if prows:
            penalties = Penalties(ints(prows), ints(pslots), floats(rep), floats(freq), floats(pres))
        return StepLogits(
            penalties,
            (ints(brows), ints(bids), floats(bvals)) if brows else None,
            (ints(mrows), ints(mids)) if mrows else None,
            bitmask,
        )

    def apply(
        self, logits: torch.Tensor, step: StepLogits, drafted: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Processes ``logits [B, V']`` float32 (V' >= vocab; columns past the vocabulary untouched) in place.
        ``drafted [B, j]`` int64: tokens each row generated after its recorded ones (a verify's drafts before
        this offset), counted and seen by the penalties as if recorded."""
        p = step.penalties
        if p is not None:
            rows = logits[p.rows, : self.vocab]  # a copy [P, vocab]
            counts = self.counts[p.slots].float()
            seen = self.seen[p.slots]
            if drafted is not None and drafted.shape[1]:
                extra = torch.zeros_like(counts).scatter_add_(
                    1, drafted[p.rows], torch.ones_like(drafted[p.rows], dtype=counts.dtype)
                )
                counts, seen = counts + extra, seen | (extra > 0)
            rep = p.repetition[:, None]
            rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
            rows -= p.frequency[:, None] * counts + p.presence[:, None] * (counts > 0).float()
            logits[p.rows, : self.vocab] = rows
        if step.bias is not None:
            rows, ids, values = step.bias
            logits.index_put_((rows, ids), values, accumulate=True)
        if step.masked is not None:
            logits[step.masked] = float("-inf")
        if step.bitmask is not None:
            apply_bitmask(logits, step.bitmask)
        return logits

    def record(
        self, step: StepLogits | None, tokens: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        """Counts the tokens just sampled for penalty rows: ``tokens [B]`` int64 (the rows of ``prepare``), or
        ``[B, n]`` with ``counts [B]``: row ``b`` emitted its first ``counts[b]`` (a speculative step's)."""
        if step is None or step.penalties is None:
            return
        p = step.penalties
        picked = tokens[p.rows]
        if picked.dim() == 1:
            picked, emitted = picked[:, None], torch.ones_like(picked[:, None], dtype=torch.bool)
        else:
            assert counts is not None, "several tokens a row need their counts"
            emitted = torch.arange(picked.shape[1], device=picked.device)[None, :] < counts[p.rows][:, None]
        slots = p.slots[:, None].expand_as(picked)
        picked = picked.clamp(min=0)
        self.counts.index_put_((slots, picked), emitted.to(torch.int32), accumulate=True)
        # seen |= emitted at (slot, token), duplicates included, without a boolean-mask index (a host sync).
        flat = (slots * self.vocab + picked).reshape(-1)
        self.seen.view(-1).view(torch.uint8).scatter_reduce_(
            0, flat, emitted.reshape(-1).to(torch.uint8), reduce="amax"
        )

    def _slot_of(self, req: Req) -> int:
        slot = self._slot.get(req)
        if slot is not None:
            return slot
        if not self._free:
            raise RuntimeError(f"no free penalty slot ({self.counts.shape[0]} are in use)")
        slot = self._free.pop()
        self._slot[req] = slot
        out = torch.tensor(req.output_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        every = torch.tensor(req.all_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        self.counts[slot].zero_()
        self.counts[slot].index_put_((out,), torch.ones_like(out, dtype=torch.int32), accumulate=True)
        self.seen[slot].zero_()
        self.seen[slot, every] = True
        return slot
