import math

import pytest
import torch

from pd.sampling import SamplingTensors, apply_filters, sample, uniform_noise, unit_floats
from pd.types import SamplingParams


def build(params, seeds=None, positions=None):
    n = len(params)
    return SamplingTensors.build(params, seeds or [7] * n, positions or list(range(n)), "cpu")


def test_greedy_is_argmax_with_logprob():
    logits = torch.randn(4, 50)
    tokens, logprobs = sample(logits, build([SamplingParams(temperature=0)] * 4))
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, logits.log_softmax(-1).max(-1).values)


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    logits = torch.randn(3, 200)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    batched, _ = sample(logits, build([p] * 3, seeds=[1, 2, 3], positions=[10, 11, 12]))
    again, _ = sample(logits, build([p] * 3, seeds=[1, 2, 3], positions=[10, 11, 12]))
    assert torch.equal(batched, again)
    for i in range(3):  # alone, each row draws what it drew in the batch
        alone, _ = sample(logits[i : i + 1], build([p], seeds=[i + 1], positions=[10 + i]))
        assert alone.item() == batched[i].item()


def test_different_positions_and_seeds_draw_differently():
    logits = torch.zeros(1, 1000)  # uniform: draws are spread over the vocabulary
    p = SamplingParams(temperature=1.0)
    draws = {sample(logits, build([p], seeds=[5], positions=[pos]))[0].item() for pos in range(40)}
    assert len(draws) > 30
    draws = {sample(logits, build([p], seeds=[s], positions=[0]))[0].item() for s in range(40)}
    assert len(draws) > 30


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(4000, 1)
    p = SamplingParams(temperature=1.0)
    tokens, _ = sample(logits, build([p] * 4000, seeds=list(range(4000)), positions=[3] * 4000))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_uniform_noise_in_open_interval_and_uniformish():
    u = uniform_noise(torch.tensor([1, 2**62 + 5]), torch.tensor([0, 10**9]), 50000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01


def test_noise_never_reaches_1_so_a_forbidden_token_is_never_drawn():
    """Seed 851 at position 0 hashes token 49,475 of 65,536 to the largest 24-bit value, which as (k + 0.5) /
    2**24 rounded to u = 1.0 in float32: its Gumbel key was +inf, and with its logit at -inf (a grammar's
    mask, a top-k or top-p filter) the sum was NaN, which argmax takes. Every other token is allowed here,
    all equally likely: the forbidden one must never come out."""
    vocab, seed, token = 1 << 16, 851, 49475
    u = uniform_noise(torch.tensor([seed]), torch.tensor([0]), vocab)[0]
    assert u[token] == u.max() and u.max() < 1 and u.min() > 0
    assert unit_floats(torch.tensor([0, 2**32 - 1])).tolist() == [2**-24, 1 - 2**-24]
    logits = torch.zeros(1, vocab)
    logits[0, token] = float("-inf")
    drawn, logprob = sample(logits, build([SamplingParams(temperature=1.0)], seeds=[seed], positions=[0]))
    assert drawn.item() != token and math.isfinite(logprob.item())


def test_top_k_top_p_min_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])

    def kept(**kw):
        st = build([SamplingParams(**kw)])
        return (apply_filters(logits, st)[0] > float("-inf")).nonzero().flatten().tolist()

    assert kept(temperature=1.0, top_k=2) == [0, 1]
    probs = logits.softmax(-1)[0]
    # top_p keeps the smallest prefix whose mass reaches p.
    assert kept(temperature=1.0, top_p=float(probs[0]) - 1e-3) == [0]
    assert kept(temperature=1.0, top_p=float(probs[0] + probs[1]) - 1e-3) == [0, 1]
    assert kept(temperature=1.0, top_p=1.0) == [0, 1, 2, 3, 4]
    # min_p keeps tokens with prob >= min_p * max prob.
    ratio = math.exp(-1)  # token 1 has e^-1 of token 0's probability
    assert kept(temperature=1.0, min_p=ratio - 1e-3) == [0, 1]
    # top-k draws never leave the kept set.
    st = build([SamplingParams(temperature=5.0, top_k=2)] * 500, seeds=list(range(500)))
    tokens, _ = sample(logits.repeat(500, 1), st)
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(min_p=2), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-1), "seed"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_sampling_params_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_sampling_params_survive_the_wire():
    """What the proxy sends is what a worker samples with: every field, through serialised bytes."""
    from pd.rpc import worker_pb2 as wpb
    from pd.rpc.sampling import sampling_from_proto, sampling_to_proto
    from pd.types import SamplingParams

    sp = SamplingParams(temperature=0.5, top_p=0.75, top_k=7, min_p=0.125, seed=2**40 + 3, max_tokens=33,
                        stop=("</s>", "##"), stop_token_ids=(5, 9), ignore_eos=True)  # fmt: skip
    wire = wpb.Sampling.FromString(sampling_to_proto(sp).SerializeToString())
    assert sampling_from_proto(wire) == sp and sampling_from_proto(wire).grammar is None
    from pd.grammar import GrammarSpec

    for grammar in (
        GrammarSpec.json_schema({"type": "object", "properties": {"é": {"enum": [1, "x"]}}}, strict=True),
        GrammarSpec.json_object(),
        GrammarSpec.choice(["yes", "", 'a "b"\n']),
        GrammarSpec.regex("[0-9]{3}"),
    ):
        sp = SamplingParams(seed=1, grammar=grammar)
        assert sampling_from_proto(wpb.Sampling.FromString(sampling_to_proto(sp).SerializeToString())) == sp
