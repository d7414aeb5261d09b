"""Piecewise CUDA graphs on the GPU (``pytest -m gpu``; skipped elsewhere): graphs cut at every MoE layer's
routed experts, which run eagerly between them (``pd.engine.graph.PiecewiseGraph``). The kernels are the whole
graph's, so its replays must give the whole graph's logits bit for bit, and greedy decoding the eager tokens.
The uncut steps are checked against transformers in tests/test_gpu.py; on CPU the cut forward runs through
(``run_pieces``) in every test."""

from __future__ import annotations

import random

import pytest
import torch

from pd.engine.extend_graph import ExtendGraphs
from pd.engine.graph import PiecewiseGraph
from pd.model.moe import MoE
from pd.types import Batch, BatchMode, Req, SamplingParams
from tests.support.clients import random_prompt

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tests.test_gpu import _decode_runner, _teacher_forced_top1  # noqa: E402  (a GPU module: imported here)


@pytest.fixture(scope="module")
def gpu_tiny(tiny_model):
    return tiny_model("gpu-tiny")


def _moe_layers(runner) -> int:
    return sum(isinstance(m, MoE) for m in runner.model.modules())


def test_piecewise_decode_graphs_equal_whole_graphs_and_eager(gpu_tiny):
    pieces = _decode_runner(gpu_tiny, piecewise_graphs=True)
    assert pieces.graphs is not None and pieces.graphs.graphs.piecewise
    for bs in pieces.graphs.buckets:  # a graph before each MoE layer's routed experts, one after the last
        graph = pieces.graphs.graphs._graphs[bs]
        assert isinstance(graph, PiecewiseGraph) and len(graph.graphs) == _moe_layers(pieces) + 1
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.randint(4, 60), 1000) for _ in range(11)]
    forced = [random_prompt(rng, 16, 1000) for _ in prompts]
    got = _teacher_forced_top1(pieces, prompts, forced)
    assert got == _teacher_forced_top1(_decode_runner(gpu_tiny), prompts, forced)
    assert got == _teacher_forced_top1(_decode_runner(gpu_tiny, cuda_graph=False), prompts, forced)
    whole = _decode_runner(gpu_tiny)
    for runner in (pieces, whole):  # the same KV in both pools: the eager prompt steps' kernels are the same
        _teacher_forced_top1(runner, prompts, forced)
    reqs = [
        Req(i, p + f, SamplingParams(temperature=0), 0, 4096) for i, (p, f) in enumerate(zip(prompts, forced))
    ]
    for i, r in enumerate(reqs):
        r.pages = list(range(1 + i * 8, 1 + (i + 1) * 8))
    batch = Batch(BatchMode.DECODE, reqs, [r.seq_len - 2 for r in reqs], [r.seq_len - 1 for r in reqs])
    assert whole.graphs is not None
    logits = pieces.graphs.run(batch)[0].clone()
    assert torch.equal(logits, whole.graphs.run(batch)[0])


def test_piecewise_extend_graphs_equal_whole_graphs(gpu_tiny):
    """Prompt steps (whole prompts, then tails over the cached prefix) through piecewise extend graphs give the
    whole graphs' logits bit for bit, at every bucket the steps pick."""
    runner = _decode_runner(gpu_tiny, graph_extend_tokens=256)
    whole = runner.extend_graphs
    assert whole is not None
    pieces = ExtendGraphs(
        runner.model, runner.attn, runner.pool, whole.buckets, runner.context_len, piecewise=True
    )
    rng = random.Random(6)
    picked = set()
    for n in (1, 3, 9):
        prompts = [random_prompt(rng, rng.randint(12, 60), 1000) for _ in range(n)]
        reqs = []
        for i, p in enumerate(prompts):
            r = Req(i, list(p), SamplingParams(temperature=0, max_tokens=8), 0, 4096)
            r.pages = list(range(1 + i * 8, 1 + (i + 1) * 8))
            reqs.append(r)
        for starts, ends in (
            ([0] * n, [len(p) - 8 for p in prompts]),
            ([len(p) - 8 for p in prompts], [len(p) for p in prompts]),
        ):
            batch = Batch(BatchMode.EXTEND, reqs, starts, ends)
            t = whole.bucket(batch)
            assert t is not None
            picked.add(t)
            got = pieces.run(batch, t).clone()
            assert torch.equal(got, whole.run(batch, t)), (n, t)
    assert len(picked) >= 2
    pieces.close()
