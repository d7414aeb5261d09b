"""Block-FP8 (DeepSeek-V3 / R1, Kimi-K2 checkpoints) W8A8 GEMMs: dense linear layers and routed experts.

Formats (FP8 = float8_e4m3fn, largest finite value ``FP8_MAX`` = 448):

- weights: FP8 ``[..., N, K]`` with float32 ``scale [..., ceil(N/128), ceil(K/128)]`` (the checkpoint's
  ``weight_scale_inv``): the weight is ``fp8 * scale`` over each 128x128 block.
- activations: quantized on the fly per row per 128 columns (1x128 groups): with ``a = max(amax,
  1e-10)`` (an all-zero group gets a tiny finite scale and zeros), ``scale = a / 448`` and ``q =
  clamp(x * (448 / a), ±448)`` rounded to nearest even (multiplying by the group's reciprocal: one
  division per group, not per value; within an ulp of ``x / scale`` before the FP8 rounding).
  ``x ≈ q * scale``.

GEMMs dequantize nothing: FP8 x FP8 products accumulate in float32 one 128-wide K group at a time,
scaled by the activation row scale and the weight block scale. Outputs are in the activations' dtype.

Each op has a torch reference (``*_ref``: emulates the quantization exactly, dequantizes in float32,
multiplies in float32; runs anywhere) and a fast path the plain name dispatches to on CUDA
(``backend`` as in kernels/moe.py: "auto", "triton", "torch"):

- ``quant_groups``: a Triton kernel.
- ``block_fp8_linear``: on SM90 ``torch._scaled_mm`` with DeepSeek block scaling (cuBLASLt),
  otherwise (or with backend="triton") a Triton GEMM.
- ``fused_moe_fp8`` / ``masked_moe_fp8``: Triton grouped GEMMs (kernels/fp8_triton.py) with the
  layouts, launch structure and guarantees of kernels/moe.py's ``fused_moe`` / ``masked_moe``.

Shape requirements of the GEMMs: K and N multiples of 128 (block_fp8_linear), H and I multiples of
128 (experts); a model pads other widths at load time. On CPU the model's FP8 path is weight-only
(``dequant_block``) and does not use these W8A8 references.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from pd.kernels.moe import HAS_TRITON, Backend, _device_name, _use_triton, check_routing, silu_and_mul_ref
from pd.kernels.moe_config import MoeConfig, fp8_default_config, fused_fp8_config, masked_fp8_config

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-10
GROUP = 128  # activation group and weight block edge of the GEMMs
# torch._scaled_mm gets M padded to this many rows (its M-major activation scales then have a
# 16-byte aligned leading dimension); the extra rows are zeros and their outputs are dropped.
SCALED_MM_ROW_ALIGN = 4

ScaleLayout = Literal["row", "col"]


@functools.cache
def _triton_ops():
    from pd.kernels import fp8_triton

    return fp8_triton


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Quantization helpers
# ---------------------------------------------------------------------------------------------


def quant_groups_ref(
    x: torch.Tensor, group: int = GROUP, *, scale_layout: ScaleLayout = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`quant_groups` (float32 math, IEEE divisions, as the kernel)."""
    _check_quant_args(x, group, scale_layout)
    k = x.shape[-1]
    groups = _cdiv(k, group)
    xf = torch.nn.functional.pad(x.float(), (0, groups * group - k)).unflatten(-1, (groups, group))
    amax = xf.abs().amax(-1).clamp_min(AMAX_FLOOR)
    # Tensor by tensor: torch computes ``448 / amax`` as reciprocal(amax) * 448, and on CUDA ``amax /
    # 448`` as amax * (1 / 448), each an ulp away from the IEEE quotient the kernel computes.
    fp8_max = torch.full_like(amax, FP8_MAX)
    q = (xf * (fp8_max / amax)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2)[..., :k]
    scale = amax / fp8_max
    if scale_layout == "col":
        scale = scale.t().contiguous().t()
    return q, scale


