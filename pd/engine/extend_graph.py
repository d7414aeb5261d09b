"""CUDA graphs of short extend steps, one per token bucket (piecewise on multi-rank engines).

A prompt step of few tokens (a short prompt, the tail of a prompt whose prefix is cached, the last small
chunk) costs its eager launches, not its math: on the DESIGN.md §8 shape an eager forward of 100 tokens took
~58 ms on an H200 where its kernels take ~10. So a step of at most ``buckets[-1]`` tokens and ``ROWS``
requests runs in a graph: each request's new positions are causal queries of the absorbed MLA over the paged
cache (the decode form: the prefix is read as latent, never expanded per head), its first and last positions
anywhere; padding rows take the bucket's other tokens on the dummy page and route to no expert. The graph
returns float32 logits ``[ROWS, V]`` of each request's last position of the step (padding rows: garbage).
``piecewise`` (multi-rank engines, whose normal-mode EP dispatch synchronises with the host): the routed
experts run eagerly between graphs of the rest (``pd.engine.graph.PiecewiseGraph``).

Longer steps stay eager (the non-absorbed form wins over long new ranges), as do steps that need prompt
logprobs or the hidden states of every row (speculative decoding's MTP layer). ``capture=False`` runs the
same steps uncaptured on the same buffers (CPU, tests). Lifetime: ``close`` before the process group.
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
from pd.model.deepseek_v3 import DeepseekV3ForCausalLM
from pd.model.moe import Pieces
from pd.types import Batch, BatchMode

log = logging.getLogger(__name__)

ROWS = 16  # requests one graphed extend step holds at most (one more row is kept for padding)


def default_extend_buckets(max_tokens: int) -> list[int]:
    """32, 64, 128, ... up to and including ``max_tokens``; none below 32 (a bucket's padding rows take a
    token each, so it must hold more than ``ROWS``)."""
    if max_tokens < 32:
        return []
    buckets, t = [], 32
    while t < max_tokens:
        buckets.append(t)
        t *= 2
    return [*buckets, max_tokens]


class ExtendGraphs:
    """Captures ``model``'s extend step for each of ``buckets`` (tokens per step) at construction; ``attn``
    must have graph hooks, ``context_len`` (the longest sequence) sizes the page tables."""

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        attn: AttentionBackend,
        pool: KVPool,
        buckets: Sequence[int],
        context_len: int,
        capture: bool = True,
        piecewise: bool = False,
    ) -> None:
        self.graphs = StepGraphs(attn, capture, piecewise)
        self.model, self.attn = model, attn
        self.buckets = sorted(set(buckets))
        rows = ROWS + 1
        dev = pool.buffer.device
        # Inputs, one host-to-device copy per step: token ids, positions, real-token flags [T]; last rows [R].
        self.inputs = torch.zeros(3, self.buckets[-1], dtype=torch.int64, device=dev)
        self.ids, self.positions, self.real = self.inputs
        self.last = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.states: dict[int, object] = {}
        max_pages = rows * pool.layout.pages_for(context_len) + self.buckets[-1]
        for t in reversed(self.buckets):
            self.states[t] = attn.graph_state(rows, max_pages, t)
            self._load(t, [], [], [], [])
            self.graphs.record_pieces(t, functools.partial(self._step, t))
        if capture:
            how = "piecewise (routed experts eager)" if piecewise else "whole"
            log.info("captured extend CUDA graphs for token buckets %s, %s", self.buckets, how)

    def _step(self, t: int) -> Pieces[tuple[torch.Tensor]]:
        piecewise = self.graphs.piecewise
        ctx = ForwardContext(
            BatchMode.DECODE, self.attn, self.last, False, self.real[:t] != 0, overlap_shared=not piecewise
        )
        hidden = yield from self.model.hidden_pieces(self.ids[:t], self.positions[:t], ctx, self.last)
        return (self.model.logits(hidden),)

    def bucket(self, batch: Batch) -> int | None:
        """The bucket that runs ``batch`` (an extend step), or None: too many tokens or requests."""
        n = len(batch.reqs)
        need = sum(e - s for s, e in zip(batch.starts, batch.ends)) + ROWS + 1 - n  # a token per padding row
        return next((t for t in self.buckets if t >= need), None) if n <= ROWS else None

    def _load(
        self, t: int, ids: list[int], starts: list[int], ends: list[int], pages: list[list[int]]
    ) -> None:
        n = len(ids)
        host = np.zeros((3, self.inputs.shape[1]), dtype=np.int64)  # padding: token 0 at position 0
        host[0, :n] = ids
        host[1, :n] = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if starts else []
        host[2, :n] = 1
        last = np.zeros(self.last.shape[0], dtype=np.int64)
        last[: len(ends)] = np.cumsum([e - s for s, e in zip(starts, ends)]) - 1
        self.inputs.copy_(torch.from_numpy(host), non_blocking=True)
        self.last.copy_(torch.from_numpy(last), non_blocking=True)
        self.attn.prepare_graph(self.states[t], AttnInputs(BatchMode.DECODE, starts, ends, pages))

    def run(self, batch: Batch, t: int) -> torch.Tensor:
        """Replays bucket ``t`` (``bucket(batch)``) for an extend ``batch``: float32 logits ``[n, V]`` of each
        request's last position of the step, a view of the graph's output valid until the next replay."""
        ids = [i for r, s, e in zip(batch.reqs, batch.starts, batch.ends) for i in r.ids(s, e)]
        self._load(t, ids, list(batch.starts), list(batch.ends), [r.pages for r in batch.reqs])
        return self.graphs.replay(t)[0][: len(batch.reqs)]

    def run_idle(self, t: int) -> None:
        """Replays bucket ``t`` with padding rows only (warm-up)."""
        self._load(t, [], [], [], [])
        self.graphs.replay(t)

    def close(self) -> None:
        self.graphs.close()
