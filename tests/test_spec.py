"""Acceptance of drafted tokens (pd.engine.spec): exact greedy cases, and statistical tests that speculative
sampling keeps the target's distribution -- over whole generated sequences, on a 5-token vocabulary with a
bigram target and several drafts -- which a deliberately wrong sampler fails."""

from __future__ import annotations

import math

import pytest
import torch

from pd.engine import spec
from pd.engine.spec import PAD_TOKEN, accept_all, rejection_sample, sample_accept
from pd.sampling import SamplingTensors, sample
from pd.types import SamplingParams

V, K = 5, 2  # vocabulary, drafts per step
LENGTH = 3  # tokens generated per sequence: K + 1, so the bonus token after K acceptances is covered
N = 40_000  # sequences per test
START = 7  # position of the first generated token
FIRST = 0  # the token the sequences continue


# ---- exact cases ----


def test_greedy_acceptance_keeps_the_matching_prefix_and_the_targets_next_token():
    target = torch.tensor([[1, 2, 3, 7], [1, 2, 3, 7], [1, 2, 3, 7], [5, 2, 3, 7]])
    drafts = torch.tensor([[1, 2, 3], [1, 9, 3], [1, 2, 9], [4, 2, 3]])
    logits = torch.full((4, 4, 10), -5.0).scatter(-1, target[..., None], 5.0)
    greedy = SamplingTensors.build([SamplingParams(temperature=0)] * 4, [0] * 4, [START] * 4, "cpu")
    v = sample_accept(drafts, logits, greedy)
    assert v.counts.tolist() == [4, 2, 3, 1]
    assert v.accepted.tolist() == [3, 1, 2, 0]
    assert v.tokens.tolist() == [[1, 2, 3, 7], [1, 2, -1, -1], [1, 2, 3, -1], [5, -1, -1, -1]]
    assert v.logprobs is not None
    want = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
    emitted = v.tokens != PAD_TOKEN
    assert torch.equal(v.logprobs[emitted], want[emitted]) and (v.logprobs[~emitted] == 0).all()
    # A match after a mismatch counts for nothing (row 1: draft 3 equals the target's 3).


def test_the_oracle_accepts_every_position():
    logits = torch.randn(3, K + 1, V, generator=torch.Generator().manual_seed(0))
    v = accept_all(logits)
    assert v.counts.tolist() == [K + 1] * 3 and torch.equal(v.tokens, logits.argmax(-1))


def test_seeded_sample_acceptance_emits_the_plain_samplers_tokens():
    """With one-hot drafts a seeded row emits what pd's sampler gives at those positions without drafts."""
    gen = torch.Generator().manual_seed(1)
    b = 64
    logits = torch.randn(b, K + 1, 50, generator=gen) * 2
    params = [SamplingParams(temperature=0.8, top_k=20, seed=s) for s in range(b)]

    def tensors(offset: int) -> SamplingTensors:  # row i samples position START + i + offset
        return SamplingTensors.build(params, list(range(b)), [START + i + offset for i in range(b)], "cpu")

    st = tensors(0)
    plain = torch.stack([sample(logits[:, j], tensors(j))[0] for j in range(K + 1)], dim=1)
    # Drafts equal to the samples, except some rows' second: those rows stop after it.
    drafts = plain[:, :K].clone()
    drafts[::3, 1] = (drafts[::3, 1] + 1) % 50
    v = sample_accept(drafts, logits, st)
    assert v.counts.tolist() == [2 if i % 3 == 0 else 3 for i in range(b)]
    emitted = v.tokens != PAD_TOKEN
    assert torch.equal(v.tokens[emitted], plain[emitted])
    # Alone or batched, a row's verdict is the same.
    one = sample_accept(drafts[5:6], logits[5:6], SamplingTensors.build(params[5:6], [5], [START + 5], "cpu"))
    assert torch.equal(one.tokens[0], v.tokens[5])


def test_rejection_sampling_is_batch_invariant():
    gen = torch.Generator().manual_seed(2)
    p = torch.rand(8, K + 1, V, generator=gen).softmax(-1)
    q = torch.rand(8, K, V, generator=gen).softmax(-1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=gen).view(8, K)
    seeds, positions = torch.arange(8) * 1000, torch.arange(8) + START
    batched = rejection_sample(drafts, q, p, seeds, positions)
    for i in range(8):
        alone = rejection_sample(
            drafts[i : i + 1], q[i : i + 1], p[i : i + 1], seeds[i : i + 1], positions[i : i + 1]
        )
        assert torch.equal(alone.tokens[0], batched.tokens[i]), i


# ---- the statistical tests ----


