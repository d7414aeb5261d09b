"""Building blocks: RMSNorm, rotary embedding, the SiLU-gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from pd.config import FP8Quant, RopeConfig
from pd.kernels.moe import silu_and_mul
from pd.model.quant import linear


def _flashinfer_norm():
    try:
        import flashinfer.norm
    except ImportError:
        return None
    return flashinfer.norm


class RMSNorm(nn.Module):
    """RMSNorm; with ``residual``, first adds ``x`` into the residual stream and normalises the sum.

    On CUDA (bf16/fp16) FlashInfer's fused kernels run it in one kernel (the fused form updates
    ``x`` and ``residual`` in place); elsewhere plain torch, computed in float32 as transformers does.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # FlashInfer's kernels refuse zero rows (a prefill step in which no request samples has no logits rows).
        fused = _FUSED_NORM if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and len(x) else None
        if fused is not None:
            x = x.contiguous()
            if residual is None:
                return fused.rmsnorm(x, self.weight, self.eps)
            fused.fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


_FUSED_NORM = _flashinfer_norm()


class RotaryEmbedding(nn.Module):
    """Rotary embedding over ``dim`` channels with a cos/sin table for ``max_positions`` positions.

    With ``interleave`` (DeepSeek's layout) channel pairs are (0,1), (2,3), ...; otherwise (i, i+d/2).
    Either way the rotated output is laid out as ``[first of each pair..., second of each pair...]``,
    the same for queries and keys, so their dot products are those of the checkpoint's layout.
    """

    cos_sin: torch.Tensor  # buffer [max_positions, dim] float32: cos of the dim/2 frequencies, then sin

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope, self.dim, self.max_positions = rope, dim, max_positions
        self.interleave = rope.interleave
        self.register_buffer(
            "cos_sin", torch.empty(max_positions, dim, dtype=torch.float32), persistent=False
        )
        if self.cos_sin.device.type != "meta":
            self.build_tables()

    def build_tables(self) -> None:
        """Fills the cos/sin table ``[max_positions, dim]`` float32 (again after ``to_empty``)."""
        freqs = (
            torch.arange(self.max_positions, dtype=torch.float32)[:, None]
            * self.rope.inv_freq(self.dim)[None, :]
        )
        scale = self.rope.cos_sin_scale
        self.cos_sin = torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1).to(self.cos_sin.device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotates ``x [T, heads, dim]`` at ``positions [T]``; math in float32."""
        cos, sin = self.cos_sin[positions][:, None, :].chunk(2, dim=-1)  # one gather
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def rotate_pair(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA's rotary parts in one pass: ``q [T, heads, dim]`` and the shared ``k [T, dim]`` at ``positions``
        (the same values as rotating each: half the launches of two calls)."""
        both = self(positions, torch.cat([q, k[:, None, :]], dim=1))  # [T, heads + 1, dim]
        return both[:, :-1], both[:, -1]


class MLP(nn.Module):
    """SiLU-gated MLP; gate and up projections stored merged as ``gate_up_proj [2I, H]`` (with ``quant``,
    block-FP8, the two halves blocked apart)."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant: FP8Quant | None = None) -> None:
        super().__init__()
        i = intermediate_size
        self.gate_up_proj = linear(hidden_size, 2 * i, quant, parts=(i, i))
        self.down_proj = linear(i, hidden_size, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
