"""Full-model CUDA graphs for decode: one graph per batch bucket.

Each graph covers embedding -> every layer (MLA decode, dense MLP or MoE with its EP dispatch and
combine) -> final norm -> lm_head -> log_softmax -> greedy token and its logprob. Buckets are captured largest
first into one memory pool. Before a replay the attention metadata is planned outside the graph
into the bucket's persistent buffers (the attention backend's graph hooks); a batch is padded to
its bucket with rows that read and write only the dummy page and route to no expert. Sampling other
than greedy and logits processing run on the graph's logits after the replay, top logprobs on its
log_softmax (``ModelRunner.run``).

Lifetime: destroy (``close``) before the process group: a process that captured NCCL work hung at
exit in destroy_process_group otherwise (gpu/NOTES.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch

from pd.attention.base import AttentionBackend, AttnInputs
from pd.kv_cache import KVPool
from pd.model.context import ForwardContext
from pd.model.deepseek_v3 import DeepseekV3ForCausalLM
from pd.types import Batch, BatchMode

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]


def capture_graph(
    step: Callable[[], Outputs], pool: torch.cuda._POOL_HANDLE
) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """Captures ``step`` into a CUDA graph allocating from ``pool``, after two runs on a side stream (the
    allocator and lazily built kernels warm up outside the graph). Returns the graph and ``step``'s outputs,
    the tensors each replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class StepGraphs:
    """Steps on static buffers by key, each captured into a CUDA graph (all in one memory pool, in the order
    recorded); ``capture=False`` runs them as they are on the same buffers (CPU, tests). A step reads only
    buffers its owner fills before ``replay`` (inputs, an attention state planned by ``prepare_graph``) and
    returns its outputs, which every replay rewrites in place. ``attn`` must support graphs to capture.
    Lifetime: ``close`` before the process group is destroyed (a captured NCCL graph hung at exit)."""

    def __init__(self, attn: AttentionBackend, capture: bool = True) -> None:
        if capture and not attn.supports_graphs:
            raise ValueError(
                f"CUDA graphs need an attention backend with graph support, not {type(attn).__name__}"
            )
        self.capture = capture
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._steps: dict[Hashable, Callable[[], Outputs]] = {}
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.out: dict[Hashable, Outputs] = {}

    @torch.inference_mode()
    def record(self, key: Hashable, step: Callable[[], Outputs]) -> Outputs:
        """Captures (or runs once) ``step`` under ``key``; returns its outputs."""
        self._steps[key] = step
        if self._pool is None:
            self.out[key] = step()
        else:
            self._graphs[key], self.out[key] = capture_graph(step, self._pool)
        return self.out[key]

    @torch.inference_mode()
    def replay(self, key: Hashable) -> Outputs:
        """Runs ``key``'s step again; returns its outputs (the recorded tensors, rewritten)."""
        if self._pool is not None:
            self._graphs[key].replay()
        else:
            for mine, fresh in zip(self.out[key], self._steps[key]()):
                mine.copy_(fresh)
        return self.out[key]

    def close(self) -> None:
        self._graphs.clear()
        self._steps.clear()
        self.out.clear()


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... up to and including ``max_batch``."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b = b * 2 if b < 16 else b + (8 if b < 32 else 16 if b < 64 else 32)
    return [*buckets, max_batch]


class DecodeGraphs:
    """Captures ``model``'s decode step for each of ``buckets`` (batch sizes) at construction.

    ``attn`` must support graphs (``AttentionBackend.supports_graphs``); ``pool``: the KV pool it reads;
    ``context_len``: the longest sequence (sizes the page tables); ``low_latency_moe``: MoE layers use the
    graph-safe low-latency EP path (multi-rank decode).
    """

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        attn: AttentionBackend,
        pool: KVPool,
        buckets: Sequence[int],
        context_len: int,
        low_latency_moe: bool = False,
    ) -> None:
        self.graphs = StepGraphs(attn)
        self.model, self.attn, self.low_latency_moe = model, attn, low_latency_moe
        self.buckets = sorted(set(buckets))
        max_bs = self.buckets[-1]
        dev = pool.buffer.device
        # The graphs' inputs, one host-to-device copy per replay: token ids, positions, real-row flags.
        self.inputs = torch.zeros(3, max_bs, dtype=torch.int64, device=dev)
        self.ids, self.positions, self.real = self.inputs
        self.rows = torch.arange(max_bs, dtype=torch.int64, device=dev)
        self.states: dict[int, object] = {}
        max_pages = max_bs * pool.layout.pages_for(context_len)
        for bs in reversed(self.buckets):
            self.states[bs] = attn.graph_state(bs, max_pages)
            self._load(bs, [], [], [], [])
            self.graphs.record(bs, functools.partial(self._forward, bs))
        log.info("captured decode CUDA graphs for batch buckets %s", self.buckets)

    def _forward(self, bs: int) -> Outputs:
        row_mask = self.real[:bs] != 0
        ctx = ForwardContext(BatchMode.DECODE, self.attn, self.rows[:bs], self.low_latency_moe, row_mask)
        logits = self.model(self.ids[:bs], self.positions[:bs], ctx)  # [bs, V] float32
        tokens = logits.argmax(-1)
        full = logits.log_softmax(-1)  # kept: top logprobs of greedy rows, the sampler's logprobs
        return logits, tokens, full.gather(1, tokens[:, None])[:, 0], full

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _load(
        self, bs: int, ids: list[int], positions: list[int], ends: list[int], pages: list[list[int]]
    ) -> None:
        n = len(ids)
        host = np.zeros((3, self.inputs.shape[1]), dtype=np.int64)  # padding rows: token 0 at position 0
        host[0, :n], host[1, :n], host[2, :n] = ids, positions, 1
        self.inputs.copy_(torch.from_numpy(host), non_blocking=True)
        inputs = AttnInputs(BatchMode.DECODE, [e - 1 for e in ends], ends, pages)
        self.attn.prepare_graph(self.states[bs], inputs)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replays the bucket of a decode batch: (logits ``[n, V]`` float32, greedy tokens ``[n]`` int64, their
        logprobs ``[n]`` float32, the logits' log_softmax ``[n, V]`` float32) of its ``n`` requests, views of
        the graph's outputs (valid until the next replay)."""
        n = len(batch.reqs)
        bs = self.bucket(n)
        assert bs is not None, f"no bucket holds {n} requests"
        ids = [r.token_at(s) for r, s in zip(batch.reqs, batch.starts)]
        self._load(bs, ids, list(batch.starts), list(batch.ends), [r.pages for r in batch.reqs])
        logits, tokens, logprobs, full = self.graphs.replay(bs)
        return logits[:n], tokens[:n], logprobs[:n], full[:n]

    @torch.inference_mode()
    def run_idle(self, bs: int | None = None) -> None:
        """A step with no requests on this rank: replay bucket ``bs`` (default: the smallest), every row
        padding. Warm-up replays each bucket this way."""
        bs = self.buckets[0] if bs is None else bs
        self._load(bs, [], [], [], [])
        self.graphs.replay(bs)

    def close(self) -> None:
        self.graphs.close()
