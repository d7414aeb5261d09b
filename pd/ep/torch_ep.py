"""``torch``: the built-in EP backend on torch.distributed (NCCL on GPUs, gloo on CPUs).

Normal mode: ``all_to_all_single`` with split sizes. The per-rank row counts are exchanged first
and read on the host (allowed in normal mode).

Low-latency mode: a FIXED-CAPACITY all-to-all. Every rank sends every other rank a block of
exactly M rows (M = max_tokens_per_rank), whatever the routing, so all shapes are static and
nothing is read on the host; the packing uses scatter/cumsum on the device (layout.py).

Capacity (why no token can ever be dropped):
- Send side: a token goes to a rank once, however many of its experts live there, and a rank
  has T <= M tokens, so block (src -> dst) never needs more than M rows.
- Receive side: local expert e gets one entry per (source token, top-k slot) naming it; a token
  names an expert at most once, so e receives at most one entry per received row: at most
  W * M = the rows of ``recv_x[e]``.
Rows a block does not fill carry expert ids -1 and are ignored.

Collectives per low-latency round: dispatch 1 (token rows with their top-k ids packed into one
byte buffer; with ``ll_fp8`` the rows are ``quant_rows(x)``: e4m3 bytes plus float32 scales,
which the receiver stores bit for bit), combine 2 (the [W * M, K] float32 weights to the expert
side, then the [W * M, H] per-token partial sums back). The expert side weights and sums its
local experts' outputs per token, so each token comes back once per rank, not once per expert.

gloo's ``all_to_all_single`` (checked with torch 2.13) supports float32, bfloat16, float16,
uint8, int32 and int64, uneven splits and zero-row splits, so CPU and GPU share this code.
float8 goes over the wire only inside the uint8 packed rows (not every NCCL/gloo build takes
float8 tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd.ep.base import EPBackend, EPConfig, LLDispatch, NormalDispatch
from pd.ep.fp8 import GROUP, quant_rows
from pd.ep.layout import MaskedRows, expert_slots, rank_slots, token_ranks, weighted_gather_sum

# Byte alignment of one packed row of the low-latency send buffer, so its int32 and dtype views
# start on aligned addresses.
_ROW_ALIGN = 16


@dataclass(frozen=True)
class NormalHandle:
    """What ``normal_combine`` needs to route rows back (host lists are fine in normal mode)."""

    token: torch.Tensor  # [S] int64: source token of each sent row, grouped by destination rank
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    num_tokens: int  # T of this rank


def normal_dispatch(
    config: EPConfig,
    group: dist.ProcessGroup | None,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
) -> NormalDispatch:
    """Normal-mode dispatch via ``all_to_all_single`` with splits (see ``EPBackend.dispatch``).

    Three collectives: the [W] int64 row counts, the token rows, and the packed metadata
    ([S, 2K] int32: local expert ids, then the float32 weights' bits).
    """
    cfg = config
    world, n_local, k = cfg.world_size, cfg.num_local_experts, topk_idx.shape[1]
    sent = token_ranks(topk_idx, n_local, world)
    # Rows grouped by destination rank, in token order within a rank.
    dst_rank, token = sent.t().nonzero(as_tuple=True)
    send_counts = sent.sum(dim=0)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

    ids = topk_idx[token]
    local = ids - (dst_rank * n_local).unsqueeze(1)
    valid = (ids >= 0) & (local >= 0) & (local < n_local)
    send_meta = torch.cat(
        [torch.where(valid, local, -1).int(), torch.where(valid, topk_weights[token], 0.0).view(torch.int32)],
        dim=1,
    )
    num_recv = sum(recv_splits)
    recv_x = torch.empty(num_recv, cfg.hidden, dtype=cfg.dtype, device=x.device)
    dist.all_to_all_single(recv_x, x[token], recv_splits, send_splits, group=group)
    recv_meta = torch.empty(num_recv, 2 * k, dtype=torch.int32, device=x.device)
    dist.all_to_all_single(recv_meta, send_meta, recv_splits, send_splits, group=group)

    recv_topk_idx = recv_meta[:, :k].long()
    recv_topk_weights = recv_meta[:, k:].contiguous().view(torch.float32)
    per_expert = torch.bincount(recv_topk_idx[recv_topk_idx >= 0], minlength=n_local)
    return NormalDispatch(
        recv_x=recv_x,
        recv_topk_idx=recv_topk_idx,
        recv_topk_weights=recv_topk_weights,
        recv_counts=per_expert,
        handle=NormalHandle(token, send_splits, recv_splits, x.shape[0]),
    )


def normal_combine(
    config: EPConfig, group: dist.ProcessGroup | None, y: torch.Tensor, handle: object
) -> torch.Tensor:
    """Normal-mode combine (see ``EPBackend.combine``): one ``all_to_all_single`` back, then a
    float32 ``index_add`` of each rank's row into its source token."""
    if not isinstance(handle, NormalHandle):
        raise TypeError(f"handle must come from this backend's dispatch, got {type(handle).__name__}")
    if y.dim() != 2 or y.shape != (sum(handle.recv_splits), config.hidden) or y.dtype != config.dtype:
        raise ValueError(
            f"y must be [{sum(handle.recv_splits)}, {config.hidden}] {config.dtype}, got {list(y.shape)} {y.dtype}"
        )
    back = torch.empty(handle.token.shape[0], config.hidden, dtype=config.dtype, device=y.device)
    dist.all_to_all_single(back, y.contiguous(), handle.send_splits, handle.recv_splits, group=group)
    out = torch.zeros(handle.num_tokens, config.hidden, dtype=torch.float32, device=y.device)
    out.index_add_(0, handle.token, back.float())
    return out.to(config.dtype)


@dataclass(frozen=True)
class _LLHandle:
    sent: torch.Tensor  # [T, W] bool: token t was sent to rank r
    send_slot: torch.Tensor  # [T, W] int64: its row in the [W * M (+1 dump)] send buffer
    valid: torch.Tensor  # [W * M, K] bool: received entry names a local expert
    slot: torch.Tensor  # [W * M, K] int64: that entry's flat row in the masked layout


class TorchNormalMode(EPBackend):
    """Normal mode over torch.distributed all-to-all (``normal_dispatch`` / ``normal_combine``), for
    the backends whose library brings no normal mode of its own (torch, mooncake)."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> NormalDispatch:
        self._check_normal(x, topk_idx, topk_weights)
        return normal_dispatch(self.config, self.group, x, topk_idx, topk_weights)

    def combine(self, y: torch.Tensor, handle: object) -> torch.Tensor:
        return normal_combine(self.config, self.group, y, handle)


class TorchEP(TorchNormalMode):
    """EP over torch.distributed collectives (module docstring: layout and capacity).

    Low-latency buffers: ``recv_x`` of ``ll_dispatch`` is a persistent ``[E_local, M * W, H]``
    buffer (float8_e4m3fn with ``ll_fp8``, plus a persistent float32 ``recv_scale``
    ``[E_local, M * W, H / 128]``) allocated at construction and overwritten by every
    ``ll_dispatch`` (its handle stays valid until then). Send/receive staging buffers are per
    call (the caching allocator or the CUDA-graph pool reuses them). ``ll_combine`` returns a
    fresh ``[T, H]`` tensor.
    CUDA-graph capture: all low-latency ops are device-side with static shapes; NCCL collectives
    are capturable. Verified here on CPU (gloo) only; graph capture is exercised by
    ``python -m pd.bench.ep_latency`` on GPUs.
    """

    name = "torch"

    def __init__(self, config: EPConfig, group: dist.ProcessGroup | None) -> None:
        super().__init__(config, group)
        self._ll = MaskedRows(config, config.num_local_experts, config.ll_rows_per_expert)
        # Payload of one packed row: the x row (e4m3 bytes with ll_fp8), then the float32 scales.
        self._x_bytes = config.hidden * (1 if config.ll_fp8 else config.dtype.itemsize)
        self._scale_bytes = 4 * (config.hidden // GROUP) if config.ll_fp8 else 0

    def ll_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> LLDispatch:
        self._check_ll(x, topk_idx)
        cfg = self.config
        world, cap, k = cfg.world_size, cfg.max_tokens_per_rank, topk_idx.shape[1]
        sent, send_slot = rank_slots(topk_idx, cfg.num_local_experts, world, cap)

        # One packed row per (token, destination):
        # [K int32 global expert ids | x row | (ll_fp8) H/128 float32 scales | pad].
        # Offsets stay 4-byte aligned: 4K, and H bytes with ll_fp8 where H % 128 == 0.
        meta_bytes = 4 * k
        x_end = meta_bytes + self._x_bytes
        row_bytes = -(-(x_end + self._scale_bytes) // _ROW_ALIGN) * _ROW_ALIGN
        send = torch.empty(world * cap + 1, row_bytes, dtype=torch.uint8, device=x.device)
        send_meta = send[:, :meta_bytes].view(torch.int32)
        send_meta.fill_(-1)  # rows left unfilled name no expert
        send_meta[send_slot] = topk_idx.int().unsqueeze(1)
        if cfg.ll_fp8:
            q, scale = quant_rows(x)
            send[:, meta_bytes:x_end][send_slot] = q.view(torch.uint8).unsqueeze(1)
            send[:, x_end : x_end + self._scale_bytes].view(torch.float32)[send_slot] = scale.unsqueeze(1)
        else:
            send[:, meta_bytes:x_end].view(cfg.dtype)[send_slot] = x.unsqueeze(1)
        recv = torch.empty(world * cap, row_bytes, dtype=torch.uint8, device=x.device)
        dist.all_to_all_single(recv, send[:-1], group=self.group)

        recv_ids = recv[:, :meta_bytes].view(torch.int32)
        local = recv_ids.long() - cfg.first_local_expert
        valid, slot, count = expert_slots(local, cfg.num_local_experts, cfg.ll_rows_per_expert)
        if cfg.ll_fp8:
            recv_scale = recv[:, x_end : x_end + self._scale_bytes].view(torch.float32)
            self._ll.put(slot, recv[:, meta_bytes:x_end], recv_scale)
        else:
            self._ll.put(slot, recv[:, meta_bytes:x_end].view(cfg.dtype))
        handle = _LLHandle(sent, send_slot, valid, slot)
        return LLDispatch(self._ll.recv_x, count, handle, self._ll.recv_scale)

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: object
    ) -> torch.Tensor:
        self._check_ll_combine(y, topk_idx, topk_weights)
        if not isinstance(handle, _LLHandle):
            raise TypeError(f"handle must come from this backend's ll_dispatch, got {type(handle).__name__}")
        cfg = self.config
        world, cap, k = cfg.world_size, cfg.max_tokens_per_rank, topk_idx.shape[1]

        # 1. Weights to the expert side, in the same rows as the dispatched tokens (unfilled rows
        #    are garbage; their entries are not valid there).
        send_w = torch.empty(world * cap + 1, k, dtype=torch.float32, device=y.device)
        send_w[handle.send_slot] = topk_weights.unsqueeze(1)
        recv_w = torch.empty(world * cap, k, dtype=torch.float32, device=y.device)
        dist.all_to_all_single(recv_w, send_w[:-1], group=self.group)

        # 2. Weighted sum over this rank's experts per received token; back to the sources.
        partial = weighted_gather_sum(y.view(-1, cfg.hidden), handle.slot, handle.valid, recv_w).to(cfg.dtype)
        back = torch.empty_like(partial)
        dist.all_to_all_single(back, partial, group=self.group)

        # 3. Sum over ranks (float32) per source token.
        rows = back[torch.where(handle.sent, handle.send_slot, 0)]
        return torch.where(handle.sent.unsqueeze(-1), rows, 0).float().sum(dim=1).to(cfg.dtype)
