"""Batched sampling with a counter-based random stream.

Each row's randomness is a pure function of (request seed, token position, vocabulary index), so a
seeded request draws the same tokens alone or batched, on any rank and in any CUDA-graph bucket,
and the first token (sampled on prefill) and the rest (sampled on decode) continue one stream.
Only integer and elementwise tensor ops: it runs the same way on CPU and GPU and inside graphs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pd.types import Req, SamplingParams, TopLogprobs

_M32 = 0xFFFFFFFF
_SEED_MASK = (1 << 63) - 1
_CHOICE_STEP = 0x9E3779B97F4A7C15  # odd: distinct choices of one seed get distinct seeds


def choice_seed(seed: int, index: int) -> int:
    """The random stream key of choice ``index`` of a request seeded ``seed`` (``n > 1``): choice 0 keeps
    ``seed`` (so it samples what the request would alone), the others get distinct keys in [0, 2**63)."""
    return (seed + index * _CHOICE_STEP) & _SEED_MASK


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32).

    Products may pass 2**63 and wrap; the low 32 bits kept by the mask are exact either way.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1), ``[B, vocab]`` float32, keyed by ``seeds [B]`` and ``positions [B]`` (int64)."""
    key = _mix32((seeds & _M32) ^ 0x9E3779B9)
    key = _mix32(key ^ ((seeds >> 32) & _M32))
    key = _mix32(key ^ (positions & _M32))[:, None]  # [B, 1]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    return unit_floats(_mix32(_mix32(idx ^ key) ^ (key >> 1)))  # [B, V]


def unit_floats(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes ``h`` (int64 in [0, 2**32)) to float32 strictly inside (0, 1): their top 23 bits, centred
    (k + 0.5) / 2**23, every one exact in float32. (With 24 bits the largest, 2**24 - 0.5, rounds to 2**24:
    u = 1 made a Gumbel key of +inf, and a token whose logit a filter or a grammar had set to -inf won the
    argmax as NaN, once in 2**24 draws per token of the vocabulary.)"""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the logits' device (each ``[B]``)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; <= 0 = off
    top_p: torch.Tensor  # float32; 1 = off
    min_p: torch.Tensor  # float32; 0 = off
    seeds: torch.Tensor  # int64
    positions: torch.Tensor  # int64: index of the token being sampled in its sequence
    all_greedy: bool
    needs_sorting: bool
    needs_min_p: bool

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        positions: Sequence[int],
        device: torch.device | str,
    ) -> SamplingTensors:
        # Two copies without waiting for the device (a blocking copy would wait for every step still queued
        # on the stream, the one in flight of an overlapped decode loop too): float and integer fields.
        floats = [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]]
        ints = [[p.top_k for p in params], list(seeds), list(positions)]
        f = torch.from_numpy(np.array(floats, dtype=np.float32).reshape(3, -1)).to(device, non_blocking=True)
        i = torch.from_numpy(np.array(ints, dtype=np.int64).reshape(3, -1)).to(device, non_blocking=True)
        return cls(
            temperature=f[0],
            top_k=i[0],
            top_p=f[1],
            min_p=f[2],
            seeds=i[1],
            positions=i[2],
            all_greedy=all(p.greedy for p in params),
            needs_sorting=any(p.needs_sorting for p in params),
            needs_min_p=any(p.min_p > 0 and not p.greedy for p in params),
        )


def apply_filters(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits with top-k, top-p and min-p filtered out to -inf. ``[B, V]`` float32."""
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    scaled = logits / temp[:, None]
    if st.needs_min_p:
        probs = scaled.softmax(-1)
        keep = probs >= st.min_p[:, None] * probs.max(-1, keepdim=True).values
        scaled = scaled.masked_fill(~keep, float("-inf"))
    if st.needs_sorting:
        sorted_logits, order = scaled.sort(-1, descending=True)
        vocab = logits.shape[-1]
        rank = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(st.top_k > 0, st.top_k.clamp(max=vocab), torch.full_like(st.top_k, vocab))
        drop = rank >= k[:, None]
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop |= (probs.cumsum(-1) - probs) >= st.top_p[:, None]
        drop[:, 0] = False
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return scaled


def sample(
    logits: torch.Tensor, st: SamplingTensors, logprobs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks one token per row. ``logits [B, V]`` float32 -> (token ids ``[B]`` int64, their
    log-probabilities under the unfiltered distribution ``[B]`` float32). ``logprobs``: ``logits``'
    log_softmax when the caller has it already."""
    logprobs = logits.log_softmax(-1) if logprobs is None else logprobs
    greedy = logits.argmax(-1)
    if st.all_greedy:
        tokens = greedy
    else:
        # Gumbel-max with counter-based noise: argmax(l + g) samples softmax(l) exactly.
        gumbel = -torch.log(-torch.log(uniform_noise(st.seeds, st.positions, logits.shape[-1])))
        drawn = (apply_filters(logits, st) + gumbel).argmax(-1)
        tokens = torch.where(st.temperature > 0, drawn, greedy)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def pair_top_logprobs(
    values: list[list[float]], ids: list[list[int]], rows: Sequence[Req]
) -> list[TopLogprobs]:
    """Each row's ``top_logprobs`` alternatives as (token id, logprob) pairs, best first, from the rows'
    top-k ``values`` and ``ids`` (k at least what any row asks for); ``()`` for rows that ask for none. A token
    that could not have been sampled (logprob -inf: a grammar's mask, a min_tokens stop) is no alternative: it
    is left out, so a row may have fewer (as OpenAI's API allows; JSON cannot carry -inf either)."""
    return [
        tuple(
            (token, lp)
            for token, lp in zip(t[: r.sampling.top_logprobs], v[: r.sampling.top_logprobs])
            if lp > -math.inf
        )
        for r, v, t in zip(rows, values, ids)
    ]
