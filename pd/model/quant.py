"""Block-FP8 linear weights as DeepSeek-V3/R1 and Kimi-K2 ship them, kept FP8 on the device.

Layout: ``weight [N, K]`` float8_e4m3fn and ``weight_scale_inv [R, ceil(K/bi)]`` float32, one scale per
``[bo, bi]`` block; the dequantized weight is ``value * scale`` over each block. The rows may be made of
*parts* (``gate_up_proj`` is the checkpoint's gate_proj rows then its up_proj rows), each blocked on its
own, so ``R = sum(ceil(N_p / bo))`` and merging two checkpoint tensors never straddles a block.

Two ways to run a projection:
- W8A8 (CUDA, 128x128 blocks, K and every part but the last a multiple of 128): activations are quantized per
  token and 128 columns, then a block-scaled FP8 GEMM (``pd.kernels.fp8``). Rows that end in a partial block
  (DeepSeek's ``kv_a_proj_with_mqa``: 576 rows, the last part of ``q_kv_a_proj``) are padded with zero rows
  at ``prepare`` time.
- weight-only (CPU, or blocks the kernels do not take): the weight is dequantized in float32 and multiplied in
  the activation dtype, so an FP8 checkpoint gives exactly what its dequantized copy gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pd.config import FP8Quant
from pd.kernels import fp8 as kernels  # called through the module: a test swaps in the references
from pd.kernels.fp8 import FP8, FP8_MAX, GROUP, dequant_block

FP8_DTYPE = FP8  # float8_e4m3fn
KERNEL_BLOCK = GROUP  # the weight block and activation group of the W8A8 kernels


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(parts: tuple[int, ...], k: int, block: tuple[int, int]) -> tuple[int, int]:
    """``[sum ceil(N_p/bo), ceil(K/bi)]``: the scales of a weight with row parts ``parts`` and ``k`` columns."""
    bo, bi = block
    return sum(_ceil(p, bo) for p in parts), _ceil(k, bi)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], parts: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``weight [..., N, K]`` float8_e4m3fn times its block ``scale`` -> float32 ``[..., N, K]``.

    ``parts``: the row parts (default: one of N rows), each blocked on its own (see the module docstring)."""
    n, k = weight.shape[-2:]
    parts = parts or (n,)
    if sum(parts) != n or tuple(scale.shape[-2:]) != scale_shape(parts, k, block):
        raise ValueError(
            f"fp8 scales {tuple(scale.shape)} do not fit weight {tuple(weight.shape)} with row parts {parts} "
            f"and block {block}: expected [..., {', '.join(map(str, scale_shape(parts, k, block)))}]"
        )
    out, row, srow = [], 0, 0
    for p in parts:
        sr = _ceil(p, block[0])
        out.append(dequant_block(weight[..., row : row + p, :], scale[..., srow : srow + sr, :], block))
        row, srow = row + p, srow + sr
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def quantize(
    weight: torch.Tensor, block: tuple[int, int], parts: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., N, K]`` -> (float8_e4m3fn ``[..., N, K]``, float32 scales): per block, scale = amax/448
    (1 for an all-zero block), values divided by it and clamped to ±448. ``dequantize`` inverts it up to
    FP8 rounding. Computed on the weight's device."""
    n, k = weight.shape[-2:]
    parts = parts or (n,)
    bo, bi = block
    qs, scales, row = [], [], 0
    for p in parts:
        w = weight[..., row : row + p, :].float()
        no, ni = _ceil(p, bo), _ceil(k, bi)
        padded = w.new_zeros(*w.shape[:-2], no * bo, ni * bi)
        padded[..., :p, :k] = w.abs()
        amax = padded.unflatten(-1, (ni, bi)).unflatten(-3, (no, bo)).amax(dim=(-3, -1))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        spread = scale.repeat_interleave(bo, -2)[..., :p, :].repeat_interleave(bi, -1)[..., :k]
        qs.append((w / spread).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
        scales.append(scale)
        row += p
    if len(parts) == 1:
        return qs[0], scales[0]
    return torch.cat(qs, dim=-2), torch.cat(scales, dim=-2)


def w8a8_capable(quant: FP8Quant, device: torch.device, k: int, parts: tuple[int, ...]) -> bool:
    """Whether a weight with ``k`` columns and row ``parts`` runs on the W8A8 kernels on ``device``: CUDA,
    128x128 blocks, K a multiple of 128, and every part but the last a multiple of 128 (then the parts' own
    blocks are the whole weight's: scale row ``r // 128`` for weight row ``r``, as the kernels read them)."""
    if device.type != "cuda" or quant.block != (KERNEL_BLOCK, KERNEL_BLOCK) or k % KERNEL_BLOCK:
        return False
    return all(p % KERNEL_BLOCK == 0 for p in parts[:-1])


class Fp8Linear(nn.Module):
    """A bias-free linear layer with block-FP8 weights: ``weight [N, K]`` float8_e4m3fn and
    ``weight_scale_inv`` float32 (module docstring). Call ``prepare()`` once the weights are loaded."""

    def __init__(
        self, in_features: int, out_features: int, quant: FP8Quant, parts: tuple[int, ...] | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        self.parts = parts or (out_features,)
        if sum(self.parts) != out_features:
            raise ValueError(f"row parts {self.parts} do not add up to {out_features} rows")
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(self.parts, in_features, quant.block), dtype=torch.float32),
            requires_grad=False,
        )
        self.w8a8 = False

    def prepare(self) -> None:
        """Chooses W8A8 or weight-only for the loaded weight; pads a partial last block with zero rows for
        the kernels (the output is cut back to ``out_features``)."""
        w = self.weight
        self.w8a8 = w8a8_capable(self.quant, w.device, self.in_features, self.parts)
        pad = -self.out_features % KERNEL_BLOCK
        if self.w8a8 and pad:
            self.weight = nn.Parameter(F.pad(w.data.view(torch.uint8), (0, 0, 0, pad)).view(FP8_DTYPE), False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[N, K]`` in ``dtype``, dequantized in float32."""
        w = self.weight[: self.out_features]
        return dequantize(w, self.weight_scale_inv, self.quant.block, self.parts).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.w8a8:
            return F.linear(x, self.dequantized(x.dtype))
        y = kernels.block_fp8_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv)
        return y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block={self.quant.block}, w8a8={self.w8a8}"


def linear(
    in_features: int, out_features: int, quant: FP8Quant | None, parts: tuple[int, ...] | None = None
) -> nn.Module:
    """``nn.Linear`` (bias-free, the activation dtype) or, with ``quant``, an ``Fp8Linear``."""
    if quant is None:
        return nn.Linear(in_features, out_features, bias=False)
    return Fp8Linear(in_features, out_features, quant, parts)


def prepare_weights(model: nn.Module) -> None:
    """Runs every module's ``prepare()`` hook (after the weights are loaded or drawn)."""
    for m in model.modules():
        if m is not model and hasattr(m, "prepare") and callable(m.prepare):
            m.prepare()
