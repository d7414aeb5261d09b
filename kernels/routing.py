"""noaux_tc routing (DeepSeek-V3's router) in one kernel: FlashInfer's ``fused_topk_deepseek``.

The torch reference is ``pd.model.moe.route_ref`` (sigmoid, bias, group top-2 sums, group
top-k, expert top-k, gather, normalise, scale: about ten launches per MoE layer at decode). The fused
kernel takes the float32 router logits ``[T, E]`` and the float32 correction bias ``[E]`` and writes the
``K`` normalised, scaled weights (float32) and expert ids (int32) of each row. It always normalises, so it
serves only models with ``norm_topk_prob``; its group limits are checked once per shape.
"""

from __future__ import annotations

import functools

import torch

MAX_TOPK = 8  # the kernel's limits (FlashInfer's fused_topk_deepseek)
MAX_GROUPS = 32
MAX_EXPERTS_ONE_GROUP = 384
MAX_EXPERTS_PER_GROUP = 32
MAX_KEPT_GROUP_EXPERTS = 128


@functools.cache
def _flashinfer_routing():
    try:
        from flashinfer.fused_moe import fused_topk_deepseek
    except ImportError:
        return None
    return fused_topk_deepseek


def groups(num_experts: int, n_group: int, topk_group: int, topk: int) -> tuple[int, int] | None:
    """The kernel's ``(n_group, topk_group)`` for this router, or None when it has none.

    Keeping every group is the same routing whatever the split, and the kernel refuses one group with
    more than one expert chosen (it wants ``n_group * topk_group >= topk``), so such a router is given
    the fewest groups, all kept, that the kernel takes."""
    if topk_group < n_group:
        return (n_group, topk_group) if n_group * topk_group >= topk else None
    for g in range(1, MAX_GROUPS + 1):
        fits = num_experts // g <= MAX_EXPERTS_PER_GROUP and num_experts <= MAX_KEPT_GROUP_EXPERTS
        if num_experts % g == 0 and g * g >= topk and fits:
            return g, g
    return (1, 1) if topk == 1 else None


def fused_routing_unusable(
    num_experts: int, n_group: int, topk_group: int, topk: int, normalise: bool, device: torch.device
) -> str | None:
    """Why the fused kernel cannot route this model on ``device``, or None when it can."""
    if device.type != "cuda":
        return "not a CUDA device"
    if _flashinfer_routing() is None:
        return "flashinfer.fused_moe does not import"
    if not normalise:
        return "the kernel always normalises the chosen weights (norm_topk_prob is false)"
    if topk > MAX_TOPK:
        return f"top-{topk} routing (the kernel picks at most {MAX_TOPK})"
    split = groups(num_experts, n_group, topk_group, topk)
    if split is None:
        return f"{num_experts} experts in {n_group} groups, {topk_group} kept, top-{topk}: no split the kernel takes"
    g, tg = split
    per_group = num_experts // g
    if g == 1 and num_experts > MAX_EXPERTS_ONE_GROUP:
        return f"{num_experts} experts in one group (at most {MAX_EXPERTS_ONE_GROUP})"
    if g > 1 and (per_group > MAX_EXPERTS_PER_GROUP or per_group * tg > MAX_KEPT_GROUP_EXPERTS):
        return (
            f"{per_group} experts per group, {tg} groups kept (kernel limits: {MAX_EXPERTS_PER_GROUP} per "
            f"group, {MAX_KEPT_GROUP_EXPERTS} in the kept groups)"
        )
    return _kernel_unbuildable()


@functools.cache
def _kernel_unbuildable() -> str | None:
    """Builds (JIT, once per host) and loads the kernel; why it failed, or None."""
    try:
        from flashinfer.fused_moe.fused_routing_dsv3 import get_dsv3_fused_routing_module

        get_dsv3_fused_routing_module()
    except Exception as e:  # a missing toolchain or an incompatible build: the torch path serves
        return f"its kernel did not build ({type(e).__name__}: {e})"
    return None


def fused_routing(
    logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, topk: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router ``logits [T, E]`` float32, ``bias [E]`` float32 -> ``(weights [T, K] float32, ids [T, K]
    int64)``, the same as the reference up to float32 rounding and the order of the K chosen experts.
    Fresh outputs (graph-safe: no host work, fixed shapes)."""
    t, e = logits.shape
    split = groups(e, n_group, topk_group, topk)
    assert split is not None, "fused_routing_unusable says why"
    g, tg = split
    weights = torch.empty(t, topk, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, topk, dtype=torch.int32, device=logits.device)
    if t:
        _flashinfer_routing()(logits.contiguous(), bias.contiguous(), g, tg, topk, scale, weights, ids, False)
    return weights, ids.long()
