"""Oracle for EP tests and benchmarks (never used when serving): a dense reference MoE and the
per-layout expert computations a model would run between dispatch and combine.

Expert e is ``silu(x @ A_e) @ B_e`` with weights drawn from a seeded generator, so every rank
builds the same experts. The dense reference runs every expert on every token of one rank; an
EP round trip (dispatch -> local experts -> combine) must give the same result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pd.ep.base import LLDispatch, NormalDispatch
from pd.ep.fp8 import dequant_rows


def random_routing(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random experts per token: ``topk_idx [T, K]`` int64 and softmax weights float32."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    topk_idx = scores.topk(top_k, dim=1).indices
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=generator), dim=1)
    return topk_idx.to(device), weights.to(device)


class ReferenceExperts:
    """``num_experts`` small MLP experts, identical on every rank for the same seed."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.up = (torch.randn(num_experts, hidden, intermediate, generator=g) / math.sqrt(hidden)).to(device)
        self.down = (
            torch.randn(num_experts, intermediate, hidden, generator=g) / math.sqrt(intermediate)
        ).to(device)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x (computed in float32, returned in float32)."""
        return F.silu(x.float() @ self.up[e]) @ self.down[e]

    def dense(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """``sum_k w[t, k] * expert_{idx[t, k]}(x[t])`` over slots != -1, float32 ``[T, H]``."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in topk_idx[topk_idx >= 0].unique().tolist():
            w = (topk_weights * (topk_idx == e)).sum(dim=1)
            rows = w != 0
            out[rows] += w[rows, None] * self.expert(e, x[rows])
        return out

    def normal_outputs(self, d: NormalDispatch, first_local_expert: int) -> torch.Tensor:
        """Expert output per received row in normal mode: the weighted sum over its local experts."""
        y = torch.zeros(d.recv_x.shape, dtype=torch.float32, device=d.recv_x.device)
        for local in range(len(d.num_recv_per_expert)):
            w = (d.recv_topk_weights * (d.recv_topk_idx == local)).sum(dim=1)
            rows = (d.recv_topk_idx == local).any(dim=1)
            y[rows] += w[rows, None] * self.expert(first_local_expert + local, d.recv_x[rows])
        return y.to(d.recv_x.dtype)

    def ll_outputs(
        self,
        d: LLDispatch,
        first_local_expert: int,
        fill: float = float("nan"),
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Unweighted expert outputs in the masked layout, ``[E_local, M * W, H]`` in ``dtype``
        (default: recv_x's; required with FP8 rows, whose experts see ``q * scale``). Rows past
        ``recv_count`` get ``fill`` (NaN by default, so a combine that reads them is caught)."""
        if dtype is None:
            if d.recv_scale is not None:
                raise ValueError("FP8 dispatch results need the output dtype (the config dtype)")
            dtype = d.recv_x.dtype
        y = torch.full(d.recv_x.shape, fill, dtype=dtype, device=d.recv_x.device)
        for local, n in enumerate(d.recv_count.tolist()):
            y[local, :n] = self.expert(first_local_expert + local, ll_rows(d, local, n)).to(dtype)
        return y


def ll_rows(d: LLDispatch, local: int, n: int) -> torch.Tensor:
    """The first n rows of local expert ``local`` as experts see them: ``recv_x[local, :n]``, or
    with FP8 rows their dequantization ``q * scale`` in float32."""
    if d.recv_scale is None:
        return d.recv_x[local, :n]
    return dequant_rows(d.recv_x[local, :n], d.recv_scale[local, :n])
