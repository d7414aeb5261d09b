"""The decode graphs' steps (``pd.engine.decode_graph``) as the engine uses them, on CPU: the graphs run
uncaptured on their static buffers (``capture=False``), so an engine taking the graph path, and the
overlapped loop on it (``Engine.step``: step N + 1 launched before step N's tokens are read), must produce
exactly what the eager path produces (which tests/test_logits.py checks against transformers): greedy rows
take the graph's tokens and their top logprobs from its log_softmax, sampled rows reuse it, processed rows
recompute it after processing. The captured graphs themselves are checked on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from pd.config import EngineConfig, ModelConfig
from pd.engine.decode_graph import DecodeGraphs
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.types import SamplingParams
from tests.support.clients import random_prompt

CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    "greedy, top logprobs": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, top_logprobs=5),
    "sampled, top logprobs": SamplingParams(
        temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True, top_logprobs=3, seed=7
    ),
    "greedy, penalties, top logprobs": SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5, top_logprobs=2
    ),
    "sampled, penalties, bias": SamplingParams(
        temperature=0.9,
        seed=5,
        max_tokens=6,
        ignore_eos=True,
        frequency_penalty=0.8,
        presence_penalty=0.4,
        logit_bias=((3, 4.0), (17, -2.0)),
    ),
}


def graph_engine(cfg: EngineConfig) -> tuple[Engine, list[int]]:
    """An engine whose runner has the decode graphs, uncaptured, one bucket per batch size (a padded bucket
    changes float32 results in the last bits on CPU); returns it and the list of batch sizes each replay
    appends to."""
    runner = ModelRunner(cfg, ModelConfig.from_dir(cfg.model_path))  # CPU: no graphs of its own
    graphs = DecodeGraphs(
        runner.model,
        runner.attn,
        runner.pool,
        range(1, cfg.max_running + 1),
        runner.context_len,
        capture=False,
    )
    replays: list[int] = []
    replay = graphs.graphs.replay
    graphs.graphs.replay = lambda bs: (replays.append(bs), replay(bs))[1]  # type: ignore[method-assign]
    runner.graphs = graphs
    return Engine(cfg, runner=runner), replays


def outputs(engine: Engine, prompts, params):
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return [(r.output_ids, r.output_logprobs, r.output_top_logprobs) for r in reqs]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("mix", [*CASES, "all in one batch"])
def test_graph_path_outputs_equal_the_eager_path(tiny_model_dir, mix, overlap):
    params = list(CASES.values()) if mix == "all in one batch" else [CASES[mix]] * 3
    rng = random.Random(0)
    prompts = [random_prompt(rng, 12 + 3 * i) for i in range(len(params))]
    cfg = EngineConfig(model_path=str(tiny_model_dir), page_size=16, max_running=8, overlap=overlap)
    eager = outputs(Engine(cfg), prompts, params)
    engine, replays = graph_engine(cfg)
    assert engine.overlap == overlap
    assert outputs(engine, prompts, params) == eager
    assert len(replays) >= 5  # every decode step went through the graphs
    for sp, (ids, _, top) in zip(params, eager):  # the alternatives were there to compare
        assert len(top) == (len(ids) if sp.top_logprobs else 0)
        assert all(len(alternatives) == sp.top_logprobs for alternatives in top)


def test_overlapped_loop_ends_requests_where_the_serial_one_does(tiny_model_dir):
    """Requests ending at different steps (max_tokens, a stop token met on the way), arriving while others
    decode, one aborted mid-run, under a pool small enough to preempt: the overlapped loop emits what the
    serial one does, token for token, and every page is free at the end (the token an ended request ran one
    step too far is dropped; its pages wait for that step)."""
    rng = random.Random(1)
    prompts = [random_prompt(rng, 20 + 7 * i) for i in range(6)]
    cfg = EngineConfig(
        model_path=str(tiny_model_dir), page_size=4, num_pages=28, max_running=8, prefix_cache=False
    )
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    probe = Engine(dataclasses.replace(cfg, overlap=False)).generate([prompts[4]], base)[0].output_ids
    params = [dataclasses.replace(base, max_tokens=5 + 3 * i) for i in range(3)] + [base] * 3
    params[4] = dataclasses.replace(base, stop_token_ids=(probe[3],))  # ends on its 4th token or earlier

    def run(engine: Engine) -> tuple[list[list[int]], list[str | None]]:
        preempt = engine.scheduler._preempt
        preempted: list[int] = []
        engine.scheduler._preempt = lambda r: (preempted.append(r.rid), preempt(r))[1]  # type: ignore[method-assign]
        reqs = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], params)]
        emitted: dict[int, list[int]] = {}
        ends: list[int] = []
        while engine.has_work():
            for out in engine.step():
                emitted.setdefault(out.req.rid, []).extend(out.token_ids)
                if out.finish_reason is not None:
                    ends.append(out.req.rid)
            if len(reqs) == 3 and len(reqs[0].output_ids) >= 2:  # arrive while the first ones decode
                reqs += [engine.add_request(p, sp) for p, sp in zip(prompts[3:], params[3:])]
            if len(reqs) > 3 and len(reqs[3].output_ids) >= 4 and not reqs[3].finished:
                engine.abort(reqs[3])
        assert preempted, "the pool is small enough to preempt"
        # What was emitted is what each request holds: nothing after its end, each end once (the abort's
        # is the caller's to report).
        assert [emitted.get(r.rid, []) for r in reqs] == [r.output_ids for r in reqs]
        assert sorted(ends) == sorted(r.rid for r in reqs if r is not reqs[3])
        return [r.output_ids for r in reqs], [r.finish_reason and r.finish_reason.value for r in reqs]

    serial = run(Engine(dataclasses.replace(cfg, overlap=False)))
    engine, _ = graph_engine(cfg)
    assert engine.overlap
    # The pages of the step in flight are never free while it is (a transfer could take one and write it).
    launch, engine.runner.launch = engine.runner.launch, None  # type: ignore[assignment]
    flying: list[set[int]] = []

    def launched(batch, prev=None, logits=None):
        flying[:] = [{p for r in batch.reqs for p in r.pages}]
        return launch(batch, prev, logits)

    engine.runner.launch = launched  # type: ignore[method-assign]
    step = engine.step

    def checked_step():
        outputs = step()
        if engine._inflight is not None:
            assert flying[0].isdisjoint(engine.allocator._free)
        return outputs

    engine.step = checked_step  # type: ignore[method-assign]
    ids, reasons = run(engine)
    assert (ids, reasons) == serial
    assert [len(i) for i in ids[:4]] == [5, 8, 11, 4] and reasons[3:5] == ["abort", "stop"]
    assert len(ids[4]) <= 4 and ids[4][-1] == probe[3]
    assert engine.allocator.num_used == 0  # every page freed once (a double free raises)


def test_overlap_is_off_where_it_cannot_run(tiny_model_dir):
    """No decode graphs (CPU default), or --no-overlap: the engine steps one at a time."""
    cfg = EngineConfig(model_path=str(tiny_model_dir), page_size=16, max_running=4)
    assert not Engine(cfg).overlap
    assert not graph_engine(dataclasses.replace(cfg, overlap=False))[0].overlap
    assert graph_engine(cfg)[0].overlap


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_min_tokens_counts_the_token_in_flight(tiny_model_dir, overlap):
    """EOS biased to the top: a request ends on its first token unless min_tokens holds it back. Launched on the
    graphs, with a step in flight (overlapped) the token not yet recorded on the host counts too: it ends on
    token min_tokens + 1, as eager decoding does."""
    cfg = EngineConfig(model_path=str(tiny_model_dir), page_size=16, max_running=4, overlap=overlap)
    eager = Engine(dataclasses.replace(cfg, overlap=False))
    [eos] = sorted(eager.scheduler.eos_token_ids)[:1]
    sp = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias=((eos, 100.0),))
    prompts = [random_prompt(random.Random(2), n) for n in (9, 14)]
    want = outputs(eager, prompts, [sp, sp])
    engine, _ = graph_engine(cfg)
    assert outputs(engine, prompts, [sp, sp]) == want
    assert [len(ids) for ids, _, _ in want] == [6, 6] and all(ids[-1] == eos for ids, _, _ in want)


def test_launched_step_refuses_processing_without_the_engines_processor(tiny_model_dir):
    """A penalty request's decode step without the engine's LogitsProcessor is refused, not run unprocessed."""
    engine, _ = graph_engine(EngineConfig(model_path=str(tiny_model_dir), page_size=16, max_running=2))
    sp = SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3)
    req = engine.add_request(random_prompt(random.Random(3), 8), sp)
    engine.step()  # its prompt
    batch = engine.scheduler.schedule()
    assert batch is not None and batch.mode.value == "decode"
    with pytest.raises(ValueError, match="LogitsProcessor"):
        engine.runner.run(batch)
    assert engine.runner.run(batch, engine.logits).tokens[0] is not None
    engine.abort(req)
