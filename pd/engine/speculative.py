"""Speculative decoding with the checkpoint's MTP layer (DESIGN.md §11, issue 20).

A decode step of a request whose last token sits at position ``L - 1`` (``L`` = its length) and which holds
``d`` drafts (``0 <= d <= K``) runs the target over ``[last, draft_1 .. draft_d]`` at positions
``L - 1 .. L - 1 + d`` in one forward (every request of the batch at once; absorbed attention over the paged
cache with causal queries, as decode), verifies the drafts (``pd.engine.spec.sample_accept``: greedy rows take the
argmax, sampling rows pd's seeded sampler at each position, so the emitted tokens are the very ones plain
decoding emits; ``accept_all`` under ``--speculative-oracle``) and emits ``c = accepted + 1`` tokens, one at a
time through the engine's own postprocessing (stop tokens, stop strings, max_tokens end the request at the
token that ends it; the rest are dropped). ``num_computed`` becomes ``L + c - 1``: the KV of rejected drafts
is overwritten by a later step. On single-rank CUDA engines the step runs in the verify and draft graphs of
``pd.engine.verify_graph`` (K + 1 tokens for every request, fewer drafts padded), eagerly otherwise.

A step is ``launch``ed, ``read`` (the host waits for its counts and tokens; on the graphs the next drafts are
made here) and ``emit``ted (the engine's postprocessing). ``decode`` does the three in a row; the engine's
pipelined loop (``Engine.pipelined``) launches the next step between a step's read and its emission, on the
tokens read (``launch``'s ``ahead``), so emission and scheduling run while the GPU verifies.

Then the MTP layer (``pd.engine.drafter``) runs over positions ``L - 1 .. L + c - 2`` with the target's hidden
states there and the tokens after them, and drafts the next ``K`` tokens.

Drafts per row are clipped so the step never emits past ``max_tokens`` or the context length; logits
processing (penalties, bias, min_tokens, a grammar's mask) applies at every offset, the drafts before it
counted as generated (and consumed by the grammar, then rolled back); top logprobs come from the target's
logits at each emitted offset. Pages: the scheduler reserves ``2K - 1`` tokens beyond the request's length
(``lookahead``): the verify writes up to ``L - 1 + K``, a chain up to ``L + 2K - 2``; the pipelined loop's
engine ``K + 1`` more (a step read but not recorded moved ``L`` by up to ``K + 1``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pd.attention.base import AttnInputs
from pd.engine.drafter import MTPDrafter
from pd.engine.logits import LogitsProcessor, StepLogits
from pd.engine.runner import ModelRunner, top_logprobs
from pd.engine.spec import PAD_TOKEN, Verdict, accept_all, sample_accept
from pd.model.context import ForwardContext
from pd.sampling import SamplingTensors
from pd.speculative import SpeculativeConfig
from pd.types import Batch, BatchMode, Req, StepResult, TopLogprobs

if TYPE_CHECKING:
    from pd.engine.engine import TokenOutput


def top_logprobs_at(reqs: list[Req], logits3: torch.Tensor) -> list[list[TopLogprobs]]:
    """Each request's ``top_logprobs`` alternatives at every offset of the verify, ``[B][K + 1]``, from the
    target's logits there (``logits3 [B, K + 1, V]``, processed where the request asked for processing)."""
    width = logits3.shape[1]
    asking = [b for b, r in enumerate(reqs) if r.sampling.top_logprobs]
    tops: list[list[TopLogprobs]] = [[()] * width for _ in reqs]
    if asking:
        rows = torch.tensor(asking, dtype=torch.int64, device=logits3.device)
        full = logits3[rows].log_softmax(-1).flatten(0, 1)  # [P * (K + 1), V]
        flat = top_logprobs(full, [reqs[b] for b in asking for _ in range(width)])
        for i, b in enumerate(asking):
            tops[b] = flat[i * width : (i + 1) * width]
    return tops


def lookahead(spec: SpeculativeConfig, pipelined: bool = False) -> int:
    """Tokens beyond a request's length (as the host has recorded it) a decode step may write KV for (0 without
    speculation): its drafts and their chain, and with ``pipelined`` the K + 1 tokens of a step read but not
    recorded yet."""
    if not spec.enabled:
        return 0
    return 2 * spec.num_tokens - 1 + (spec.num_tokens + 1 if pipelined else 0)


@dataclass
class SpecStats:
    """Counters since start: verify forwards, drafts offered, drafts accepted at each offset ``[K]``, and
    how many steps emitted each count of tokens (index ``c``: ``c`` tokens, ``0 .. K + 1``)."""

    verify_forwards: int = 0
    drafted: int = 0
    accepted_at: list[int] = field(default_factory=list)
    emitted_hist: list[int] = field(default_factory=list)


