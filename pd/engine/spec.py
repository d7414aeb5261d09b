"""Which drafted tokens a speculative decoding step keeps (DESIGN.md §11): pure functions on tensors.

A verify step runs the target model over each row's last token and its ``K`` drafts, so it has the
target's logits for ``K + 1`` positions per row: position ``j`` scores the token after draft ``j - 1``.
A row keeps the longest prefix of drafts the target accepts, then one more token from the target (the
correction at the first rejected draft, or the bonus token after all ``K``): ``1 .. K + 1`` tokens.

- ``sample_accept``: greedy rows keep a draft equal to the target's argmax; temperature > 0 with a
  deterministic draft (MTP drafts greedily, so ``q`` is one-hot): the target samples each position with
  pd's own sampler (``pd.sampling.sample``, the stream keyed by (seed, position)) and a draft is
  accepted when it equals the sample. With one-hot ``q`` that *is*
  rejection sampling: draft ``x`` is kept with probability ``p(x) = min(1, p(x) / q(x))``, and on rejection
  the sample is ``p`` restricted to tokens other than ``x``, which is ``normalize(max(0, p - q))``. So the
  output distribution is the target's, and a seeded request emits the very tokens it would without
  speculation (same seed, same positions, same noise).
- ``rejection_sample``: any draft distribution ``q``: keep draft ``x`` when ``u < p(x) / q(x)``, ``u`` a
  uniform from a stream of its own keyed by (seed, position); else sample ``normalize(max(0, p - q))`` with
  the position's sampling noise. Lossless for every ``q`` (Leviathan et al. / Chen et al., 2023).
- ``accept_all``: the benchmark oracle (``--speculative-oracle``): every draft counts as accepted.

Shapes: ``B`` rows, ``K`` drafts per row, ``V`` vocabulary. ``positions [B]`` int64 is the index, in its
sequence, of the first token the step emits (``SamplingTensors.positions`` of a plain decode step); the
token at draft offset ``j`` sits at ``positions + j``. No host synchronisation anywhere (graph-capturable).
Logits processing (penalties, bias, min_tokens) at offset ``j > 0`` must count drafts ``0 .. j - 1`` as
generated: that is the caller's, before these functions see the logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pd.sampling import SamplingTensors, sample, uniform_noise

PAD_TOKEN = -1  # fills ``Verdict.tokens`` past a row's count
# The acceptance uniforms' stream: the request seed with this salt xor-ed into its high word, so they are
# independent of the sampling noise at the same (seed, position).
ACCEPT_STREAM_SALT = 0x2545F491 << 32


@dataclass
class Verdict:
    """What one verify step emits per row.

    ``tokens [B, K + 1]`` int64: the accepted drafts then the target's token, ``PAD_TOKEN`` past ``counts``;
    ``counts [B]`` int64 in ``[1, K + 1]``: tokens emitted (accepted drafts + 1);
    ``logprobs [B, K + 1]`` float32: each emitted token's log-probability under the unfiltered target
    distribution (0 past ``counts``), None where the function is not given logits."""

    tokens: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor | None = None

    @property
    def accepted(self) -> torch.Tensor:
        """``[B]`` int64: drafts accepted per row (``counts - 1``)."""
        return self.counts - 1

    def where(self, rows: torch.Tensor, other: Verdict) -> Verdict:
        """This verdict with ``other``'s rows where ``rows [B]`` bool is True."""
        assert self.logprobs is not None and other.logprobs is not None
        return Verdict(
            torch.where(rows[:, None], other.tokens, self.tokens),
            torch.where(rows, other.counts, self.counts),
            torch.where(rows[:, None], other.logprobs, self.logprobs),
        )


def accept_prefix(
    drafts: torch.Tensor, target: torch.Tensor, logprobs: torch.Tensor | None = None
) -> Verdict:
    """Keeps, per row, the drafts ``[B, K]`` up to the first that differs from the target's token at its
    position (``target [B, K + 1]`` int64), then the target's token there (or its last, the bonus).
    ``logprobs [B, K + 1]``: the target tokens' log-probabilities, passed through masked like the tokens."""
    k = drafts.shape[1]
    if target.shape != (drafts.shape[0], k + 1):
        raise ValueError(
            f"target tokens {tuple(target.shape)} for drafts {tuple(drafts.shape)}: need [B, K + 1]"
        )
    accepted = (drafts == target[:, :k]).long().cumprod(dim=1).sum(dim=1)  # [B]
    counts = accepted + 1
    emitted = torch.arange(k + 1, device=target.device)[None, :] < counts[:, None]  # [B, K + 1]
    tokens = torch.where(emitted, target, torch.full_like(target, PAD_TOKEN))
    if logprobs is not None:
        logprobs = torch.where(emitted, logprobs, torch.zeros_like(logprobs))
    return Verdict(tokens, counts, logprobs)


