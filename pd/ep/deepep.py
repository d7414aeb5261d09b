"""``deepep``: EP on DeepEP (``deep_ep.Buffer``), for clusters where DeepEP is installed.

UNVERIFIED HERE: DeepEP cannot be built or run on our hosts (gpu/NOTES.md: the PyPI sdist lacks
headers, it needs a patched NVSHMEM, and its low-latency mode needs IBGDA NICs). This wrapper is
written against DeepEP's documented Python API (``deep_ep/buffer.py``): ``get_dispatch_layout``
+ ``dispatch`` + ``combine`` (normal), ``low_latency_dispatch`` + ``low_latency_combine``, and the
buffer size hints. The unit tests drive it against a fake ``deep_ep`` module whose methods have
DeepEP's documented signatures; nothing has run against the real library.

FP8 low-latency dispatch (``EPConfig.ll_fp8``): ``low_latency_dispatch(..., use_fp8=True,
round_scale=False, use_ue8m0=False)``. DeepEP documents (``deep_ep/buffers/legacy.py``) and its
kernel (``csrc/kernels/legacy/internode_ll.cu``) computes what Mooncake EP does: ``(x, scales)``,
x ``[E_local, W * M, H]`` float8_e4m3fn, scales ``[E_local, W * M, H / 128]`` float32 column-major
in the last two dims, scale = max(amax, 1e-4) / 448 per row and 128 columns. ``round_scale``
(power-of-2 scales) and ``use_ue8m0`` (packed int32 exponent scales) stay off so the scales are
plain float32 multipliers; they are made row-major with ``.contiguous()``.

Both modes share one Buffer built with ``low_latency_mode=True``. DeepEP requires its low-latency
buffer to be cleaned after normal-mode use, so the first ``ll_dispatch`` after a ``dispatch``
calls ``clean_low_latency_buffer`` (a prefill instance never switches; a decode instance
captures only low-latency calls).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pd.ep.base import EPBackend, EPConfig, LLDispatch, NormalDispatch
from pd.ep.fp8 import library_ll_recv


def deepep_available() -> bool:
    """True when ``deep_ep`` imports."""
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


def _import_deep_ep() -> Any:
    try:
        import deep_ep
    except ImportError as e:
        raise RuntimeError(
            "the deepep EP backend needs DeepEP (deep_ep), which is not installed here; "
            f"use the torch or mooncake backend instead ({e})"
        ) from e
    return deep_ep


class DeepEP(EPBackend):
    """DeepEP normal and low-latency modes (bfloat16; FP8 low-latency dispatch with ``ll_fp8``).

    Lifetimes follow DeepEP: normal-mode results are fresh tensors; ``ll_dispatch``'s ``recv_x``
    and ``recv_count`` live in DeepEP's double-buffered low-latency buffer (hold at most two
    low-latency results at a time). Graph capture: DeepEP's low-latency kernels are capturable;
    normal mode synchronises the host.
    """

    name = "deepep"

    def __init__(self, config: EPConfig, group: dist.ProcessGroup | None) -> None:
        super().__init__(config, group)
        if config.dtype != torch.bfloat16:
            raise ValueError(f"the deepep EP backend moves bfloat16, got {config.dtype}")
        deep_ep = _import_deep_ep()
        buffer_cls = deep_ep.Buffer
        world = config.world_size
        hidden_bytes = config.hidden * config.dtype.itemsize
        nvl_bytes = rdma_bytes = 0
        for tuning in (buffer_cls.get_dispatch_config(world), buffer_cls.get_combine_config(world)):
            nvl_bytes = max(nvl_bytes, tuning.get_nvl_buffer_size_hint(hidden_bytes, world))
            rdma_bytes = max(rdma_bytes, tuning.get_rdma_buffer_size_hint(hidden_bytes, world))
        rdma_bytes = max(
            rdma_bytes,
            buffer_cls.get_low_latency_rdma_size_hint(
                config.max_tokens_per_rank, config.hidden, world, config.num_experts
            ),
        )
        # Low-latency mode wants one QP per local expert; normal mode one per SM it uses.
        qps = max(config.num_local_experts, buffer_cls.num_sms)
        self._buffer = buffer_cls(group, nvl_bytes, rdma_bytes, low_latency_mode=True, num_qps_per_rank=qps)
        self._ll_clean = True

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> NormalDispatch:
        self._check_normal(x, topk_idx, topk_weights)
        self._ll_clean = False
        per_rank, per_rdma_rank, per_expert, in_rank, _event = self._buffer.get_dispatch_layout(
            topk_idx, self.config.num_experts
        )
        recv_x, recv_idx, recv_weights, counts, handle, _event = self._buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
        )
        return NormalDispatch(
            recv_x=recv_x,
            recv_topk_idx=recv_idx,
            recv_topk_weights=recv_weights,
            recv_counts=torch.tensor(list(counts), dtype=torch.int64, device=x.device),
            handle=handle,
        )

    def combine(self, y: torch.Tensor, handle: object) -> torch.Tensor:
        out, _weights, _event = self._buffer.combine(y, handle)
        return out

    def ll_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> LLDispatch:
        self._check_ll(x, topk_idx)
        cfg = self.config
        if not self._ll_clean:
            self._buffer.clean_low_latency_buffer(cfg.max_tokens_per_rank, cfg.hidden, cfg.num_experts)
            self._ll_clean = True
        recv, recv_count, handle, _event, _hook = self._buffer.low_latency_dispatch(
            x,
            topk_idx,
            cfg.max_tokens_per_rank,
            cfg.num_experts,
            use_fp8=cfg.ll_fp8,
            round_scale=False,
            use_ue8m0=False,
        )
        recv_x, recv_scale = library_ll_recv(recv, cfg.ll_fp8)
        return LLDispatch(recv_x, recv_count, handle, recv_scale)

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: object
    ) -> torch.Tensor:
        self._check_ll_combine(y, topk_idx, topk_weights)
        out, _event, _hook = self._buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
        return out
