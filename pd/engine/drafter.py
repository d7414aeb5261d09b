"""The MTP layer's drafting for speculative decoding (DESIGN.md §11, issue 20; ``pd.engine.speculative`` verifies).

The MTP layer (its own KV layer of the pool) runs over positions ``p .. q`` of a request with the target's final
hidden states there and the token after each position, and drafts the next token from the last row; ``K > 1``
chains the layer on its own head input, one position further each time. It runs after each prompt chunk (the
last chunk's last row takes the token just sampled) and after each verify step over the verified positions
(eagerly; on the verify graphs the draft graph has run it, and ``after_graphs`` takes its draft and runs the
chain graphs). The MTP layer's KV only shapes drafts, never what is emitted: a stale entry (a prefix-cache hit,
a forked choice sharing its prompt's pages) can only lower acceptance. Chained drafts stop where a request's
reserved pages end.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from pd.attention.base import AttnInputs
from pd.engine.runner import ModelRunner
from pd.model.context import ForwardContext
from pd.model.mtp import DeepseekV3WithMTP
from pd.types import Batch, BatchMode, Req


class MTPDrafter:
    """Runs the MTP layer of ``runner``'s model for one engine and holds each running request's next drafts
    (``drafts``, host ints; an entry is dropped when its request leaves, ``release``). ``k``: drafts a step."""

    def __init__(self, runner: ModelRunner, k: int) -> None:
        if not isinstance(runner.model, DeepseekV3WithMTP):
            raise ValueError("speculative decoding with MTP needs the model built with its MTP layer")
        self.runner, self.model, self.k = runner, runner.model, k
        self.drafts: dict[Req, list[int]] = {}
        self._rounds = 0  # MTP layer forwards this step (join_collectives pads them to K)
        runner.keep_hidden = True  # extend steps keep every row's hidden state for the MTP layer

    def release(self, req: Req) -> None:
        self.drafts.pop(req, None)

    def join_collectives(self) -> None:
        """Ends a step (a verify, a prompt chunk, or none here): the ranks of an EP group run the MTP layer's
        MoE the same number of times each step, K, so a rank that drafted fewer times (or not at all) joins
        the rest with no tokens. Single-rank engines do nothing."""
        if self.runner.lockstep:
            for _ in range(self.k - self._rounds):
                self.model.mtp.idle(self.runner.low_latency_moe)
        self._rounds = 0

    @torch.inference_mode()
    def after_extend(self, batch: Batch, tokens: Sequence[int | None]) -> None:
        """Runs the MTP layer over each live request's chunk just computed (``runner.last_hidden``, the
        chunk rows in batch order) and drafts for those that sampled their first token (``tokens[i]``; on a
        prefill rank it is not appended to the request). Before the chunk's pages are shipped."""
        hidden = self.runner.last_hidden
        assert hidden is not None, "the runner keeps the extend step's hidden states"
        self.runner.last_hidden = None
        rows: list[int] = []
        segs: list[tuple[Req, int, list[int]]] = []
        drafting: list[bool] = []
        base = 0
        for req, start, end, token in zip(batch.reqs, batch.starts, batch.ends, tokens):
            ids, n = req.all_ids, end - start
            base += n
            if req.finished or not req.pages:
                continue
            if end < len(ids):  # a prompt chunk, or the first token already appended (colocated)
                after = ids[start + 1 : end + 1]
            elif token is not None:  # a prefill rank: the first token is not appended
                after = [*ids[start + 1 : end], token]
            else:
                continue
            rows += range(base - n, base)
            segs.append((req, start, after))
            drafting.append(token is not None)
        if segs:
            self._draft(segs, hidden[self.runner.ints(rows)], drafting)
        self.join_collectives()

    @torch.inference_mode()
    def after_verify(
        self, reqs: list[Req], hidden: torch.Tensor, bases: list[int], counts: list[int]
    ) -> None:
        """The MTP layer over the verified positions of each request still running, and its next drafts (they
        replace the verified ones)."""
        rows: list[int] = []
        segs: list[tuple[Req, int, list[int]]] = []
        for req in reqs:
            self.release(req)
        for req, base, c in zip(reqs, bases, counts):
            if req.finished or not req.pages:
                continue
            start = req.seq_len - 1 - c  # the position of the step's first input
            rows += range(base, base + c)
            segs.append((req, start, req.ids(start + 1, start + 1 + c)))
        if segs:
            # Decode's attention form (absorbed, causal queries), as the draft graph: the same drafts either way.
            self._draft(segs, hidden[self.runner.ints(rows)], [True] * len(segs), BatchMode.DECODE)

    @torch.inference_mode()
    def after_graphs(self, bucket: int, reqs: list[Req], first: torch.Tensor, lengths: list[int]) -> None:
        """After a verify step on the verify graphs' ``bucket``: each request still running takes the draft graph's
        draft (``first [n]``) and the ``K - 1`` chained drafts of the bucket's chain graphs, the first at its new
        last position (``lengths``: each request's length once the step's tokens are recorded)."""
        graphs = self.runner.verify_graphs
        assert graphs is not None
        live = [not r.finished and bool(r.pages) for r in reqs]
        at = [n - 1 if ok else None for n, ok in zip(lengths, live)]
        limits = [self._limit(r) for r in reqs]
        chained = (
            graphs.chain(bucket, at, limits, [r.pages for r in reqs]) if self.k > 1 else [[]] * len(reqs)
        )
        self._rounds += self.k
        for req, ok, token, more in zip(reqs, live, first.tolist(), chained):
            if ok:
                self.drafts[req] = [token, *more]
            else:
                self.drafts.pop(req, None)

    def _draft(
        self,
        segs: list[tuple[Req, int, list[int]]],
        hidden: torch.Tensor,
        drafting: list[bool],
        mode: BatchMode = BatchMode.EXTEND,
    ) -> None:
        """``segs``: (request, first position, the tokens after each position) with ``hidden`` their rows
        ``[T, H]`` in order. Stores the MTP KV at those positions (``mode``: the attention form; a prompt
        chunk's is extend's); for the requests ``drafting``, drafts ``K`` tokens from the last row, chaining
        while the next position has a reserved page."""
        starts = [s for _, s, _ in segs]
        ends = [s + len(n) for _, s, n in segs]
        reqs = [r for r, _, _ in segs]
        attn, low_latency = self.runner.attn, self.runner.low_latency_moe
        attn.prepare(AttnInputs(mode, starts, ends, [r.pages for r in reqs]))
        last = self.runner.ints(list(itertools.accumulate(e - s for s, e in zip(starts, ends)))) - 1
        ctx = ForwardContext(mode, attn, last, low_latency)
        next_ids = self.runner.ints([t for _, _, n in segs for t in n])
        positions = self.runner.ints([p for s, e in zip(starts, ends) for p in range(s, e)])
        logits, head = self.model.draft(hidden, next_ids, positions, ctx)
        self._rounds += 1
        chain = [b for b, d in enumerate(drafting) if d]
        if chain:
            pick = self.runner.ints(chain)
            self._chain(
                [reqs[b] for b in chain], head[pick], logits[pick].argmax(-1), [ends[b] for b in chain]
            )

    def _chain(self, reqs: list[Req], head: torch.Tensor, token: torch.Tensor, at: list[int]) -> None:
        """Each of ``reqs`` drafted ``token [R]`` with the MTP head state ``head [R, H]`` at the position
        before ``at`` (a chained draft's position: one after the row it follows). Stores the drafts and
        chains the MTP layer up to ``K`` of them while the next position has a reserved page."""
        attn, low_latency = self.runner.attn, self.runner.low_latency_moe
        for req in reqs:
            self.drafts[req] = []
        for step in range(self.k):
            for req, t in zip(reqs, token.tolist()):
                self.drafts[req].append(t)
            if step == self.k - 1:
                break
            keep = [i for i, (req, p) in enumerate(zip(reqs, at)) if p < self._limit(req)]
            if not keep:
                break
            reqs, at = [reqs[i] for i in keep], [at[i] for i in keep]
            pick = self.runner.ints(keep)
            head, token = head[pick], token[pick]
            attn.prepare(AttnInputs(BatchMode.DECODE, at, [p + 1 for p in at], [r.pages for r in reqs]))
            ctx = ForwardContext(
                BatchMode.DECODE, attn, self.runner.ints(list(range(len(reqs)))), low_latency
            )
            logits, head = self.model.draft(head, token, self.runner.ints(at), ctx)
            self._rounds += 1
            token = logits.argmax(-1)
            at = [p + 1 for p in at]

    def _limit(self, req: Req) -> int:
        """Positions below this have a reserved page and a rotary entry."""
        return min(len(req.pages) * self.runner.pool.layout.page_size, req.max_context_len)