def per_position(st: SamplingTensors, n: int) -> SamplingTensors:
    """Row parameters ``[B]`` repeated for ``n`` positions per row (``[B * n]``, row-major), the position of
    offset ``j`` advanced by ``j``: what ``pd.sampling.sample`` takes for logits ``[B, n, V]`` flattened."""
    rows = st.positions.shape[0]
    offsets = torch.arange(n, device=st.positions.device).repeat(rows)
    repeated = {
        f.name: getattr(st, f.name).repeat_interleave(n)
        for f in dataclasses.fields(st)
        if isinstance(getattr(st, f.name), torch.Tensor)  # every [B] field; the flags stay
    }
    repeated["positions"] = repeated["positions"] + offsets
    return dataclasses.replace(st, **repeated)


def sample_accept(drafts: torch.Tensor, logits: torch.Tensor, st: SamplingTensors) -> Verdict:
    """Verification of deterministic drafts ``[B, K]`` int64 under each row's sampling parameters ``st``
    (``[B]``; ``positions`` as in the module docstring; greedy rows take the argmax): the target samples all
    ``K + 1`` positions of ``logits [B, K + 1, V]`` float32 with ``pd.sampling.sample``, and the drafts are
    kept up to the first that differs from the sample. Lossless for one-hot drafts (module docstring)."""
    b, n, v = logits.shape
    tokens, logprobs = sample(logits.reshape(b * n, v), per_position(st, n))
    return accept_prefix(drafts, tokens.view(b, n), logprobs.view(b, n))


def acceptance_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) ``[B, K]`` float32 for accepting drafts at ``positions [B, K]`` int64 of rows with
    ``seeds [B]`` int64; a pure function of (seed, position), apart from the sampling noise's stream."""
    b, k = positions.shape
    keys = (seeds ^ ACCEPT_STREAM_SALT).repeat_interleave(k)
    return uniform_noise(keys, positions.reshape(-1), 1).view(b, k)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``normalize(max(0, p - q))`` over the last axis; where ``p <= q`` everywhere (so a rejection had
    probability 0 and only rounding got here) ``p`` itself. Unnormalised weights: sampling normalises."""
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 1e-12, residual, p)


def rejection_sample(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> Verdict:
    """Speculative sampling for any draft distribution.

    ``drafts [B, K]`` int64, drawn from ``draft_probs [B, K, V]`` float32; ``target_probs [B, K + 1, V]``
    float32: the target's distributions after temperature and filters (one-hot at the argmax for a greedy
    row); ``seeds [B]``, ``positions [B]`` int64. Draft ``j`` is accepted when ``u_j < p_j(x) / q_j(x)``
    (``u`` from ``acceptance_uniforms`` at ``positions + j``); at the first rejection the row's last token
    is drawn from ``residual_distribution(p_j, q_j)``, after ``K`` acceptances from ``p_K`` -- both by
    Gumbel-max with ``pd.sampling.uniform_noise`` at that token's position. Returns tokens and counts (no
    logprobs: gather them from the target's log-probabilities if needed)."""
    b, k = drafts.shape
    v = target_probs.shape[-1]
    offsets = torch.arange(k + 1, device=drafts.device)
    at = positions[:, None] + offsets[None, :]  # [B, K + 1] position of each emitted token
    p_draft = target_probs[:, :k].gather(-1, drafts[..., None])[..., 0]  # [B, K]
    q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0]
    u = acceptance_uniforms(seeds, at[:, :k])
    # u < p / q without dividing: a draft its own q gives 0 (a caller's inconsistency) has p / q infinite.
    accept = u * q_draft < p_draft
    accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B]
    # The distribution of each row's last token: the residual at its first rejection, else p_K.
    last = accepted[:, None, None].expand(b, 1, v)
    p_last = target_probs.gather(1, last)[:, 0]  # [B, V]
    q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)  # q_K = 0: p_K itself
    weights = residual_distribution(p_last, q_padded.gather(1, last)[:, 0])
    noise = uniform_noise(seeds, at.gather(1, accepted[:, None])[:, 0], v)
    final = (weights.log() - torch.log(-torch.log(noise))).argmax(-1)  # [B]
    target = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, accepted[:, None], final[:, None])
    counts = accepted + 1
    emitted = offsets[None, :] < counts[:, None]
    return Verdict(torch.where(emitted, target, torch.full_like(target, PAD_TOKEN)), counts)


def accept_all(logits: torch.Tensor) -> Verdict:
    """The benchmark oracle (``--speculative-oracle``): the target's argmax of ``logits [B, K + 1, V]`` at
    every position is emitted, as if every draft had been that argmax (all ``K + 1`` per row)."""
    target = logits.argmax(-1)
    return accept_prefix(target[:, :-1], target, logits.log_softmax(-1).gather(-1, target[..., None])[..., 0])
