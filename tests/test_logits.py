"""Logits processing and logprobs against transformers: penalties, logit bias and min_tokens change greedy
output exactly as the rules applied to transformers' logits step by step do; top and prompt logprobs equal
transformers' log_softmax (fp32, abs error < 1e-4), chunked prefill included."""

from __future__ import annotations

import random

import pytest

from pd.config import EngineConfig
from pd.engine.engine import Engine
from pd.types import Req, SamplingParams
from tests.support.clients import random_prompt
from tests.support.oracle import hf_logits, hf_penalized_greedy

MAX_ABS_ERR = 1e-4


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Req]:
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return reqs


CASES = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.7
    ),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=-1.0, top_logprobs=5),
    SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logit_bias=((3, 100.0), (7, 40.0), (9, -5.0))
    ),
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=0.5, top_logprobs=20),
]


@pytest.mark.parametrize("chunk_size", [64, 5])
def test_processing_and_top_logprobs_equal_transformers_batched(chunk_size, tiny_model_dir, hf_model):
    hf = hf_model(tiny_model_dir)
    engine = Engine(EngineConfig(str(tiny_model_dir), page_size=4, chunk_size=chunk_size))
    eos = set(engine.scheduler.eos_token_ids)
    rng = random.Random(chunk_size)
    prompts = [random_prompt(rng, rng.randint(3, 20), engine.model_cfg.vocab_size) for _ in CASES]
    reqs = run(engine, prompts, CASES)
    plain = run(engine, prompts[:1], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)])[0]
    assert reqs[0].output_ids != plain.output_ids, "the penalty changed nothing: a weak test"
    for req, prompt, sp in zip(reqs, prompts, CASES):
        expected, lps = hf_penalized_greedy(hf, prompt, sp, eos)
        assert req.output_ids == expected
        for i, token in enumerate(req.output_ids):
            assert abs(req.output_logprobs[i] - float(lps[i][token])) < MAX_ABS_ERR
        if sp.top_logprobs:
            assert len(req.output_top_logprobs) == len(req.output_ids)
            for top, lp in zip(req.output_top_logprobs, lps):
                assert len(top) == sp.top_logprobs
                ref = lp.topk(sp.top_logprobs)
                assert [v for _, v in top] == pytest.approx(ref.values.tolist(), abs=MAX_ABS_ERR)
                assert all(abs(float(lp[t]) - v) < MAX_ABS_ERR for t, v in top)
        else:
            assert req.output_top_logprobs == []
    assert engine.logits.slots_in_use == 0 and engine.pages_held == 0


def test_min_tokens_masks_eos_until_reached(tiny_model_dir, hf_model):
    hf = hf_model(tiny_model_dir)
    engine = Engine(EngineConfig(str(tiny_model_dir), page_size=4))
    eos = sorted(engine.scheduler.eos_token_ids)
    prompt = random_prompt(random.Random(3), 6, engine.model_cfg.vocab_size)
    # A bias makes EOS the greedy choice at every step; min_tokens holds it off for 5 tokens.
    sp = SamplingParams(temperature=0, max_tokens=12, min_tokens=5, logit_bias=((eos[0], 100.0),))
    req = run(engine, [prompt], [sp])[0]
    expected, _ = hf_penalized_greedy(hf, prompt, sp, set(eos))
    assert req.output_ids == expected and len(expected) == 6 and expected[-1] == eos[0]


@pytest.mark.parametrize("chunk_size", [64, 4])
def test_prompt_logprobs_equal_transformers(chunk_size, tiny_model_dir, hf_model):
    hf = hf_model(tiny_model_dir)
    engine = Engine(EngineConfig(str(tiny_model_dir), page_size=4, chunk_size=chunk_size))
    rng = random.Random(7)
    prompts = [random_prompt(rng, n, engine.model_cfg.vocab_size) for n in (1, 2, 13)]
    params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k) for k in (0, 3, 5)]
    reqs = run(engine, [*prompts, prompts[2]], [*params, SamplingParams(temperature=0, max_tokens=1)])
    assert reqs[-1].prompt_logprobs == []
    for req, prompt, sp in zip(reqs, prompts, params):
        lp = hf_logits(hf, prompt).log_softmax(-1)
        assert len(req.prompt_logprobs) == len(prompt) - 1
        for p, (value, top) in enumerate(req.prompt_logprobs):
            assert abs(value - float(lp[p, prompt[p + 1]])) < MAX_ABS_ERR
            assert len(top) == sp.prompt_logprobs
            assert all(abs(float(lp[p, t]) - v) < MAX_ABS_ERR for t, v in top)
