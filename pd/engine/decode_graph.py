"""Full-model CUDA graphs for decode, one per batch bucket, and decode steps launched on them without waiting.

Each graph covers embedding -> every layer (MLA decode, dense MLP or MoE with its EP dispatch and
combine) -> final norm -> lm_head -> log_softmax -> greedy token and its logprob. Buckets are captured largest
first into one memory pool. Before a replay the attention metadata is planned outside the graph
into the bucket's persistent buffers (the attention backend's graph hooks); a batch is padded to
its bucket with rows that read and write only the dummy page and route to no expert.

``launch`` queues a step: the graph, logits processing on the device where a request asks for penalties, bias
or min_tokens (``LogitsProcessor``; grammars need the host's token and are not launched), sampling where a
request is not greedy or was processed, top logprobs, and copies of the tokens, logprobs and top logprobs into
host buffers of their own behind which an event is recorded. ``Launched.result`` waits for
that event only, so the host can read one step while the next one runs. A row's input token is read on the
device from the step before (``src``): the overlapped decode loop (``Engine.step``) launches step N + 1 before
the host has read step N's tokens. Requests with a grammar take the graph's logits (``run``) and are sampled by
the runner.

Lifetime: ``close`` before the process group is destroyed (``pd.engine.graph``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pd.attention.base import AttentionBackend, AttnInputs
from pd.engine.graph import Outputs, StepGraphs
from pd.engine.logits import LogitsProcessor
from pd.kv_cache import KVPool
from pd.model.context import ForwardContext
from pd.model.deepseek_v3 import DeepseekV3ForCausalLM
from pd.model.moe import Pieces
from pd.sampling import SamplingTensors, pair_top_logprobs, sample
from pd.types import MAX_TOP_LOGPROBS, Batch, BatchMode, StepResult

log = logging.getLogger(__name__)

NO_SOURCE = -1  # a row whose input token the host has (``src``)


class HostOut:
    """Host buffers a launched step's results are copied into (pinned on CUDA, so the copies are asynchronous):
    ``tokens [max_bs]`` int64, ``logprobs [max_bs]`` float32, and ``top_values``/``top_ids`` ``[max_bs *
    MAX_TOP_LOGPROBS]`` float32/int64 (a step asking for k alternatives fills the first n * k, row-major). Reused
    every other launch: a step's results are read before the launch after the next one."""

    def __init__(self, max_bs: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.tokens = torch.zeros(max_bs, dtype=torch.int64, pin_memory=pin)
        self.logprobs = torch.zeros(max_bs, dtype=torch.float32, pin_memory=pin)
        self.top_values = torch.zeros(max_bs * MAX_TOP_LOGPROBS, dtype=torch.float32, pin_memory=pin)
        self.top_ids = torch.zeros(max_bs * MAX_TOP_LOGPROBS, dtype=torch.int64, pin_memory=pin)
        self.event = torch.cuda.Event() if pin else None


@dataclass(eq=False)
class Launched:
    """A decode step queued on the device. ``batch``: its requests and the positions it computes (a request
    whose previous step was in flight at launch computes one position further than the host knew of, so
    ``ends[i]`` is the length the host sees once it has recorded that step's token); ``top_k``: alternatives
    copied per row."""

    batch: Batch
    out: HostOut
    top_k: int

    def result(self) -> StepResult:
        """Waits for this step (not for steps launched after it) and reads its results."""
        if self.out.event is not None:
            self.out.event.synchronize()
        reqs = self.batch.reqs
        n = len(reqs)
        result = StepResult.of(self.out.tokens[:n].tolist(), self.out.logprobs[:n].tolist())
        if self.top_k:
            k = self.top_k
            values = self.out.top_values[: n * k].view(n, k).tolist()
            result.top = pair_top_logprobs(values, self.out.top_ids[: n * k].view(n, k).tolist(), reqs)
        return result


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... up to and including ``max_batch``."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b = b * 2 if b < 16 else b + (8 if b < 32 else 16 if b < 64 else 32)
    return [*buckets, max_batch]


class DecodeGraphs:
    """Captures ``model``'s decode step for each of ``buckets`` (batch sizes) at construction.

    ``attn`` must support graphs (``AttentionBackend.supports_graphs``) to capture; ``capture=False`` runs the
    same steps on the same buffers uncaptured (CPU, tests). ``pool``: the KV pool it reads; ``context_len``: the
    longest sequence (sizes the page tables); ``low_latency_moe``: MoE layers use the graph-safe low-latency EP
    path (multi-rank decode); ``piecewise``: instead, the routed experts run eagerly in normal mode between
    graphs of the rest (``pd.engine.graph.PiecewiseGraph``).
    """

    def __init__(
        self,
        model: DeepseekV3ForCausalLM,
        attn: AttentionBackend,
        pool: KVPool,
        buckets: Sequence[int],
        context_len: int,
        low_latency_moe: bool = False,
        capture: bool = True,
        piecewise: bool = False,
    ) -> None:
        if piecewise and low_latency_moe:
            raise ValueError("piecewise decode graphs run the routed experts in normal mode, not low-latency")
        self.graphs = StepGraphs(attn, capture, piecewise)
        self.model, self.attn, self.low_latency_moe = model, attn, low_latency_moe
        self.buckets = sorted(set(buckets))
        max_bs = self.buckets[-1]
        dev = self.device = pool.buffer.device
        # The graphs' inputs, one host-to-device copy per replay: token ids, positions, real-row flags, and
        # the row of the previous step's tokens each row's token is (NO_SOURCE: its token is in ids).
        self.inputs = torch.zeros(4, max_bs, dtype=torch.int64, device=dev)
        self.ids, self.positions, self.real, self.src = self.inputs
        self.prev = torch.zeros(max_bs, dtype=torch.int64, device=dev)  # the last launched step's tokens
        self.rows = torch.arange(max_bs, dtype=torch.int64, device=dev)
        self._host = [HostOut(max_bs, dev), HostOut(max_bs, dev)]
        self._launches = 0
        # Recorded behind a launch's input copies: the attention planner stages a step's metadata in a pinned
        # host buffer it reuses, whose copy to the device must have run before the next plan rewrites it.
        self._loaded = torch.cuda.Event() if dev.type == "cuda" else None
        self.states: dict[int, object] = {}
        max_pages = max_bs * pool.layout.pages_for(context_len)
        for bs in reversed(self.buckets):
            self.states[bs] = attn.graph_state(bs, max_pages)
            self._load(bs, [], [], [], [])
            self.graphs.record_pieces(bs, functools.partial(self._forward, bs))
        log.info(
            "%s decode CUDA graphs for batch buckets %s%s",
            "captured" if capture else "built",
            self.buckets,
            ", piecewise (routed experts eager, normal EP mode)" if piecewise else "",
        )

    @property
    def piecewise(self) -> bool:
        """Whether the routed experts run eagerly between graphs of the rest (``StepGraphs.piecewise``)."""
        return self.graphs.piecewise

    def _forward(self, bs: int) -> Pieces[Outputs]:
        row_mask = self.real[:bs] != 0
        src = self.src[:bs]
        ids = torch.where(src >= 0, self.prev.index_select(0, src.clamp(min=0)), self.ids[:bs])
        rows = self.rows[:bs]
        ctx = ForwardContext(
            BatchMode.DECODE,
            self.attn,
            rows,
            self.low_latency_moe,
            row_mask,
            overlap_shared=not self.piecewise,
        )
        hidden = yield from self.model.hidden_pieces(ids, self.positions[:bs], ctx, rows)
        logits = self.model.logits(hidden)  # [bs, V] float32
        tokens = logits.argmax(-1)
        full = logits.log_softmax(-1)  # kept: top logprobs, the sampler's logprobs
        return logits, tokens, full.gather(1, tokens[:, None])[:, 0], full

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _load(
        self,
        bs: int,
        ids: list[int],
        positions: list[int],
        ends: list[int],
        pages: list[list[int]],
        src: list[int] | None = None,
    ) -> None:
        n = len(ids)
        host = np.zeros((4, self.inputs.shape[1]), dtype=np.int64)  # padding rows: token 0 at position 0
        host[0, :n], host[1, :n], host[2, :n] = ids, positions, 1
        host[3] = NO_SOURCE
        if src is not None:
            host[3, :n] = src
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
    def launch(
        self, batch: Batch, prev: Launched | None = None, logits: LogitsProcessor | None = None
    ) -> Launched:
        """Queues the decode step of ``batch`` and returns without waiting for it. Requests of ``prev`` (the step
        launched before, whose tokens the host may not have recorded yet) compute the position after the one
        ``batch`` gives them, on the token ``prev`` sampled: their pages must hold it (the scheduler reserves one
        token ahead). ``logits``: the engine's processor, for requests with penalties, bias or min_tokens (its
        state is updated on the device from the sampled tokens); requests with a grammar are not launched."""
        reqs = batch.reqs
        n = len(reqs)
        bs = self.bucket(n)
        assert bs is not None, f"no bucket holds {n} requests"
        rows = {r: i for i, r in enumerate(prev.batch.reqs)} if prev is not None else {}
        src = [rows.get(r, NO_SOURCE) for r in reqs]
        starts = [s + (k != NO_SOURCE) for s, k in zip(batch.starts, src)]
        ends = [e + (k != NO_SOURCE) for e, k in zip(batch.ends, src)]
        ids = [0 if k != NO_SOURCE else r.token_at(s) for r, s, k in zip(reqs, starts, src)]
        if self._loaded is not None:
            self._loaded.synchronize()  # the previous launch's copies: they run once the step before it ended
        self._load(bs, ids, starts, ends, [r.pages for r in reqs], src)
        if self._loaded is not None:
            self._loaded.record()
        out, tokens, logprobs, full = (t[:n] for t in self.graphs.replay(bs))
        params = [r.sampling for r in reqs]
        step = None
        if any(p.needs_processing for p in params):
            if logits is None:
                raise ValueError(
                    "requests with penalties, bias or min_tokens need the engine's LogitsProcessor"
                )
            assert not any(p.grammar is not None for p in params), "a grammar's mask needs the host's token"
            step = logits.prepare(reqs, ahead=[int(k != NO_SOURCE) for k in src])
            assert step is not None
            out = logits.apply(out, step)
            full = out.log_softmax(-1)  # of the processed logits: sampled from, reported
        if step is not None or not all(p.greedy for p in params):  # positions: the index of the token sampled
            st = SamplingTensors.build(params, [r.seed for r in reqs], ends, self.device)
            tokens, logprobs = sample(out, st, full)
        if logits is not None:
            logits.record(step, tokens)
        self.prev[:n].copy_(tokens)
        host = self._host[self._launches % 2]
        self._launches += 1
        host.tokens[:n].copy_(tokens, non_blocking=True)
        host.logprobs[:n].copy_(logprobs, non_blocking=True)
        k = max(p.top_logprobs for p in params)
        if k:
            values, top_ids = full.topk(k, dim=-1)
            host.top_values[: n * k].view(n, k).copy_(values, non_blocking=True)
            host.top_ids[: n * k].view(n, k).copy_(top_ids, non_blocking=True)
        if host.event is not None:
            host.event.record()
        launched = Batch(BatchMode.DECODE, reqs, starts, ends, copies=batch.copies)
        # Every row samples (``ends`` runs one past what the host knows of some rows).
        launched.samples = [True] * n
        return Launched(launched, host, k)

    @torch.inference_mode()
    def run_idle(self, bs: int | None = None) -> None:
        """A step with no requests on this rank: replay bucket ``bs`` (default: the smallest), every row
        padding. Warm-up replays each bucket this way."""
        bs = self.buckets[0] if bs is None else bs
        self._load(bs, [], [], [], [])
        self.graphs.replay(bs)

    def close(self) -> None:
        self.graphs.close()