Postprocess = Callable[[Batch, StepResult], list["TokenOutput"]]


@dataclass(eq=False)
class Verifying:
    """A verify step queued on the device whose results the host has not read (``MTPSpeculator.launch``).

    ``batch``: its requests, ``ends[b]`` the length request ``b`` had at launch (every token the host had read,
    postprocessed or not); ``dlens[b]``: the drafts it verifies; ``verdict``: what it emits, on the device;
    ``bucket``: the verify graphs' bucket, with ``first [n]`` the draft graph's next drafts (0: eager, with
    ``hidden [T, H]`` and each request's first row ``bases``); ``logits3 [n, K + 1, V]`` float32: the target's
    logits at each offset where a request asks for top logprobs (read with the step)."""

    batch: Batch
    dlens: list[int]
    verdict: Verdict
    bucket: int = 0
    first: torch.Tensor | None = None
    logits3: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    bases: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Verified:
    """A verify step's results on the host, before the engine postprocesses them: request ``b`` emits the first
    ``counts[b]`` of ``tokens[b]`` (with ``logprobs[b]``, ``tops[b]``), unless one of them ends it first."""

    step: Verifying
    counts: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    tops: list[list[TopLogprobs]]


class MTPSpeculator:
    """Verifies the drafts of ``drafter`` (the MTP layer's, ``pd.engine.drafter``) with the target for one engine
    (any role; each rank of an EP group for its own requests)."""

    def __init__(self, runner: ModelRunner, logits: LogitsProcessor, spec: SpeculativeConfig) -> None:
        self.drafter = MTPDrafter(runner, spec.num_tokens)
        self.runner, self.model, self.logits = runner, self.drafter.model, logits
        self.k, self.oracle = spec.num_tokens, spec.oracle
        # Called after each verify step with, per request, the drafts verified and the tokens emitted.
        self.on_verify: Callable[[list[int], list[int]], None] | None = None
        self.stats = SpecStats(accepted_at=[0] * self.k, emitted_hist=[0] * (self.k + 2))

    # ---- a decode step: launch, read, emit ----

    def decode(self, batch: Batch, postprocess: Postprocess) -> list[TokenOutput]:
        """One verify step, serially: every running request's drafts verified in one target forward, what is
        accepted emitted through ``postprocess`` (the engine's, one token offset at a time), drafts made again."""
        return self.emit(self.read(self.launch(batch)), postprocess)

    def launches(self, reqs: Sequence[Req]) -> bool:
        """Whether a decode step of ``reqs`` can be launched after a verify step whose results the host has read
        but not postprocessed (``launch``'s ``ahead``): it runs on the verify graphs, and no request has a grammar
        (its matcher must have consumed the tokens before it masks the next)."""
        graphs = self.runner.verify_graphs
        return (
            graphs is not None
            and graphs.bucket(len(reqs)) is not None
            and not any(r.sampling.grammar is not None for r in reqs)
        )

    @torch.inference_mode()
    def launch(self, batch: Batch, ahead: Verified | None = None) -> Verifying:
        """Queues the verify step of ``batch`` (and, on the graphs, the drafting after it) without reading it.
        ``ahead``: the verify step read just before, whose tokens the host has not postprocessed yet (its
        requests have ``counts`` tokens more than the host has recorded, the last of them their input here,
        and the drafts its read made); ``launches`` must hold then."""
        self.runner.copy_on_write(batch)
        reqs = batch.reqs
        rows_of = {r: b for b, r in enumerate(ahead.step.batch.reqs)} if ahead is not None else {}
        unread, lasts = [], []  # per request: tokens read but not recorded, and its last token
        for r in reqs:
            b = rows_of.get(r)
            if ahead is None or b is None:
                unread.append(0)
                lasts.append(r.token_at(r.seq_len - 1))
            else:
                unread.append(ahead.counts[b])
                lasts.append(ahead.tokens[b][ahead.counts[b] - 1])
        lengths = [r.seq_len + c for r, c in zip(reqs, unread)]
        held = [self.drafter.drafts.get(r, []) for r in reqs]
        drafted = [d[: self._room(r, len(d), c)] for r, d, c in zip(reqs, held, unread)]  # what each verifies
        dlens = [len(d) for d in drafted]
        rows = [[t, *d] for t, d in zip(lasts, drafted)]
        step = Batch(BatchMode.DECODE, reqs, [n - 1 for n in lengths], lengths)
        graphs = self.runner.verify_graphs
        bucket = (graphs.bucket(len(reqs)) if graphs is not None else None) or 0
        pages = [r.pages for r in reqs]
        self.stats.verify_forwards += 1
        if graphs is None or not bucket:  # no graphs, or more requests than the largest bucket: eager
            assert ahead is None, "only graphed verify steps are launched ahead of postprocessing"
            out, hidden, bases = self._verify_eager(reqs, rows, lengths)
            verdict, logits3 = self._accept(step, out, bases, drafted, unread)
            return Verifying(step, dlens, verdict, logits3=logits3, hidden=hidden, bases=bases)
        if all(r.sampling.greedy and not self._asks(r) for r in reqs):
            tokens, logprobs, counts, first, _ = graphs.greedy(rows, lengths, pages)  # nothing to process
            return Verifying(step, dlens, Verdict(tokens, counts, logprobs), bucket, first)
        out, _ = graphs.verify(rows, lengths, pages)
        bases = [b * (self.k + 1) for b in range(len(reqs))]
        verdict, logits3 = self._accept(step, out, bases, drafted, unread)
        first, _ = graphs.draft(bucket, verdict.tokens, verdict.counts)
        return Verifying(step, dlens, verdict, bucket, first, logits3=logits3)

    @torch.inference_mode()
    def read(self, step: Verifying) -> Verified:
        """Waits for a launched verify step and reads what it emits; on the graphs, drafts the next step's
        (each request still running takes the draft graph's draft and its chained ones) before the engine
        postprocesses the tokens: a launch may follow at once."""
        v = step.verdict
        assert v.logprobs is not None  # sample_accept, accept_all and the greedy graph give them
        counts, tokens, logprobs = v.counts.tolist(), v.tokens.tolist(), v.logprobs.tolist()
        reqs = step.batch.reqs
        none: list[list[TopLogprobs]] = [[()] * (self.k + 1) for _ in reqs]
        tops = top_logprobs_at(reqs, step.logits3) if step.logits3 is not None else none
        if step.bucket:
            assert step.first is not None
            lengths = [n + c for n, c in zip(step.batch.ends, counts)]
            self.drafter.after_graphs(step.bucket, reqs, step.first, lengths)
        return Verified(step, counts, tokens, logprobs, tops)

    @torch.inference_mode()
    def emit(self, done: Verified, postprocess: Postprocess) -> list[TokenOutput]:
        """Emits a read verify step's tokens through ``postprocess`` and counts them; eager steps draft after."""
        step = done.step
        outputs = self._emit(step.batch.reqs, done, postprocess)
        for c, d in zip(done.counts, step.dlens):
            self.stats.emitted_hist[c] += 1
            self.stats.drafted += d
            for j in range(c - 1):
                self.stats.accepted_at[j] += 1
        if self.on_verify is not None:
            self.on_verify(step.dlens, done.counts)
        if not step.bucket:
            assert step.hidden is not None
            self.drafter.after_verify(step.batch.reqs, step.hidden, step.bases, done.counts)
        self.drafter.join_collectives()
        return outputs

    @staticmethod
    def _asks(req: Req) -> bool:
        """Whether ``req`` needs more than the greedy graph gives: logits processing or top logprobs."""
        return req.sampling.needs_processing or bool(req.sampling.top_logprobs)

    def _accept(
        self, step: Batch, out: torch.Tensor, bases: list[int], drafted: list[list[int]], unread: list[int]
    ) -> tuple[Verdict, torch.Tensor | None]:
        """Acceptance of the verify's logits ``out [T, V]`` for the launched ``step`` (request ``b``'s offsets from
        row ``bases[b]``, the drafts ``drafted[b]`` it verifies, ``unread[b]`` of its tokens not recorded by the
        host yet; ``step.ends[b]`` its length with them): logits processing at each offset, then
        ``sample_accept`` (or the oracle's ``accept_all``); the verdict's counts clipped to each row's drafts +
        1. Also returns the logits per offset ``[B, K + 1, V]`` where a request asks for top logprobs (read with
        the step), else None. Nothing here waits for the device."""
        reqs = step.reqs
        k = self.k
        offsets = torch.arange(k + 1, device=self.runner.device)
        dl = self.runner.ints([len(d) for d in drafted])
        index = self.runner.ints(bases)[:, None] + torch.minimum(offsets[None, :], dl[:, None])  # [B, K + 1]
        logits3 = out[index]  # [B, K + 1, V] (a copy); offsets past a row's drafts repeat its last
        padded = [t for d in drafted for t in (*d, *[PAD_TOKEN] * (k - len(d)))]
        drafts = self.runner.ints(padded).view(len(reqs), k)
        processed = self._process(reqs, logits3, drafts, drafted, unread)
        st = SamplingTensors.build(
            [r.sampling for r in reqs], [r.seed for r in reqs], step.ends, self.runner.device
        )
        verdict = self._verdict(reqs, drafts, logits3, st)
        verdict.counts = torch.minimum(verdict.counts, dl + 1)
        if processed is not None:  # every token the processed rows emit counts for their penalties
            rows = self.runner.ints([b for b, r in enumerate(reqs) if r.sampling.needs_processing])
            self.logits.record(processed, verdict.tokens[rows], verdict.counts[rows])
        return verdict, logits3 if any(r.sampling.top_logprobs for r in reqs) else None

    def _verdict(
        self, reqs: list[Req], drafts: torch.Tensor, logits3: torch.Tensor, st: SamplingTensors
    ) -> Verdict:
        """``sample_accept``; under the oracle, ``accept_all`` for the rows without logits processing. A processed
        row is verified for real: its logits were masked and penalised after its real drafts, so the oracle's
        tokens (the argmax at each offset) could break its grammar."""
        if not self.oracle:
            return sample_accept(drafts, logits3, st)
        oracle = accept_all(logits3)
        processed = [r.sampling.needs_processing for r in reqs]
        if not any(processed):
            return oracle
        return oracle.where(self.runner.ints(processed).bool(), sample_accept(drafts, logits3, st))

    def _verify_eager(
        self, reqs: list[Req], rows: list[list[int]], lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The target over each request's ``rows[b]`` at positions ``L_b - 1 ..`` (absorbed attention, causal
        over the paged cache, as the verify graph): logits ``[T, V]`` float32, hidden ``[T, H]``, row bases."""
        starts = [n - 1 for n in lengths]
        ends = [s + len(r) for s, r in zip(starts, rows)]
        attn = self.runner.attn
        attn.prepare(AttnInputs(BatchMode.DECODE, starts, ends, [r.pages for r in reqs]))
        every = self.runner.ints(list(range(sum(len(r) for r in rows))))
        ctx = ForwardContext(BatchMode.DECODE, attn, every, self.runner.low_latency_moe)
        ids = self.runner.ints([t for r in rows for t in r])
        positions = self.runner.ints([p for s, e in zip(starts, ends) for p in range(s, e)])
        hidden = self.model.hidden(ids, positions, ctx, every)
        bases = [0, *itertools.accumulate(len(r) for r in rows[:-1])]
        return self.model.logits(hidden), hidden, bases

    def _room(self, req: Req, have: int, unread: int) -> int:
        """Drafts ``req`` (with ``unread`` tokens beyond those the host recorded) may verify this step: never
        past max_tokens or the context length."""
        left = min(req.sampling.max_tokens - len(req.output_ids), req.max_context_len - req.seq_len) - unread
        return max(0, min(have, self.k, left - 1))

    def _process(
        self,
        reqs: list[Req],
        logits3: torch.Tensor,
        drafts: torch.Tensor,
        drafted: list[list[int]],
        unread: list[int],
    ) -> StepLogits | None:
        """Logits processing (in place) of the rows that ask for it, at every offset ``j`` of the verify up to
        their drafts (``drafts [B, K]``, ``drafted`` on the host): the drafts before it count as generated
        (penalties, min_tokens) and are consumed by the grammar (its mask after them): if offset ``j`` is
        emitted at all, they were accepted; so do a row's ``unread`` tokens (read, recorded on the device, not
        yet on the host). Returns the first offset's inputs (whose penalty rows record what the step emits)."""
        proc = [b for b, r in enumerate(reqs) if r.sampling.needs_processing]
        first: StepLogits | None = None
        for j in range(self.k + 1):
            # Past a row's drafts its offsets repeat its last.
            rows = [b for b in proc if j <= len(drafted[b])]
            before = [drafted[b][:j] for b in rows]
            ahead = [unread[b] for b in rows]  # recorded on the device already: min_tokens counts them
            step = self.logits.prepare([reqs[b] for b in rows], before, ahead, part=j) if rows else None
            if step is None:
                continue
            index = self.runner.ints(rows)
            at = logits3[index, j]
            self.logits.apply(at, step, drafts[index, :j].clamp(min=0))  # past a row's drafts: never emitted
            logits3[index, j] = at
            first = step if j == 0 else first
        return first

    def _emit(self, reqs: list[Req], done: Verified, postprocess: Postprocess) -> list[TokenOutput]:
        """Each request's accepted tokens through ``postprocess``, one offset at a time (a token that ends a
        request drops the ones after it; a request that ended before is skipped)."""
        outputs: list[TokenOutput] = []
        for j in range(self.k + 1):
            live = [b for b, r in enumerate(reqs) if done.counts[b] > j and not r.finished]
            if not live:
                break
            step_reqs = [reqs[b] for b in live]
            lens = [r.seq_len for r in step_reqs]
            step = Batch(BatchMode.DECODE, step_reqs, [n - 1 for n in lens], lens)
            result = StepResult(
                [done.tokens[b][j] for b in live],
                [done.logprobs[b][j] for b in live],
                [done.tops[b][j] for b in live],
                [[] for _ in live],
                [[] for _ in live],
            )
            outputs += postprocess(step, result)
        return outputs