def chi_square_critical(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at upper-tail probability ~1e-6 (Wilson-Hilferty; z is the normal quantile)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of counts ``observed`` against cell probabilities ``probs`` and its degrees of
    freedom; a cell the target gives probability 0 must never be observed."""
    assert observed[probs == 0].sum() == 0, "a token the target never emits was emitted"
    live = probs > 0
    expected = observed.sum() * probs[live]
    stat = float(((observed[live].double() - expected) ** 2 / expected).sum())
    return stat, int(live.sum()) - 1


def bigram(seed: int, sharpness: float) -> torch.Tensor:
    """A random next-token table ``[V, V]`` (row: previous token); larger ``sharpness``, peakier rows."""
    logits = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * sharpness
    return logits.softmax(-1)


TARGET = bigram(10, 0.7)  # fairly flat: every 3-token sequence has an expected count well above 5


def sequence_probs(table: torch.Tensor) -> torch.Tensor:
    """``[V ** LENGTH]``: each sequence's probability of following ``FIRST`` under a bigram ``table``."""
    probs = table[FIRST]
    for _ in range(LENGTH - 1):
        probs = (probs[..., None] * table).reshape(-1, V)
    return probs.reshape(-1)


def generate(step) -> torch.Tensor:
    """``N`` sequences of ``LENGTH`` tokens after ``FIRST``, made by speculative steps: ``step(last [N],
    positions [N]) -> Verdict`` drafts from each row's last token and verifies; its tokens are appended.
    Returns ``[N, LENGTH]``."""
    out = torch.full((N, LENGTH), -1)
    filled = torch.zeros(N, dtype=torch.int64)
    last = torch.full((N,), FIRST)
    rows = torch.arange(N)
    while (filled < LENGTH).any():
        verdict = step(last, START + filled)
        take = torch.minimum(verdict.counts, LENGTH - filled)
        for j in range(K + 1):
            r = rows[j < take]
            out[r, filled[r] + j] = verdict.tokens[r, j]
        filled = filled + take
        last = out[rows, filled - 1]
    return out


def histogram(seqs: torch.Tensor) -> torch.Tensor:
    index = (seqs * (V ** torch.arange(LENGTH - 1, -1, -1))).sum(-1)
    return torch.bincount(index, minlength=V**LENGTH)


def drafted(q_table: torch.Tensor, last: torch.Tensor, gen: torch.Generator | None):
    """``K`` chained drafts per row from a bigram ``q_table``: sampled with ``gen``, or the argmax (one-hot
    ``q``) when it is None. Returns drafts ``[N, K]`` and their distributions ``[N, K, V]``."""
    drafts, qs, prev = [], [], last
    for _ in range(K):
        q = q_table[prev]
        if gen is None:
            d = q.argmax(-1)
            q = torch.nn.functional.one_hot(d, V).float()
        else:
            d = torch.multinomial(q, 1, generator=gen)[:, 0]
        drafts.append(d)
        qs.append(q)
        prev = d
    return torch.stack(drafts, 1), torch.stack(qs, 1)


SEEDS = torch.arange(N) * 7919 + 12345
DRAFTS = {
    "exact": (TARGET, True),  # q = p: every draft accepted
    "different": (bigram(11, 1.5), True),
    "peaked": (bigram(12, 4.0), True),  # mass where the target has little
    "one-hot": (bigram(13, 1.0), False),  # a deterministic (greedy) drafter, as MTP is
}


def rejection_step(q_table: torch.Tensor, sampled: bool):
    gen = torch.Generator().manual_seed(99)

    def step(last: torch.Tensor, positions: torch.Tensor):
        drafts, q = drafted(q_table, last, gen if sampled else None)
        p = TARGET[torch.cat([last[:, None], drafts], 1)]  # [N, K + 1, V]: the target after each prefix
        return rejection_sample(drafts, q, p, SEEDS, positions)

    return step


def assert_target_distribution(seqs: torch.Tensor, probs: torch.Tensor) -> None:
    stat, df = chi_square(histogram(seqs), probs)
    assert stat < chi_square_critical(df), (stat, df, chi_square_critical(df))
    first, _ = chi_square(torch.bincount(seqs[:, 0], minlength=V), probs.view(V, -1).sum(-1))
    assert first < chi_square_critical(V - 1), first


@pytest.mark.parametrize("draft", sorted(DRAFTS))
def test_rejection_sampling_keeps_the_target_distribution(draft):
    seqs = generate(rejection_step(*DRAFTS[draft]))
    assert_target_distribution(seqs, sequence_probs(TARGET))


def test_sample_acceptance_keeps_the_filtered_target_distribution():
    """One-hot drafts verified by pd's sampler, temperature and top-k on: the sequences follow the target
    after temperature and top-k (tokens outside the top 3 never appear)."""
    temperature, top_k = 0.7, 3
    logits_table = TARGET.log()
    params = [SamplingParams(temperature=temperature, top_k=top_k)] * N  # seeds: SEEDS
    q_table = bigram(13, 1.0)

    def step(last: torch.Tensor, positions: torch.Tensor):
        drafts, _ = drafted(q_table, last, None)
        st = SamplingTensors.build(params, SEEDS.tolist(), positions.tolist(), "cpu")
        return sample_accept(drafts, logits_table[torch.cat([last[:, None], drafts], 1)], st)

    scaled = logits_table / temperature
    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
    filtered = scaled.masked_fill(scaled < kth, float("-inf")).softmax(-1)
    assert_target_distribution(generate(step), sequence_probs(filtered))


@pytest.mark.parametrize(
    "wrong",
    [
        # The classic mistake: after a rejection, sample the target itself instead of the residual.
        ("residual_distribution", lambda p, q: p),
        # Accept every draft.
        ("acceptance_uniforms", lambda seeds, positions: torch.zeros(positions.shape)),
    ],
    ids=["residual-is-p", "always-accept"],
)
def test_a_wrong_sampler_fails_the_test(wrong, monkeypatch):
    name, replacement = wrong
    monkeypatch.setattr(spec, name, replacement)
    seqs = generate(rejection_step(*DRAFTS["different"]))
    with pytest.raises(AssertionError):
        assert_target_distribution(seqs, sequence_probs(TARGET))
