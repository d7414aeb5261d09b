"""Warm-up: every kernel path a rank will serve with runs once before the rank says it is ready.

On a fresh GPU host the first forward JIT-builds FlashInfer's kernels and tunes Triton's (tens of seconds):
a rank that registered before that failed its first requests on transfer timeouts. ``warm_up`` runs, on
scratch requests whose pages it allocates and frees:

- ``extend``: a prompt in two chunks (the second one over a cached prefix), greedy, sampled, and sampled
  with every logits processing and logprobs option (penalties, bias, min_tokens, a grammar where the
  engine serves them, top and prompt logprobs);
- ``decode``: a decode step of the same requests (CUDA-graph bucket when graphs are on), one without the
  grammar (the launched step: processing, sampling and top logprobs behind the replay), then a replay of every
  other graph bucket (the decode graphs, or speculative decoding's verify and draft graphs);
- the prompt steps' graph buckets (``pd.engine.extend_graph``) replayed once each;
- on CUDA: the routed experts' kernels at each block config an eager prompt step, or a decode step run in
  normal mode outside a whole graph, can pick (``compile_moe_configs``, ``sorted_moe_rows``).

Ranks of a multi-rank instance run the same sequence, so their EP collectives meet. The model's expert
counters are reset afterwards: ``pd_expert_tokens`` counts served tokens only.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from pd.engine.engine import Engine
from pd.grammar import GrammarSpec
from pd.grammar.mask import allowed_tokens
from pd.model.moe import MoE
from pd.types import Batch, BatchMode, Req, SamplingParams

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
_SAMPLED = SamplingParams(
    temperature=0.7, top_p=0.9, top_k=8, min_p=0.01, max_tokens=2, ignore_eos=True, top_logprobs=2
)
_PROCESSED = SamplingParams(
    temperature=0.7,
    max_tokens=2,
    repetition_penalty=1.1,
    frequency_penalty=0.5,
    presence_penalty=0.5,
    logit_bias=((1, 1.0),),
    min_tokens=1,
    top_logprobs=5,
    prompt_logprobs=5,
)
_GRAMMAR = GrammarSpec.json_object()  # the token masks' path, where the engine has a grammar backend


def compile_moe_configs(model: torch.nn.Module, max_rows: int, dtype: torch.dtype) -> int:
    """Runs the routed experts' sorted-layout kernels once per block config that steps of 1..``max_rows``
    rows pick (the tuned table changes tiles with the row count; each config is a kernel Triton compiles on
    first use, about half a second per GEMM: the first long prompt after start-up paid 1.1 s for it on
    2026-12-03). Returns how many configs ran."""
    moe = next((m for m in model.modules() if isinstance(m, MoE)), None)
    if moe is None:
        return 0
    experts, k = moe.experts, moe.cfg.num_experts_per_tok
    hidden, device = experts.w13.shape[-1], experts.w13.device
    x = torch.randn(max_rows, hidden, device=device).to(dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, experts.w13.shape[0], (max_rows, k), generator=gen).to(device)
    weights = torch.full((max_rows, k), 1.0 / k, device=device)
    rows: dict[object, int] = {}
    for n in range(1, max_rows + 1):
        rows.setdefault(experts.sorted_config(x[:n], ids[:n]), n)
    for n in rows.values():
        experts.sorted(x[:n], ids[:n], weights[:n])
    return len(rows)


def sorted_moe_rows(engine: Engine, extend: bool, decode: bool) -> int:
    """The most rows the routed experts' sorted-layout kernels take eagerly on this rank: a prompt step's
    ``chunk_size`` tokens from every rank, and, where decode steps dispatch in normal mode outside a whole graph
    (piecewise graphs, eager decode), ``max_running`` from every rank. Whole decode graphs compiled theirs when
    captured; low-latency decode uses the masked layout."""
    runner, world = engine.runner, engine.runner.ep.config.world_size
    rows = engine.cfg.chunk_size * world if extend else 0
    graphs = runner.graphs
    if decode and not runner.low_latency_moe and (graphs is None or graphs.piecewise):
        rows = max(rows, engine.cfg.max_running * world)
    return rows


def _first_allowed(engine: Engine, req: Req) -> int:
    """The lowest token id ``req``'s grammar allows as its first token (so the decode step masks from a live
    matcher, not from one that failed on a token the grammar forbids)."""
    mask = engine.grammar.fill([req])
    assert mask is not None
    return int(allowed_tokens(mask)[0].nonzero()[0])


def warm_up(engine: Engine, extend: bool, decode: bool) -> float:
    """Runs the role's kernel paths once (see the module docstring); returns the seconds it took."""
    t0 = time.perf_counter()
    runner = engine.runner
    page = runner.pool.layout.page_size
    n = min(page + 1, engine.context_len - 2)  # two chunks: [0, page) and the partial page after it
    chunk = max(1, n - 1)
    count = min(3, engine.cfg.max_running)
    vocab = engine.model_cfg.vocab_size
    reqs: list[Req] = []
    launched: list[Req] = []  # the decode step launched on the graphs (below)
    processed = _PROCESSED
    if engine.grammar.backend is not None:
        processed = dataclasses.replace(_PROCESSED, grammar=_GRAMMAR)
    try:
        for i, sp in enumerate((_GREEDY, _SAMPLED, processed)[:count]):
            pages = engine.allocator.alloc(runner.pool.layout.pages_for(n + 1))
            if pages is None:
                raise RuntimeError(f"the KV pool ({engine.allocator.capacity} pages) cannot hold the warm-up")
            req = Req(
                -1 - i,
                [(7 * j + i) % vocab for j in range(n)],
                sp,
                seed=i,
                max_context_len=engine.context_len,
            )
            req.pages = pages
            reqs.append(req)
        if extend:
            runner.run(Batch(BatchMode.EXTEND, reqs, [0] * count, [chunk] * count), engine.logits)
            tokens = runner.run(
                Batch(BatchMode.EXTEND, reqs, [chunk] * count, [n] * count), engine.logits
            ).tokens
        else:  # the decode step reads whatever the pages hold; a grammar's request starts where its mask allows
            tokens = [_first_allowed(engine, r) if r.sampling.grammar is not None else 0 for r in reqs]
        if decode:
            for req, token in zip(reqs, tokens):
                req.output_ids.append(int(token or 0))
            # With a grammar the graph's logits are masked and sampled on the host; without, the step is launched
            # on the graphs (processing, sampling, top logprobs there): with a grammar backend both paths run.
            runner.run(Batch(BatchMode.DECODE, reqs, [n] * count, [n + 1] * count), engine.logits)
            if any(r.sampling.grammar is not None for r in reqs):
                launched = [
                    r if r.sampling.grammar is None else dataclasses.replace(r, sampling=_PROCESSED)
                    for r in reqs
                ]
                runner.run(Batch(BatchMode.DECODE, launched, [n] * count, [n + 1] * count), engine.logits)
            if runner.graphs is not None:
                for bs in runner.graphs.buckets:
                    runner.graphs.run_idle(bs)
            if runner.verify_graphs is not None:
                for bs in runner.verify_graphs.buckets:
                    runner.verify_graphs.run_idle(bs)
        if extend and runner.extend_graphs is not None:
            for t in runner.extend_graphs.buckets:
                runner.extend_graphs.run_idle(t)
        if runner.device.type == "cuda":
            compile_moe_configs(runner.model, sorted_moe_rows(engine, extend, decode), runner.dtype)
    finally:
        for req in reqs:
            engine.allocator.free(req.pages)
        for req in reqs + launched:  # a launched copy has a penalty slot of its own
            engine.logits.release(req)
        runner.model.reset_expert_token_counts()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t0
