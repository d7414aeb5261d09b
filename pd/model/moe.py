"""DeepSeek-V3 MoE: sigmoid router with grouped top-k and correction bias, routed experts behind
the EP backend, shared experts run locally."""

from __future__ import annotations

import functools
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from pd.config import FP8Quant, ModelConfig
from pd.ep.base import EPBackend
from pd.ep.placement import PlacementMap, placement_of
from pd.kernels import fp8 as fp8_kernels  # called through the module: a test swaps in the references
from pd.kernels.moe import fused_moe, fused_moe_config, masked_moe
from pd.kernels.routing import fused_routing, fused_routing_unusable
from pd.model.context import ForwardContext
from pd.model.layers import MLP
from pd.model.quant import FP8_DTYPE, dequantize, scale_shape, w8a8_capable


def select_experts(
    x: torch.Tensor, gate_weight: torch.Tensor, correction_bias: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """noaux_tc routing. Returns ``topk_weights [T, K]`` float32 and ``topk_idx [T, K]`` int64.

    Scores are sigmoid(router logits) in float32; the correction bias only steers the choice
    (groups ranked by the sum of their top-2 biased scores, then the top-K experts inside the best
    ``topk_group`` groups); the weights are the unbiased scores of the chosen experts, normalised
    if ``norm_topk_prob`` and scaled by ``routed_scaling_factor``. On CUDA, where the model's routing
    fits it, one fused kernel (``pd.kernels.routing``) does all but the router GEMM; else ``route_ref``.
    """
    logits = router_logits(x, gate_weight)  # [T, E] float32
    if x.is_cuda and _fused_routing_fits(cfg):
        return fused_routing(
            logits,
            correction_bias,
            cfg.n_group,
            cfg.topk_group,
            cfg.num_experts_per_tok,
            cfg.routed_scaling_factor,
        )
    return route_ref(logits, correction_bias, cfg)


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """``x [T, H] @ gate_weight [E, H]^T`` -> ``[T, E]`` float32. On CUDA with 16-bit activations one GEMM on
    the tensor cores with float32 accumulation and output (the products of 16-bit values are exact in float32,
    so it differs from the float32 reference only in the order of the sum); elsewhere both are cast to
    float32 first (transformers' form), three kernels and a float32 SIMT GEMM on CUDA."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gate_weight.dtype == x.dtype:
        return torch.mm(x, gate_weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), gate_weight.float())


@functools.cache
def _fused_routing_fits(cfg: ModelConfig) -> bool:
    k = cfg.num_experts_per_tok
    why = fused_routing_unusable(
        cfg.n_routed_experts, cfg.n_group, cfg.topk_group, k, cfg.norm_topk_prob, torch.device("cuda")
    )
    log.info("MoE routing: %s", "one fused kernel (FlashInfer)" if why is None else f"torch ({why})")
    return why is None


def route_ref(
    logits: torch.Tensor, correction_bias: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` from the router ``logits [T, E]`` float32, in torch (the reference)."""
    t, e = logits.shape[0], cfg.n_routed_experts
    scores = logits.sigmoid()  # [T, E]
    choice = scores + correction_bias
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        group_scores = choice.view(t, cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [T, G]
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [T, G]
        expert_mask = group_mask[:, :, None].expand(t, cfg.n_group, e // cfg.n_group).reshape(t, e)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    topk_idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices  # [T, K]
    topk_weights = scores.gather(1, topk_idx)  # [T, K]
    if cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
    return topk_weights * cfg.routed_scaling_factor, topk_idx


log = logging.getLogger(__name__)


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream MoE layers run their shared experts on (one per device, for the process's lifetime)."""
    return torch.cuda.Stream(device)


def fp8_dispatch(cfg: ModelConfig, quant: FP8Quant | None, device: torch.device) -> bool:
    """Whether low-latency dispatch should send FP8 rows (``EPConfig.ll_fp8``): when the routed experts
    run on the W8A8 kernels, which take those rows and their scales as they arrive."""
    inter = cfg.moe_intermediate_size
    return quant is not None and w8a8_capable(quant, device, cfg.hidden_size, (inter, inter))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        # Kept in float32 whatever the model dtype: it is added to float32 scores.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)


class Experts(nn.Module):
    """This rank's routed experts: ``w13 [E_local, 2I, H]`` (gate rows then up rows), ``w2 [E_local, H, I]``.

    With ``quant`` both are float8_e4m3fn with block scales ``w13_scale_inv [E_local, 2 ceil(I/bo),
    ceil(H/bi)]`` (gate and up blocked apart) and ``w2_scale_inv [E_local, ceil(H/bo), ceil(I/bi)]``
    float32; they run on the grouped W8A8 kernels where ``prepare`` finds them capable (``w8a8``), else
    weight-only (dequantized per call). Without, they are in the activation dtype.
    """

    def __init__(self, num_local: int, hidden: int, intermediate: int, quant: FP8Quant | None = None) -> None:
        super().__init__()
        self.quant, self.parts = quant, (intermediate, intermediate)
        dtype = FP8_DTYPE if quant else None
        self.w13 = nn.Parameter(
            torch.empty(num_local, 2 * intermediate, hidden, dtype=dtype), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, intermediate, dtype=dtype), requires_grad=False)
        if quant:
            s13 = scale_shape(self.parts, hidden, quant.block)
            s2 = scale_shape((hidden,), intermediate, quant.block)
            f32 = torch.float32
            self.w13_scale_inv = nn.Parameter(torch.empty(num_local, *s13, dtype=f32), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(torch.empty(num_local, *s2, dtype=f32), requires_grad=False)
        self.w8a8 = False

    def prepare(self) -> None:
        """Chooses the W8A8 kernels or weight-only for the loaded FP8 weights."""
        if self.quant is not None:
            self.w8a8 = w8a8_capable(self.quant, self.w13.device, self.w13.shape[-1], self.parts)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13, w2)`` in ``dtype`` (FP8 weights dequantized in float32 first; fresh tensors)."""
        if self.quant is None:
            return self.w13, self.w2
        block = self.quant.block
        w13 = dequantize(self.w13, self.w13_scale_inv, block, self.parts).to(dtype)
        return w13, dequantize(self.w2, self.w2_scale_inv, block).to(dtype)

    def sorted(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Normal-dispatch rows ``x [N, H]`` with local ids ``topk_idx [N, K]`` -> ``[N, H]``."""
        if self.w8a8:
            return fp8_kernels.fused_moe_fp8(
                x, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv, topk_idx, topk_weights
            )
        return fused_moe(x, *self.weights(x.dtype), topk_idx, topk_weights)

    def sorted_config(self, x: torch.Tensor, topk_idx: torch.Tensor) -> object:
        """The block config ``sorted`` runs these shapes with (one compiled kernel per distinct config)."""
        if self.w8a8:
            return fp8_kernels.fused_moe_fp8_config(x, self.w13, topk_idx)
        return fused_moe_config(x, self.w13, self.w2, topk_idx)

    def masked(
        self, x: torch.Tensor, count: torch.Tensor, x_scale: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """The low-latency layout ``x [E_local, M*W, H]`` (FP8 with ``x_scale [E_local, M*W, H/128]``,
        or ``out_dtype``) -> ``[E_local, M*W, H]`` ``out_dtype``; rows from ``count[e]`` on are not computed."""
        if self.w8a8:
            w13, s13, w2, s2 = self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv
            return fp8_kernels.masked_moe_fp8(
                x, count, w13, s13, w2, s2, x_scale=x_scale, out_dtype=out_dtype
            )
        if x_scale is not None:
            raise ValueError("FP8 low-latency dispatch needs experts on the W8A8 kernels")
        return masked_moe(x, count, *self.weights(out_dtype))


class MoE(nn.Module):
    """``placement`` maps the router's global expert ids to the EP backend's physical ids (None:
    linear, the identity). ``expert_tokens [E_local]`` int64 counts the (token, expert) pairs each
    local expert received, on the device (read only when metrics are scraped)."""

    expert_tokens: torch.Tensor  # a buffer

    def __init__(
        self,
        cfg: ModelConfig,
        ep: EPBackend,
        placement: PlacementMap | None = None,
        quant: FP8Quant | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.ep = ep
        self.placement = placement
        self.register_buffer(
            "expert_tokens", torch.zeros(ep.config.num_local_experts, dtype=torch.int64), persistent=False
        )
        self.gate = Router(cfg)
        self.experts = Experts(ep.config.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size, quant)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, quant)
            if cfg.n_shared_experts
            else None
        )

    def global_expert_ids(self) -> list[int]:
        """Global id of the expert each local slot of ``experts`` holds on this rank."""
        c = self.ep.config
        return placement_of(self.placement, c.num_experts, c.world_size).local_experts(c.rank)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        call = self.route(x, ctx)
        return self.finish(call, call.run())

    def route(self, x: torch.Tensor, ctx: ForwardContext) -> RoutedCall:
        """Chooses the experts of ``x [T, H]``; returns the routed experts' call, not yet run. On CUDA with
        ``ctx.overlap_shared`` the shared experts start first, on a side stream (``finish`` joins it): a decode
        step's shared-expert GEMMs then run beside the routing and routed kernels instead of after them."""
        shared = self._start_shared(x) if ctx.overlap_shared else None
        gate = self.gate
        topk_weights, topk_idx = select_experts(
            x, gate.weight, gate.e_score_correction_bias, self.cfg
        )  # [T, K]
        if ctx.row_mask is not None:  # CUDA-graph padding rows route nowhere: no expert work, no EP traffic
            topk_idx = torch.where(ctx.row_mask[:, None], topk_idx, -1)
        if self.placement is not None:
            topk_idx = self.placement.to_physical(topk_idx)  # [T, K] physical ids
        return RoutedCall(self, x, topk_idx, topk_weights, ctx.low_latency_moe, shared)

    def _start_shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts of ``x`` issued on the device's side stream after the work queued so far, or None
        (no shared experts, or not CUDA). Allocator-safe without ``record_stream``: ``x`` stays referenced by the
        call until ``finish`` joins, and the output's only reader is ``finish``'s add, before the next fork."""
        if self.shared_experts is None or not x.is_cuda:
            return None
        side, main = side_stream(x.device), torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            return self.shared_experts(x)

    def finish(self, call: RoutedCall, routed: torch.Tensor) -> torch.Tensor:
        """The layer's output from its ``call`` (``route``'s) and the routed experts' result ``routed [T, H]``:
        plus the shared experts (joined from the side stream where ``route`` started them)."""
        if self.shared_experts is None:
            return routed
        if call.shared is None:
            return routed + self.shared_experts(call.x)
        torch.cuda.current_stream(routed.device).wait_stream(side_stream(routed.device))
        return routed + call.shared

    def routed(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, low_latency: bool
    ) -> torch.Tensor:
        """Routed experts through the EP backend: ``x [T, H]``, ``topk_idx [T, K]`` global ids -> ``[T, H]``.

        Normal mode (prefill; eager): received rows with local ids, the sorted-layout kernel.
        Low-latency mode (decode; static shapes, graph-safe): the masked ``[E_local, M*W, H]`` layout.
        """
        if low_latency:
            d = self.ep.ll_dispatch(x, topk_idx)
            self.expert_tokens += d.recv_count  # [E_local]
            y = self.experts.masked(d.recv_x, d.recv_count, d.recv_scale, x.dtype)  # [E_local, M*W, H]
            return self.ep.ll_combine(y, topk_idx, topk_weights, d.handle)
        nd = self.ep.dispatch(x, topk_idx, topk_weights)
        self.expert_tokens += nd.recv_counts  # [E_local]
        y = self.experts.sorted(nd.recv_x, nd.recv_topk_idx, nd.recv_topk_weights)  # [N, H]
        return self.ep.combine(y, nd.handle)

    def idle(self, low_latency: bool) -> None:
        """Joins this layer's EP collectives with no tokens (a rank without work in a step others run)."""
        k, device = self.cfg.num_experts_per_tok, self.experts.w13.device
        x = torch.empty(0, self.cfg.hidden_size, dtype=self.ep.config.dtype, device=device)
        idx = torch.empty(0, k, dtype=torch.int64, device=device)
        self.routed(x, idx, torch.empty(0, k, dtype=torch.float32, device=device), low_latency)


@dataclass(frozen=True)
class RoutedCall:
    """A MoE layer's routed experts, chosen but not run: ``x [T, H]``, ``topk_idx [T, K]`` physical ids (-1: none),
    ``topk_weights [T, K]`` float32. Piecewise CUDA graphs (``pd.engine.graph``) run it eagerly between two graphs:
    normal-mode EP dispatch synchronises with the host."""

    moe: MoE
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    low_latency: bool
    shared: torch.Tensor | None = None  # [T, H]: the shared experts' output, pending on the side stream

    def run(self) -> torch.Tensor:
        """-> ``[T, H]`` in ``x``'s dtype, a fresh tensor."""
        return self.moe.routed(self.x, self.topk_idx, self.topk_weights, self.low_latency)


R = TypeVar("R")
Pieces = Generator[RoutedCall, torch.Tensor, R]
"""A forward cut at its MoE layers: yields each layer's ``RoutedCall`` and is sent its result; returns ``R``."""


def run_pieces(pieces: Pieces[R]) -> R:
    """Runs a cut forward through, each routed call in place (the uncut forward)."""
    try:
        call = next(pieces)
        while True:
            call = pieces.send(call.run())
    except StopIteration as stop:
        return stop.value
