"""CUDA graphs of a speculative decode step (issue 20), per batch bucket.

A bucket of ``bs`` requests computes ``q = K + 1`` positions per request, ``T = bs * q`` query tokens: request
``b``'s last token and its drafts at positions ``L_b - 1 .. L_b - 1 + K`` (fewer drafts: the rest of its row
is padding tokens that route to no expert and whose KV only padding queries read), padding requests on
the dummy page. One attention plan (causal, ``q`` queries per row) serves the first three graphs, planned
once per step outside them (``AttentionBackend.prepare_graph``):

- **verify**: the target over the ``T`` tokens -> float32 logits ``[T, V]`` and final hidden states ``[T, H]``;
  acceptance then runs on the verify's logits (eager: the sampler's per-row tensors, logits processing) and
  writes the tokens it emits and their count per row into the draft graph's inputs on the device;
- **draft**: the MTP layer over the same ``T`` positions with the target's hidden states and the tokens after
  them (the accepted ones; past a row's count they are rewritten by the next step), drafting each row's next
  token from the offset its acceptance ended at -> draft tokens ``[bs]`` and the MTP head's hidden ``[bs, H]``;
- **greedy**: when every request is greedy with nothing to process (no penalties, grammar or top logprobs),
  verify, greedy acceptance (drafts kept while they equal the target's argmax; under the oracle every real
  draft) and draft in one replay;
- **chain j** (``j = 1 .. K - 1``): the MTP layer once more over each row's last draft and head state, one
  position further; each has its own attention state, planned once the host has the counts.

No host sync between verify and draft; the host reads the step once, before any chain. ``capture=False``
runs the same steps on the same static buffers without capturing (CPU, tests). Single-rank engines only:
multi-rank speculation runs eager. Lifetime: ``close`` before the process group is destroyed, as
``DecodeGraphs``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from pd.attention.base import AttentionBackend, AttnInputs
from pd.engine.graph import StepGraphs
from pd.kv_cache import KVPool
from pd.model.context import ForwardContext
from pd.model.mtp import DeepseekV3WithMTP
from pd.types import BatchMode

log = logging.getLogger(__name__)


class VerifyGraphs:
    """The verify and draft graphs of ``model`` for each of ``buckets`` (requests per step) with ``k`` drafts
    per request; ``context_len`` (the longest sequence) sizes the page tables."""

    def __init__(
        self,
        model: DeepseekV3WithMTP,
        attn: AttentionBackend,
        pool: KVPool,
        buckets: Sequence[int],
        context_len: int,
        k: int,
        oracle: bool = False,
        capture: bool = True,
    ) -> None:
        self.graphs = StepGraphs(attn, capture)
        self.model, self.attn, self.q, self.oracle = model, attn, k + 1, oracle
        self.buckets = sorted(set(buckets))
        max_bs = self.buckets[-1]
        max_t = max_bs * self.q
        dev = pool.buffer.device
        # Inputs, one host-to-device copy per step: token ids, positions, real-token flags [T] each.
        self.inputs = torch.zeros(3, max_t, dtype=torch.int64, device=dev)
        self.ids, self.positions, self.real = self.inputs
        # Inputs the acceptance writes on the device: the tokens after each position [T], the count per row.
        self.next_ids = torch.zeros(max_t, dtype=torch.int64, device=dev)
        self.counts = torch.ones(max_bs, dtype=torch.int64, device=dev)
        self.rows = torch.arange(max_t, dtype=torch.int64, device=dev)
        # The last draft of each row and its MTP hidden state (the draft and greedy graphs write them, each
        # chained draft reads and rewrites them), and each chain step's positions and real-row flags.
        embed = model.model.embed_tokens.weight
        self.token = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.head = torch.zeros(max_bs, embed.shape[1], dtype=embed.dtype, device=dev)
        self.chain_in = torch.zeros(max(k - 1, 1), 2, max_bs, dtype=torch.int64, device=dev)
        self.states: dict[tuple[int, int], object] = {}  # (bucket, 0: the step's; j: chain step j's)
        max_pages = max_bs * pool.layout.pages_for(context_len + 2 * k)
        for bs in reversed(self.buckets):  # graphs keyed (bucket, step name)
            self.states[(bs, 0)] = attn.graph_state(bs, max_pages, bs * self.q, max_q_per_row=self.q)
            self._load(bs, [], [], [])
            # In this order: the draft graph reads the verify graph's hidden states.
            for name, step in (("verify", self._verify), ("draft", self._draft), ("greedy", self._greedy)):
                self.graphs.record((bs, name), functools.partial(step, bs))
            for j in range(1, k):
                self.states[(bs, j)] = attn.graph_state(bs, max_pages)
                self._load_chain(bs, j, [None] * bs, [[]] * bs)
                self.graphs.record((bs, f"chain{j}"), functools.partial(self._chain, bs, j))
        if capture:
            log.info("captured verify and draft CUDA graphs (K = %d) for batch buckets %s", k, self.buckets)

    # ---- the steps (captured as they are) ----

    def _ctx(self, bs: int, logits_rows: torch.Tensor) -> ForwardContext:
        t = bs * self.q
        return ForwardContext(BatchMode.DECODE, self.attn, logits_rows, False, self.real[:t] != 0)

    def _verify(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = bs * self.q
        rows = self.rows[:t]
        hidden = self.model.hidden(self.ids[:t], self.positions[:t], self._ctx(bs, rows), rows)
        return self.model.logits(hidden), hidden  # [T, V] float32, [T, H]

    def _draft_from(
        self, bs: int, hidden: torch.Tensor, next_ids: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = bs * self.q
        pick = self.rows[:bs] * self.q + counts - 1  # each row's last emitted offset
        logits, head = self.model.draft(hidden, next_ids, self.positions[:t], self._ctx(bs, pick))
        token = logits.argmax(-1)
        self.token[:bs].copy_(token)
        self.head[:bs].copy_(head)
        return token, head  # [bs] int64, [bs, H]

    def _chain(self, bs: int, j: int) -> tuple[torch.Tensor]:
        """Chained draft ``j``: the MTP layer over each row's last draft and its head state, one position on."""
        positions, real = self.chain_in[j - 1, :, :bs]
        ctx = ForwardContext(BatchMode.DECODE, self.attn, self.rows[:bs], False, real != 0)
        logits, head = self.model.draft(self.head[:bs], self.token[:bs], positions, ctx)
        token = logits.argmax(-1)
        self.token[:bs].copy_(token)
        self.head[:bs].copy_(head)
        return (token,)

    def _draft(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.graphs.out[(bs, "verify")][1]  # the verify graph's output buffer
        return self._draft_from(bs, hidden, self.next_ids[: bs * self.q], self.counts[:bs])

    def _greedy(self, bs: int) -> tuple[torch.Tensor, ...]:
        """Verify, greedy acceptance, draft: tokens ``[bs, q]`` (the target's argmax at each offset: a row emits
        its first ``count``), their logprobs ``[bs, q]``, counts ``[bs]``, the next draft ``[bs]``, its head."""
        t, q = bs * self.q, self.q
        logits, hidden = self._verify(bs)
        target = logits.argmax(-1)  # [T]
        logprobs = logits.gather(1, target[:, None])[:, 0] - logits.logsumexp(-1)  # no [T, V] log_softmax
        real = (self.real[:t] != 0).view(bs, q)[:, 1:]  # [bs, K]: the row's drafts (padding is not)
        kept = real if self.oracle else real & (self.ids[:t].view(bs, q)[:, 1:] == target.view(bs, q)[:, :-1])
        counts = kept.long().cumprod(1).sum(1) + 1
        token, head = self._draft_from(bs, hidden, target, counts)
        return target.view(bs, q), logprobs.view(bs, q), counts, token, head

    # ---- per step ----

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _load(self, bs: int, tokens: list[list[int]], lengths: list[int], pages: list[list[int]]) -> None:
        q = self.q
        host = np.zeros((3, self.inputs.shape[1]), dtype=np.int64)  # padding: token 0 at position 0
        for b, (row, n) in enumerate(zip(tokens, lengths)):
            real = len(row)
            host[0, b * q : b * q + real] = row
            # A padding token sits at its row's last real position: a valid rotary entry; its KV slot is
            # the planned one (the attention plan's, not this position).
            host[1, b * q : (b + 1) * q] = np.minimum(np.arange(n - 1, n - 1 + q), n - 2 + real)
            host[2, b * q : b * q + real] = 1
        self.inputs.copy_(torch.from_numpy(host), non_blocking=True)
        starts = [n - 1 for n in lengths]
        inputs = AttnInputs(BatchMode.DECODE, starts, [s + q for s in starts], pages)
        self.attn.prepare_graph(self.states[(bs, 0)], inputs)

    def _load_chain(self, bs: int, j: int, at: list[int | None], pages: list[list[int]]) -> None:
        """Chain step ``j``'s inputs for the ``bs`` rows: row ``b`` drafts at position ``at[b]`` on ``pages[b]``
        (None: a padding row, on the dummy page)."""
        host = np.zeros((2, self.chain_in.shape[2]), dtype=np.int64)
        for b, p in enumerate(at):
            if p is not None:
                host[:, b] = (p, 1)
        self.chain_in[j - 1].copy_(torch.from_numpy(host), non_blocking=True)
        starts = [p if p is not None else 0 for p in at]
        tables = [t if p is not None else [] for p, t in zip(at, pages)]  # [] goes on with the dummy page
        inputs = AttnInputs(BatchMode.DECODE, starts, [s + 1 for s in starts], tables)
        self.attn.prepare_graph(self.states[(bs, j)], inputs)

    def verify(
        self, tokens: list[list[int]], lengths: list[int], pages: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replays the verify graph for requests of lengths ``L_b`` (``lengths``), each computing ``tokens[b]``
        (its last token, then its 0..K drafts) at positions ``L_b - 1 ..``, on ``pages[b]`` (reserved up to
        the last draft's position). Returns views of the graph's outputs, valid until the next
        verify: logits ``[bs * q, V]`` float32 and hidden states ``[bs * q, H]`` (request ``b``'s offsets at rows
        ``b * q ..``)."""
        bs = self.bucket(len(tokens))
        assert bs is not None, f"no bucket holds {len(tokens)} requests"
        self._load(bs, tokens, lengths, pages)
        logits, hidden = self.graphs.replay((bs, "verify"))
        return logits, hidden

    def greedy(
        self, tokens: list[list[int]], lengths: list[int], pages: list[list[int]]
    ) -> tuple[torch.Tensor, ...]:
        """The whole step of greedy requests (arguments as ``verify``) in one replay: views, valid until the next
        step, of the emitted tokens ``[n, q]`` and logprobs ``[n, q]`` (a row's first ``count`` are emitted), the
        counts ``[n]``, the next drafts ``[n]`` and their MTP hidden states ``[n, H]``."""
        n = len(tokens)
        bs = self.bucket(n)
        assert bs is not None, f"no bucket holds {n} requests"
        self._load(bs, tokens, lengths, pages)
        return tuple(x[:n] for x in self.graphs.replay((bs, "greedy")))

    def draft(
        self, bs: int, emitted: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After ``verify`` of bucket ``bs``: ``emitted [n, q]`` int64 (the tokens acceptance emits at each
        offset; those past a row's count are not read for its draft) and ``counts [n]`` int64 (1..q), on the
        device. Replays the draft graph: the next draft ``[n]`` int64 and its MTP hidden state ``[n, H]``."""
        n = emitted.shape[0]
        self.next_ids[: n * self.q].copy_(emitted.reshape(-1).clamp(min=0))  # offsets past a count: PAD_TOKEN
        self.counts[:n].copy_(counts)
        self.counts[n:bs].fill_(1)
        token, head = self.graphs.replay((bs, "draft"))
        return token[:n], head[:n]

    def run_idle(self, bs: int) -> None:
        """Replays bucket ``bs``'s graphs with padding rows only (warm-up)."""
        self._load(bs, [], [], [])
        self.counts[:bs].fill_(1)
        for name in ("verify", "draft", "greedy"):
            self.graphs.replay((bs, name))
        for j in range(1, self.q - 1):
            self._load_chain(bs, j, [None] * bs, [[]] * bs)
            self.graphs.replay((bs, f"chain{j}"))

    def chain(
        self, bs: int, at: list[int | None], limits: list[int], pages: list[list[int]]
    ) -> list[list[int]]:
        """After a step of bucket ``bs`` (its drafts and heads in ``token`` and ``head``): the ``K - 1`` chained
        drafts of its ``n`` requests, request ``b``'s at positions ``at[b]``, ``at[b] + 1`` .. while below
        ``limits[b]`` (a reserved page and a rotary entry); ``at[b]`` None: it drafts no more (it ended).
        Each chain step is planned just before its replay (its own attention state). Returns ``[n][<= K - 1]``."""
        n = len(at)
        steps = []
        for j in range(1, self.q - 1):
            pos = [a + j - 1 if a is not None and a + j - 1 < lim else None for a, lim in zip(at, limits)]
            self._load_chain(bs, j, pos + [None] * (bs - n), pages + [[]] * (bs - n))
            steps.append((pos, self.graphs.replay((bs, f"chain{j}"))[0][:n]))
        drafts: list[list[int]] = [[] for _ in range(n)]
        for pos, tokens in steps:  # a row whose position ran past its limit drafts no further
            for b, (p, t) in enumerate(zip(pos, tokens.tolist())):
                if p is not None:
                    drafts[b].append(t)
        return drafts

    def close(self) -> None:
        self.graphs.close()
