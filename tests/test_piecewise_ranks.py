"""Multi-rank prompt steps through the piecewise extend graphs (``pd.engine.extend_graph``), on CPU.

Two ranks on gloo (this file run as a worker script by ``tests.test_ep.launch_ranks``, bounded by a
timeout) each build a ModelRunner on their shard of the tiny checkpoint with the torch EP backend, and
``ExtendGraphs(..., capture=False, piecewise=True)``: the same static buffers and cut forward the GPU
replays, the routed experts run between the pieces. The ranks run three prompt steps in lockstep: one
rank idle while the other runs a graph step; both in graphs of different buckets; one in a graph while
the other runs eager (too many tokens for any bucket). Every rank's tokens and logprobs must be those of
a single-rank eager runner on the same prompts, each graph step must have taken the bucket expected, and
the experts' token counters of both ranks together must equal the eager runner's (padding rows route to
no expert: a padding row sent to a real expert would count there).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from pd.config import EngineConfig, ModelConfig
from pd.engine.extend_graph import ExtendGraphs
from pd.engine.runner import ModelRunner
from pd.model.moe import MoE
from pd.types import Batch, BatchMode, Req, SamplingParams
from tests.test_ep import launch_ranks

WORLD = 2
BUCKETS = [32, 64]
PAGES_PER_REQ = 8  # of 16 tokens: room for the longest prompt
# Prompt lengths of each step, by rank; [] idles. A graph step of n prompts and T tokens needs T + 17 - n
# tokens of a bucket (a token per padding row); 70 + 16 > 64: rank 1's last step runs eager.
STEPS = [
    {0: [7, 9], 1: []},
    {0: [12, 11, 13], 1: [10]},
    {0: [5, 6], 1: [70]},
]
GRAPH_BUCKETS = {0: [[32], [64], [32]], 1: [[], [32], []]}  # the bucket of each graph step, by rank and step


def prompts(step: int, rank: int) -> list[list[int]]:
    rng = random.Random(100 * step + rank)
    return [[rng.randrange(1, 1000) for _ in range(n)] for n in STEPS[step][rank]]


def make_reqs(token_lists: list[list[int]]) -> list[Req]:
    """Requests on pages of their own (page 0 is the graphs' dummy page)."""
    reqs = []
    for i, ids in enumerate(token_lists):
        r = Req(i, list(ids), SamplingParams(temperature=0, max_tokens=4), 0, 4096)
        r.pages = list(range(1 + i * PAGES_PER_REQ, 1 + (i + 1) * PAGES_PER_REQ))
        reqs.append(r)
    return reqs


def run_prompts(runner: ModelRunner, token_lists: list[list[int]]) -> tuple[list[int], list[float]]:
    reqs = make_reqs(token_lists)
    out = runner.run(Batch(BatchMode.EXTEND, reqs, [0] * len(reqs), [len(r.prompt_ids) for r in reqs]))
    return out.tokens, out.logprobs


def expert_counts(runner: ModelRunner) -> list[list[int]]:
    """Each MoE layer's (token, expert) counts of this rank's experts, in forward order."""
    return [m.expert_tokens.tolist() for m in runner.model.modules() if isinstance(m, MoE)]


def worker_main(argv: list[str]) -> None:
    import torch.distributed as dist

    from pd.ep import EPConfig, make_ep_backend

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    for name in ("--rank", "--world", "--port"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world,
        timeout=timedelta(seconds=60),  # as tests/test_ep.py: a loaded 2-core CI box once aborted at 30
    )  # fmt: skip
    try:
        cfg = EngineConfig(model_path=args.model, page_size=16, num_pages=128)
        model_cfg = ModelConfig.from_dir(args.model)
        ep_cfg = EPConfig(model_cfg.n_routed_experts, model_cfg.hidden_size, cfg.max_running,
                          cfg.torch_dtype, args.rank, args.world)  # fmt: skip
        runner = ModelRunner(cfg, model_cfg, make_ep_backend("torch", ep_cfg, dist.group.WORLD))
        assert runner.lockstep and runner.extend_graphs is None  # CPU: no graphs of its own
        # Collective: each bucket's step runs once (padding rows only) on every rank.
        graphs = ExtendGraphs(
            runner.model, runner.attn, runner.pool, BUCKETS, runner.context_len, capture=False, piecewise=True
        )
        assert graphs.graphs.piecewise
        taken: list[int] = []
        replay = graphs.run
        graphs.run = lambda batch, t: (taken.append(t), replay(batch, t))[1]  # type: ignore[method-assign]
        runner.extend_graphs = graphs
        steps = []
        for step in range(len(STEPS)):
            before = len(taken)
            mine = prompts(step, args.rank)
            if mine:
                tokens, logprobs = run_prompts(runner, mine)
            else:
                runner.run_idle()
                tokens, logprobs = [], []
            steps.append({"tokens": tokens, "logprobs": logprobs, "buckets": taken[before:]})
        result = {"steps": steps, "experts": expert_counts(runner)}
        (args.out / f"rank{args.rank}.json").write_text(json.dumps(result))
        runner.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(150)
def test_piecewise_extend_graphs_on_two_ranks_equal_single_rank_eager(tiny_model_dir, tmp_path) -> None:
    launch_ranks(["--model", str(tiny_model_dir)], tmp_path, WORLD, module="tests.test_piecewise_ranks")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    path = str(tiny_model_dir)
    eager = ModelRunner(EngineConfig(model_path=path, page_size=16), ModelConfig.from_dir(path))
    assert eager.extend_graphs is None and not eager.lockstep
    every = [(s, r) for s in range(len(STEPS)) for r in range(WORLD) if STEPS[s][r]]
    want_tokens, want_lps = run_prompts(eager, [p for s, r in every for p in prompts(s, r)])
    at = 0
    for s, r in every:
        got, n = ranks[r]["steps"][s], len(STEPS[s][r])
        assert got["tokens"] == want_tokens[at : at + n], (s, r)
        assert got["logprobs"] == pytest.approx(want_lps[at : at + n], abs=1e-4), (s, r)
        at += n
    for r in range(WORLD):
        # Graph steps where expected, in the expected bucket; the idle and the too-long steps ran eager.
        assert [st["buckets"] for st in ranks[r]["steps"]] == GRAPH_BUCKETS[r]
    assert ranks[1]["steps"][0]["tokens"] == []  # it idled
    # Linear placement: rank r holds experts [4r, 4r + 4). Padding rows and idle steps count nowhere.
    joined = [a + b for a, b in zip(ranks[0]["experts"], ranks[1]["experts"])]
    assert joined == expert_counts(eager)
    top_k = eager.model_cfg.num_experts_per_tok
    assert sum(map(sum, joined)) == top_k * sum(n for s, r in every for n in STEPS[s][r]) * len(joined)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
