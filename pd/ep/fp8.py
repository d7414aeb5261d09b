"""FP8 rows for low-latency dispatch (``EPConfig.ll_fp8``): per-row 1x128 group quantization.

Format (the one every backend returns in ``LLDispatch`` with ``ll_fp8``): a row of H values is
sent as H float8_e4m3fn values ``q`` plus H / 128 float32 scales, one per group of 128
consecutive columns, dynamic per row and group:

    scale = max(amax(|x_group|), 1e-10) / 448        q = clamp(x / scale, -448, 448) -> e4m3
    dequant: x ~= q.float() * scale                  (an all-zero group gives q = 0)

This is DeepSeek-V3's 1x128 activation quantization and the same rule as ``kernels/fp8.py``'s
``quant_groups``. Mooncake EP and DeepEP quantize inside their dispatch kernels with amax floored
at 1e-4 and ``x * (448 / amax)`` instead of ``x / scale``: the same format, ``dequant = q * scale``
holds, but their bytes may differ from ``quant_rows``' in the last bit (see ``mooncake_ep``).
"""

from __future__ import annotations

import torch

from pd.ep.base import EPConfig
from pd.kernels.fp8 import FP8, dequant_groups, quant_groups

FP8_DTYPE = FP8  # float8_e4m3fn
GROUP = 128  # columns per scale


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows in groups of 128 columns (``pd.kernels.fp8.quant_groups``: Triton on CUDA).

    x: ``[T, H]`` any float dtype, ``H % 128 == 0``.
    Returns ``q [T, H]`` float8_e4m3fn and ``scale [T, H / 128]`` float32, both fresh and
    contiguous. Device-side only (no host sync, static shapes): safe in CUDA graphs.
    """
    if x.dim() != 2 or x.shape[1] % GROUP:
        raise ValueError(f"x must be [T, H] with H % {GROUP} == 0, got {list(x.shape)}")
    return quant_groups(x, GROUP)


def dequant_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quant_rows`` up to FP8 rounding: ``q [..., H]`` e4m3 and ``scale [..., H / 128]``
    float32 -> ``[..., H]`` float32 (fresh)."""
    return dequant_groups(q, scale, GROUP)


def library_ll_recv(recv: object, use_fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first value DeepEP's ``low_latency_dispatch`` / Mooncake's ``dispatch`` return ->
    ``(recv_x, recv_scale)`` of ``LLDispatch``.

    use_fp8=False: ``recv`` is recv_x itself (bfloat16); recv_scale is None.
    use_fp8=True (DeepEP with round_scale=False, use_ue8m0=False; Mooncake): ``recv`` is the tuple
    ``(x [E_local, M * W, H] float8_e4m3fn, scales [E_local, M * W, H / 128] float32)`` whose
    scales are a transposed view of an ``[E_local, H / 128, M * W]`` tensor (column-major in the
    last two dims, for TMA). They are made row-major with ``.contiguous()``: a device copy,
    no host sync, graph-capturable.
    """
    if not use_fp8:
        assert isinstance(recv, torch.Tensor)
        return recv, None
    if not (isinstance(recv, tuple) and len(recv) == 2):
        raise TypeError(f"an FP8 dispatch returns (x, scales), got {type(recv).__name__}")
    x, scale = recv
    if x.dtype != FP8_DTYPE or scale.dtype != torch.float32 or x.dim() != 3:
        raise TypeError(f"expected float8_e4m3fn x and float32 scales, got {x.dtype} and {scale.dtype}")
    if list(scale.shape) != [*x.shape[:2], x.shape[2] // GROUP]:
        raise ValueError(f"scales {list(scale.shape)} do not match x {list(x.shape)} in groups of {GROUP}")
    return x, scale.contiguous()


def ll_bytes_per_row(config: EPConfig) -> dict[str, object]:
    """Payload bytes of one (token, top-k slot) row in low-latency mode.

    DeepEP and Mooncake send one row per (token, expert) each way, so these are the bytes per
    token per top-k slot on the wire (their per-message metadata, 16 bytes, left out; the
    ``torch`` backend sends one row per (token, rank) instead).

    Keys: ``dispatch_bf16`` = 2H; ``dispatch_fp8`` = H + 4 * H / 128 (e4m3 row + float32
    scales; None when H % 128); ``dispatch`` = what this config sends (``dispatch_fp8`` with
    ``ll_fp8``, else H * itemsize of ``dtype``); ``combine`` = H * itemsize of ``dtype`` (combine
    never quantizes); ``fp8_dispatch_ratio`` = dispatch_fp8 / dispatch_bf16.
    """
    h = config.hidden
    fp8 = h + 4 * (h // GROUP) if h % GROUP == 0 else None
    plain = h * config.dtype.itemsize
    return {
        "hidden": h,
        "dtype": str(config.dtype).removeprefix("torch."),
        "ll_fp8": config.ll_fp8,
        "dispatch_bf16": 2 * h,
        "dispatch_fp8": fp8,
        "dispatch": fp8 if config.ll_fp8 else plain,
        "combine": plain,
        "fp8_dispatch_ratio": None if fp8 is None else fp8 / (2 * h),
    }