def quant_groups(
    x: torch.Tensor,
    group: int = GROUP,
    *,
    scale_layout: ScaleLayout = "row",
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x ``group`` quantization of ``x [..., K]`` (bf16/fp16/fp32) along its last dim.

    Returns ``q`` float8_e4m3fn of x's shape and ``scale`` float32 ``[..., ceil(K/group)]`` with
    ``x ≈ q * scale`` per group (the last group may be partial). ``scale_layout="col"`` (2-D x
    ``[M, K]`` only): the scale ``[M, G]`` is M-major in memory (strides ``(1, M)``), as
    ``torch._scaled_mm`` wants activation block scales. The Triton path needs ``group`` a power of
    two >= 16. Fresh tensors; no host sync.
    """
    _check_quant_args(x, group, scale_layout)
    if not _use_triton(x, backend):
        return quant_groups_ref(x, group, scale_layout=scale_layout)
    if group < 16 or group & (group - 1):
        raise ValueError(f"the Triton quant_groups needs a power-of-two group >= 16, got {group}")
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(rows.shape, dtype=FP8, device=x.device)
    groups = _cdiv(k, group)
    if scale_layout == "col":
        scale = torch.empty(groups, rows.shape[0], dtype=torch.float32, device=x.device).t()
    else:
        scale = torch.empty(rows.shape[0], groups, dtype=torch.float32, device=x.device)
    _triton_ops().quant_rows(rows[None], q[None], scale[None], group)
    if scale_layout == "row":
        scale = scale.view(*x.shape[:-1], groups)
    return q.view(x.shape), scale


def _check_quant_args(x: torch.Tensor, group: int, scale_layout: str) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quant_groups takes bf16/fp16/fp32 activations, got {x.dtype}")
    if x.dim() < 1 or group < 1:
        raise ValueError(f"quant_groups needs x [..., K] and group >= 1, got {tuple(x.shape)}, {group}")
    if scale_layout not in ("row", "col"):
        raise ValueError(f"scale_layout must be 'row' or 'col', got {scale_layout!r}")
    if scale_layout == "col" and x.dim() != 2:
        raise ValueError(f"scale_layout='col' needs 2-D x [M, K], got {tuple(x.shape)}")


def dequant_groups(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """``q [..., K]`` FP8 times ``scale [..., ceil(K/group)]`` per group -> float32 ``[..., K]``."""
    k = q.shape[-1]
    if tuple(scale.shape) != (*q.shape[:-1], _cdiv(k, group)):
        raise ValueError(f"scale {tuple(scale.shape)} does not fit q {tuple(q.shape)} in groups of {group}")
    return q.float() * scale.float().repeat_interleave(group, -1)[..., :k]


def dequant_block(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (GROUP, GROUP)
) -> torch.Tensor:
    """``w [..., N, K]`` FP8 times ``scale [..., ceil(N/bo), ceil(K/bi)]`` per ``block=(bo, bi)``
    (edge blocks may be partial) -> float32 ``[..., N, K]``."""
    bo, bi = block
    n, k = w.shape[-2:]
    expected = (*w.shape[:-2], _cdiv(n, bo), _cdiv(k, bi))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"block scale {tuple(scale.shape)} does not fit weight {tuple(w.shape)}: expected {expected}"
        )
    expanded = scale.float().repeat_interleave(bo, -2)[..., :n, :].repeat_interleave(bi, -1)[..., :k]
    return w.float() * expanded


# ---------------------------------------------------------------------------------------------
# Dense linear layers
# ---------------------------------------------------------------------------------------------


def block_fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`block_fp8_linear`: x quantized as the kernel does, both operands
    dequantized to float32, one float32 matmul, rounded to x's dtype."""
    _check_linear(x, w, w_scale)
    a = dequant_groups(*quant_groups_ref(x))
    return (a @ dequant_block(w, w_scale).t()).to(x.dtype)


def block_fp8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """``y = x . W^T`` -> ``[T, N]`` in x's dtype, W8A8 with x quantized per 1x128 group.

    x: ``[T, K]`` bf16 (fp16/fp32 accepted), any T >= 0; w: ``[N, K]`` float8_e4m3fn, contiguous;
    w_scale: ``[N/128, K/128]`` float32, contiguous (the checkpoint's ``weight_scale_inv``).
    Requires K % 128 == 0 and N % 128 == 0 (pad N at load time).

    On CUDA ("auto"): ``torch._scaled_mm`` with DeepSeek block scaling when the GPU is SM90, x is
    bf16 and K/128 is a multiple of 4 (cuBLASLt reads the 128x128 weight scales with a 16-byte
    aligned leading dimension); T is padded to a multiple of ``SCALED_MM_ROW_ALIGN`` inside (the
    result is a view of the first T rows). Otherwise, and with backend="triton", a Triton GEMM.
    No host sync on either path (CUDA-graph safe); temporaries: x in FP8 plus its scales.
    """
    _check_linear(x, w, w_scale)
    if x.is_cuda and backend == "auto" and HAS_TRITON and scaled_mm_eligible(x, w):
        return _scaled_mm_linear(x, w, w_scale)
    if not _use_triton(x, backend):
        return block_fp8_linear_ref(x, w, w_scale)
    rows, k = x.shape
    out = torch.empty(rows, w.shape[0], dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    xq = torch.empty(rows, k, dtype=FP8, device=x.device)
    xs = torch.empty(rows, k // GROUP, dtype=torch.float32, device=x.device)
    ops = _triton_ops()
    ops.quant_rows(x.contiguous()[None], xq[None], xs[None], GROUP)
    cfg = fp8_default_config(rows)
    return ops.linear(xq, xs, w, w_scale, cfg.down, cfg.block_m, out)


def scaled_mm_eligible(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`block_fp8_linear` takes the ``torch._scaled_mm`` path for these operands."""
    return x.is_cuda and x.dtype == torch.bfloat16 and (w.shape[1] // GROUP) % 4 == 0 and _is_sm90(x.device)


@functools.cache
def _is_sm90(device: torch.device) -> bool:
    """torch._scaled_mm runs DeepSeek block scaling (1x128 activations, 128x128 weights) on SM90 only."""
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) == (9, 0)


def _scaled_mm_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    rows, k = x.shape
    if rows == 0:
        return torch.empty(0, w.shape[0], dtype=x.dtype, device=x.device)
    padded = _cdiv(rows, SCALED_MM_ROW_ALIGN) * SCALED_MM_ROW_ALIGN
    xq = torch.empty(padded, k, dtype=FP8, device=x.device)
    xs = torch.empty(k // GROUP, padded, dtype=torch.float32, device=x.device).t()  # [M, K/128], M-major
    _triton_ops().quant_rows(x.contiguous()[None], xq[None], xs[None], GROUP)
    out = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=x.dtype)
    return out[:rows]


def _check_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16/fp16/fp32 [T, K], got {x.dtype} {tuple(x.shape)}")
    if w.dim() != 2 or w.dtype != FP8 or w.shape[1] != x.shape[1] or not w.is_contiguous():
        raise ValueError(
            f"w must be a contiguous float8_e4m3fn [N, K={x.shape[1]}], got {w.dtype} {tuple(w.shape)}"
        )
    n, k = w.shape
    if n % GROUP or k % GROUP:
        raise ValueError(f"block_fp8_linear needs N and K multiples of {GROUP}, got N={n}, K={k}")
    _check_scale("w_scale", w_scale, (n // GROUP, k // GROUP), x.device)
    if w.device != x.device:
        raise ValueError(f"w is on {w.device}, x on {x.device}")


def _check_scale(name: str, scale: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tuple(scale.shape) != shape or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous float32 tensor of shape {shape}, got {scale.dtype} {tuple(scale.shape)}"
        )
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device}, the activations on {device}")


# ---------------------------------------------------------------------------------------------
# Routed experts
# ---------------------------------------------------------------------------------------------


def _check_experts(
    w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, hidden: int, device
) -> None:
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != hidden:
        raise ValueError(f"w13 must be [E, 2I, H={hidden}], got {tuple(w13.shape)}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w2 must be [E={num_experts}, H={hidden}, I={inter}], got {tuple(w2.shape)}")
    if hidden % GROUP or inter % GROUP:
        raise ValueError(f"block-FP8 experts need H and I multiples of {GROUP}, got H={hidden}, I={inter}")
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype != FP8 or not w.is_contiguous() or w.device != device:
            raise ValueError(
                f"{name} must be contiguous float8_e4m3fn on {device}, got {w.dtype} on {w.device}"
            )
    _check_scale("w13_scale", w13_scale, (num_experts, 2 * inter // GROUP, hidden // GROUP), device)
    _check_scale("w2_scale", w2_scale, (num_experts, hidden // GROUP, inter // GROUP), device)


def _expert_ref(
    a: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    act_dtype: torch.dtype,
) -> torch.Tensor:
    """One expert on dequantized rows ``a [n, H]`` float32: h rounded to ``act_dtype`` and
    re-quantized per 1x128 group, as the kernel stores it; returns the float32 down projection."""
    gate_up = a @ dequant_block(w13, w13_scale).t()
    h = silu_and_mul_ref(gate_up).to(act_dtype)
    return dequant_groups(*quant_groups_ref(h)) @ dequant_block(w2, w2_scale).t()


def fused_moe_fp8_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`fused_moe_fp8` (loops over the experts present; syncs with the host).
    Rounding points as kernels/moe.py's ``fused_moe_ref``: h and each weighted (token, k) output in
    x's dtype, the K outputs added in float32 in k order."""
    num_tokens, hidden = x.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    a = dequant_groups(*quant_groups_ref(x))
    ids = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).float()
    y = torch.zeros(num_tokens * top_k, hidden, dtype=torch.float32, device=x.device)
    valid = (ids >= 0) & (ids < num_experts)
    for e in ids[valid].unique().tolist():
        pairs = (ids == e).nonzero().squeeze(1)
        out_e = _expert_ref(a[pairs // top_k], w13[e], w13_scale[e], w2[e], w2_scale[e], x.dtype)
        y[pairs] = (out_e * weights[pairs, None]).to(x.dtype).float()
    return y.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)


def fused_moe_fp8_config(x: torch.Tensor, w13: torch.Tensor, topk_ids: torch.Tensor) -> MoeConfig:
    """The block config the Triton :func:`fused_moe_fp8` uses for these shapes on x's device."""
    num_tokens, top_k = topk_ids.shape
    return fused_fp8_config(
        _device_name(x.device), w13.shape[0], x.shape[-1], w13.shape[1] // 2, top_k, num_tokens
    )


def fused_moe_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    backend: Backend = "auto",
    config: MoeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])`` -> ``[T, H]`` in x's dtype.

    x: ``[T, H]`` bf16 (fp16/fp32 accepted), quantized per 1x128 group inside; w13: ``[E, 2I, H]``
    float8_e4m3fn (gate rows then up rows) with w13_scale ``[E, 2I/128, H/128]`` float32; w2:
    ``[E, H, I]`` float8_e4m3fn with w2_scale ``[E, H/128, I/128]`` float32; all contiguous, H and I
    multiples of 128. topk_ids ``[T, K]`` int32/int64 (ids < 0 or >= E skipped), topk_weights
    ``[T, K]`` float. out: optional contiguous ``[T, H]`` buffer (every element written); returned.

    Triton path: sorted layout as kernels/moe.py's ``fused_moe`` (no host sync, fixed grids, no
    atomics: CUDA-graph safe, bitwise reproducible); the intermediate h is re-quantized per 1x128
    group (in the gate/up epilogue when ``config.gate_up.block_n == 128``). ``config`` overrides the
    tuned/default block config (its block_k must be 128).
    """
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16/fp16/fp32 [T, H], got {x.dtype} {tuple(x.shape)}")
    _check_experts(w13, w13_scale, w2, w2_scale, x.shape[1], x.device)
    check_routing(x, topk_ids, topk_weights)
    out = _check_out(out, tuple(x.shape), x.dtype, x.device)
    if not _use_triton(x, backend):
        out.copy_(fused_moe_fp8_ref(x, w13, w13_scale, w2, w2_scale, topk_ids, topk_weights))
        return out
    return _triton_ops().fused_moe(
        x.contiguous(),
        w13,
        w13_scale,
        w2,
        w2_scale,
        topk_ids.contiguous(),
        topk_weights.to(torch.float32).contiguous(),
        config or fused_moe_fp8_config(x, w13, topk_ids),
        out,
    )


def _check_out(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def _masked_inputs(
    recv_x: torch.Tensor, x_scale: torch.Tensor | None, out_dtype: torch.dtype | None
) -> tuple[torch.dtype, bool]:
    """(output dtype, whether recv_x is already FP8) after checking recv_x / x_scale."""
    if recv_x.dim() != 3:
        raise ValueError(f"recv_x must be [E, N, H], got {tuple(recv_x.shape)}")
    is_fp8 = recv_x.dtype == FP8
    if not is_fp8 and recv_x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"recv_x must be float8_e4m3fn or bf16/fp16/fp32, got {recv_x.dtype}")
    if is_fp8 != (x_scale is not None):
        raise ValueError("x_scale [E, N, H/128] float32 goes with (and only with) float8_e4m3fn recv_x")
    if x_scale is not None:
        num_experts, rows, hidden = recv_x.shape
        if (
            tuple(x_scale.shape) != (num_experts, rows, _cdiv(hidden, GROUP))
            or x_scale.dtype != torch.float32
        ):
            raise ValueError(
                f"x_scale must be float32 [E, N, H/128] = {(num_experts, rows, _cdiv(hidden, GROUP))}, "
                f"got {x_scale.dtype} {tuple(x_scale.shape)}"
            )
        if x_scale.device != recv_x.device:
            raise ValueError(f"x_scale is on {x_scale.device}, recv_x on {recv_x.device}")
    dtype = out_dtype or (torch.bfloat16 if is_fp8 else recv_x.dtype)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bf16/fp16/fp32, got {dtype}")
    return dtype, is_fp8


def masked_moe_fp8_ref(
    recv_x: torch.Tensor,
    recv_count: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`masked_moe_fp8`; rows past each count are zeros here (syncs with
    the host)."""
    dtype, _ = _masked_inputs(recv_x, x_scale, out_dtype)
    num_experts, rows, hidden = recv_x.shape
    out = torch.zeros(num_experts, rows, hidden, dtype=dtype, device=recv_x.device)
    for e, count in enumerate(recv_count.tolist()):
        n = max(0, min(int(count), rows))
        if n:
            q, s = (recv_x[e, :n], x_scale[e, :n]) if x_scale is not None else quant_groups_ref(recv_x[e, :n])
            out_e = _expert_ref(dequant_groups(q, s), w13[e], w13_scale[e], w2[e], w2_scale[e], dtype)
            out[e, :n] = out_e.to(dtype)
    return out


def masked_moe_fp8_config(recv_x: torch.Tensor, w13: torch.Tensor, expected_m: int) -> MoeConfig:
    """The block config the Triton :func:`masked_moe_fp8` uses for these shapes and ``expected_m``."""
    return masked_fp8_config(
        _device_name(recv_x.device), w13.shape[0], recv_x.shape[-1], w13.shape[1] // 2, expected_m
    )


def masked_moe_fp8(
    recv_x: torch.Tensor,
    recv_count: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    expected_m: int | None = None,
    backend: Backend = "auto",
    config: MoeConfig | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``out[e, r] = expert_e(recv_x[e, r])`` for ``r < recv_count[e]`` -> ``[E, N, H]``.

    recv_x: the low-latency dispatch layout ``[E, N, H]``, either in bf16/fp16/fp32 (quantized per
    1x128 group inside, only rows below the counts) or already float8_e4m3fn with ``x_scale [E, N,
    H/128]`` float32 (an FP8 dispatch's rows and per-128-column scales; any strides, e.g. row-major or
    ``[E, H/128, N].transpose(1, 2)``, rows fastest, as DeepEP lays them out; recv_x is made contiguous).
    recv_count: ``[E]`` int32/int64 on the device, read only there (counts above N are taken as N).
    Weights as in :func:`fused_moe_fp8`. out_dtype: dtype of ``out`` and of h before its
    re-quantization; default recv_x's dtype, bf16 for FP8 input.

    As kernels/moe.py's ``masked_moe``: the Triton path does NOT write rows at or past an expert's
    count (the reference writes zeros there); ``expected_m`` (typical rows per expert, default N)
    sizes the grid and picks the config, never the result; no host sync, grids fixed by (E, N,
    expected_m): CUDA-graph safe. Temporaries: h ``[E, N, I]`` in FP8 plus scales (plus recv_x in FP8
    for non-FP8 input, and h in out_dtype when the epilogue does not fuse the quantization).
    """
    dtype, is_fp8 = _masked_inputs(recv_x, x_scale, out_dtype)
    num_experts, rows, hidden = recv_x.shape
    _check_experts(w13, w13_scale, w2, w2_scale, hidden, recv_x.device)
    if w13.shape[0] != num_experts:
        raise ValueError(f"recv_x has {num_experts} experts, the weights {w13.shape[0]}")
    if tuple(recv_count.shape) != (num_experts,) or recv_count.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"recv_count must be int32/int64 [E={num_experts}], got {recv_count.dtype} {tuple(recv_count.shape)}"
        )
    if recv_count.device != recv_x.device:
        raise ValueError(f"recv_count is on {recv_count.device}, recv_x on {recv_x.device}")
    out = _check_out(out, tuple(recv_x.shape), dtype, recv_x.device)
    if not _use_triton(recv_x, backend):
        ref = masked_moe_fp8_ref(
            recv_x, recv_count, w13, w13_scale, w2, w2_scale, x_scale=x_scale, out_dtype=dtype
        )
        if out.numel():
            out.copy_(ref)
        return out
    expected_m = rows if expected_m is None else max(1, expected_m)
    ops = _triton_ops()
    count = recv_count.contiguous()
    if is_fp8:
        xq, xs = recv_x.contiguous(), x_scale
    else:
        xq = torch.empty(recv_x.shape, dtype=FP8, device=recv_x.device)
        xs = torch.empty(num_experts, rows, hidden // GROUP, dtype=torch.float32, device=recv_x.device)
        if rows:
            ops.quant_rows(recv_x.contiguous(), xq, xs, GROUP, count=count, expected_m=expected_m)
    return ops.masked_moe(
        xq,
        xs,
        count,
        w13,
        w13_scale,
        w2,
        w2_scale,
        config or masked_moe_fp8_config(recv_x, w13, expected_m),
        expected_m,
        out,
    )
