"""MLA's attention prologue in one kernel: the latent's RMSNorm and both rotary parts.

After ``q_b_proj`` and ``kv_a_proj_with_mqa`` an MLA layer normalises the latent ``c_kv``, rotates the
query's and the key's rotary parts at their positions and puts ``[c_kv, k_rope]`` together as the latent
it caches. In torch that is about fifteen launches a layer (a copy to make ``c_kv`` contiguous, the norm,
the concatenation of the query and key rotary parts, the table gather, the float casts, six elementwise
passes, two concatenations); ``mla_rope_norm`` is one launch (``pd.model.mla`` takes it on CUDA when
Triton is there). The torch path of ``pd.model.mla`` (``RMSNorm``, ``RotaryEmbedding.rotate_pair``) is the
reference the tests hold it to.

Math as the reference does it: float32 throughout; the norm's ``x * rsqrt(mean(x^2) + eps)`` is rounded
to the activation dtype before the weight multiplies it (transformers' order), the rotated parts are
rounded once. The rotated output keeps the reference's layout: with ``interleave`` (DeepSeek's) the pairs
are (0,1), (2,3), ... in, and ``[first of each pair..., second of each pair...]`` out; otherwise (i, i+d/2).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from pd.kernels.moe import HAS_TRITON


@functools.cache
def _triton_ops() -> ModuleType:
    from pd.kernels import mla_rope_triton

    return mla_rope_triton


def usable(x: torch.Tensor) -> bool:
    """Whether ``mla_rope_norm`` runs for tensors like ``x``: a CUDA tensor with Triton importable."""
    return HAS_TRITON and x.is_cuda


def mla_rope_norm(
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    interleave: bool,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated query heads and the latent to cache (and with ``cache``, cached).

    - ``q_rope [T, H, rope]``: the rotary channels of the query heads (a view of ``q_b_proj``'s output is
      fine: only the last dim must be contiguous); read only.
    - ``kv [T, kv_lora + rope]``: ``kv_a_proj_with_mqa``'s output (last dim contiguous); read only.
    - ``positions [T]`` int32/int64; ``cos_sin [max_positions, rope]`` float32 (cos of the rope/2
      frequencies, then sin: ``RotaryEmbedding.cos_sin``); ``norm_weight [kv_lora]`` (``kv_a_layernorm``).
    - Returns ``(q_rope [T, H, rope], latent [T, kv_lora + rope])``, fresh and contiguous, in the inputs'
      dtype: the rotated query parts (ready for the attention kernel, which wants them contiguous), and the
      normalised ``c_kv`` times ``norm_weight`` followed by the rotated ``k_rope``.
    - ``cache``: ``(pages [P, page_size, kv_lora + rope], slots [T] int64)`` (``AttentionBackend.store_target``;
      the pages in ``kv``'s dtype, last dim contiguous): the latent is also written to each token's slot
      ``page * page_size + offset``, in the same launch.

    Needs Triton (its interpreter for CPU tensors, ``TRITON_INTERPRET=1`` set before import).
    """
    t, heads, rope = q_rope.shape
    lora = kv.shape[1] - rope
    fits = kv.shape[0] == t and positions.shape == (t,) and norm_weight.shape == (lora,)
    if not fits or cos_sin.shape[1] != rope or lora <= 0:
        raise ValueError(
            f"mla_rope_norm: q_rope {tuple(q_rope.shape)}, kv {tuple(kv.shape)}, positions "
            f"{tuple(positions.shape)}, cos_sin {tuple(cos_sin.shape)}, norm_weight {tuple(norm_weight.shape)} "
            "do not fit together"
        )
    if q_rope.stride(-1) != 1 or kv.stride(-1) != 1 or rope % 2 or cos_sin.dtype != torch.float32:
        raise ValueError(
            "mla_rope_norm: q_rope and kv need a contiguous last dim, cos_sin float32, rope even"
        )
    if cache is not None:
        pages, slots = cache
        fits = pages.dim() == 3 and pages.shape[2] == lora + rope and pages.stride(2) == 1
        if not fits or pages.dtype != kv.dtype or slots.shape != (t,):
            raise ValueError(
                f"mla_rope_norm: cache pages {pages.dtype} {tuple(pages.shape)} (strides {pages.stride()}) and "
                f"slots {tuple(slots.shape)} do not fit kv {kv.dtype} {tuple(kv.shape)}"
            )
    latent = torch.empty(t, lora + rope, dtype=kv.dtype, device=kv.device)
    q_out = torch.empty(t, heads, rope, dtype=q_rope.dtype, device=q_rope.device)
    if t:
        ops = _triton_ops()
        ops.mla_rope_norm(
            q_rope, kv, positions, cos_sin.contiguous(), norm_weight, eps, interleave, latent, q_out, cache
        )
    return q_out, latent
