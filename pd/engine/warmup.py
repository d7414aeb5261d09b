"""Warm-up: every kernel path a rank will serve with runs once before the rank says it is ready.

On a fresh GPU host the first forward JIT-builds FlashInfer's kernels and tunes Triton's (tens of seconds):
a rank that registered before that failed its first requests on transfer timeouts. ``warm_up`` runs, on
scratch requests whose pages it allocates and frees:

- ``extend``: a prompt in two chunks (the second one over a cached prefix), greedy, sampled, and sampled
  with every logits processing and logprobs option (penalties, bias, min_tokens, a grammar where the
  engine serves them, top and prompt logprobs);
- ``decode``: a decode step of the same requests (CUDA-graph bucket when graphs are on), then a replay of
  every other graph bucket (the decode graphs, or speculative decoding's verify and draft graphs);
- the prompt steps' graph buckets (``pd.engine.extend_graph``) replayed once each.

Ranks of a multi-rank instance run the same sequence, so their EP collectives meet. The model's expert
counters are reset afterwards: ``pd_expert_tokens`` counts served tokens only.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pd.engine.engine import Engine
from pd.grammar import GrammarSpec
from pd.types import Batch, BatchMode, Req, SamplingParams

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
_SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=8, min_p=0.01, max_tokens=2, ignore_eos=True)
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


def warm_up(engine: Engine, extend: bool, decode: bool) -> float:
    """Runs the role's kernel paths once (see the module docstring); returns the seconds it took."""
    t0 = time.perf_counter()
    runner = engine.runner
    page = runner.pool.layout.page_size
    n = min(page + 1, engine.context_len - 2)  # two chunks: [0, page) and the partial page after it
    chunk = max(1, n - 1)
    count = min(3, engine.cfg.max_running)
    vocab = engine.model_cfg.vocab_size
    reqs = []
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
        else:
            tokens = [0] * count  # the decode step reads whatever the pages hold
        if decode:
            for req, token in zip(reqs, tokens):
                req.output_ids.append(int(token or 0))
            runner.run(Batch(BatchMode.DECODE, reqs, [n] * count, [n + 1] * count), engine.logits)
            if runner.graphs is not None:
                for bs in runner.graphs.buckets:
                    runner.graphs.run_idle(bs)
            if runner.verify_graphs is not None:
                for bs in runner.verify_graphs.buckets:
                    runner.verify_graphs.run_idle(bs)
        if extend and runner.extend_graphs is not None:
            for t in runner.extend_graphs.buckets:
                runner.extend_graphs.run_idle(t)
    finally:
        for req in reqs:
            engine.allocator.free(req.pages)
            engine.logits.release(req)
        runner.model.reset_expert_token_counts()
    if runner.device.type == "cuda":
        import torch

        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t0
