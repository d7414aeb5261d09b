"""How ``ModelRunner.run`` uses a decode graph's outputs (logits, greedy tokens and logprobs, log_softmax), on
CPU: a stand-in for ``DecodeGraphs`` computes them with the eager forward, so an engine that takes the
graph path must produce exactly what the eager path produces (which tests/test_logits.py checks against
transformers): greedy rows take the graph's tokens and their top logprobs from its log_softmax, sampled rows
reuse it, processed rows recompute it after processing. The captured graphs themselves are checked on the
GPU (tests/test_gpu.py)."""

from __future__ import annotations

import random

import pytest
import torch

from pd.attention.base import AttnInputs
from pd.config import EngineConfig
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.model.context import ForwardContext
from pd.types import Batch, SamplingParams
from tests.support.clients import random_prompt


class EagerAsGraph:
    """Stands in for ``DecodeGraphs``: the eager decode forward's outputs in the graph's form."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.replays = 0

    def bucket(self, n: int) -> int:
        return n

    def run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r, n = self.runner, len(batch.reqs)
        self.replays += 1
        ids = [req.all_ids[s] for req, s in zip(batch.reqs, batch.starts)]
        r.attn.prepare(AttnInputs(batch.mode, batch.starts, batch.ends, [q.pages for q in batch.reqs]))
        rows = r._tensor(list(range(n)))
        ctx = ForwardContext(batch.mode, r.attn, rows, r.low_latency_moe)
        logits = r.model.logits(r.model.hidden(r._tensor(ids), r._tensor(list(batch.starts)), ctx, rows))
        full = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
        return logits, tokens, full.gather(1, tokens[:, None])[:, 0], full


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    "greedy, top logprobs": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, top_logprobs=5),
    "sampled, top logprobs": SamplingParams(
        temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True, top_logprobs=3, seed=7
    ),
    "greedy, penalties, top logprobs": SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5, top_logprobs=2
    ),
}


def outputs(engine: Engine, prompts, params):
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return [(r.output_ids, r.output_logprobs, r.output_top_logprobs) for r in reqs]


@pytest.mark.parametrize("mix", [*CASES, "all in one batch"])
def test_graph_path_outputs_equal_the_eager_path(tiny_model_dir, mix):
    params = list(CASES.values()) if mix == "all in one batch" else [CASES[mix]] * 3
    rng = random.Random(0)
    prompts = [random_prompt(rng, 12 + 3 * i) for i in range(len(params))]
    cfg = EngineConfig(model_path=str(tiny_model_dir), page_size=16)
    eager = outputs(Engine(cfg), prompts, params)
    engine = Engine(cfg)
    stand_in = EagerAsGraph(engine.runner)
    engine.runner.graphs = stand_in  # type: ignore[assignment]
    assert outputs(engine, prompts, params) == eager
    assert stand_in.replays >= 5  # every decode step went through it
    for sp, (ids, _, top) in zip(params, eager):  # the alternatives were there to compare
        assert len(top) == (len(ids) if sp.top_logprobs else 0)
        assert all(len(alternatives) == sp.top_logprobs for alternatives in top)
