"""``mooncake``: low-latency EP on Mooncake EP (``mooncake.mooncake_ep_buffer.Buffer``).

Mooncake EP ships in the CUDA builds of the mooncake transfer-engine wheel and is DeepEP's
low-latency API plus rank-failure tolerance: ``dispatch``/``combine`` take an ``active_ranks``
int32 ``[W]`` tensor (1 = alive) and a ``timeout_us`` after which a silent peer is marked 0 and
skipped instead of hanging the step. The marking needs the "mooncake" process-group backend
(``mooncake.pg``; ``dist.init_process_group(backend="mooncake", pg_options=
pg.MooncakeBackendOptions(active_ranks))``); with a plain NCCL group (how gpu/NOTES.md measured
it) Mooncake treats every rank as alive.

Normal mode (prefill) is not offered by Mooncake EP; this backend falls back to the ``torch``
backend's all-to-all implementation on the same process group for it.

The module imports everywhere; constructing the backend where ``mooncake.ep`` is missing (CPU
builds) raises a RuntimeError that says so.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pd.ep.base import EPConfig, LLDispatch
from pd.ep.torch_ep import TorchNormalMode

# Mooncake's default: a peer silent this long in dispatch/combine is marked inactive.
DEFAULT_TIMEOUT_US = 10_000_000


def mooncake_ep_available() -> bool:
    """True when Mooncake EP's native module imports (CUDA builds of the wheel)."""
    try:
        import mooncake.ep
        import mooncake.mooncake_ep_buffer  # noqa: F401
    except ImportError:
        return False
    return True


def make_mooncake_buffer(
    group: dist.ProcessGroup, max_tokens_per_rank: int, hidden: int, num_experts: int
) -> Any:
    """Allocate a Mooncake EP ``Buffer`` sized by ``Buffer.get_ep_buffer_size_hint``. Collective.

    Mooncake supports one Buffer per process: to serve several shapes (e.g. a benchmark sweep),
    size one for the largest and pass it to every ``MooncakeEP(buffer=...)``.
    """
    try:
        import mooncake.ep  # noqa: F401  (the native module; the Python wrapper imports it lazily)
        from mooncake.mooncake_ep_buffer import Buffer
    except ImportError as e:
        raise RuntimeError(
            "the mooncake EP backend needs Mooncake EP (the CUDA build of the mooncake "
            f"transfer-engine wheel, e.g. mooncake-transfer-engine-cuda13); import failed: {e}"
        ) from e
    size = Buffer.get_ep_buffer_size_hint(max_tokens_per_rank, hidden, group.size(), num_experts)
    return Buffer(group, num_ep_buffer_bytes=size)


class MooncakeEP(TorchNormalMode):
    """Low-latency dispatch/combine through Mooncake EP; normal mode through ``torch``.

    Requirements (Mooncake's): CUDA device, bfloat16, hidden a multiple of 128, T <= M.
    Options: ``buffer`` an existing Mooncake Buffer (``make_mooncake_buffer``) large enough for
    this config, else one is allocated; ``timeout_us`` per dispatch/combine (-1: wait forever).

    Lifetimes: ``ll_dispatch``'s ``recv_x``/``recv_count`` and ``ll_combine``'s output live in
    Mooncake's registered buffer and are overwritten by later calls (as in DeepEP: hold at most
    the results of the latest dispatch and combine). ``active_ranks`` is a persistent int32 ``[W]``
    device tensor that Mooncake updates in place (0 = peer timed out). bf16 only (``use_fp8``
    off). Graph capture of dispatch+combine was verified on 2 H200s (gpu/NOTES.md) when Mooncake
    uses its NVLink/IBGDA path; its pure-Python fallback path (``uses_fallback``) syncs the host
    and cannot be captured.
    """

    name = "mooncake"

    def __init__(
        self,
        config: EPConfig,
        group: dist.ProcessGroup | None,
        *,
        buffer: Any = None,
        timeout_us: int = DEFAULT_TIMEOUT_US,
    ) -> None:
        super().__init__(config, group)
        if not mooncake_ep_available():
            raise RuntimeError(
                "the mooncake EP backend needs Mooncake EP (the CUDA build of the mooncake transfer-engine "
                "wheel, e.g. mooncake-transfer-engine-cuda13); `import mooncake.ep` fails here"
            )
        if group is None:
            raise ValueError("the mooncake EP backend needs a process group")
        if config.device.type != "cuda":
            raise ValueError(f"the mooncake EP backend runs on CUDA devices, got {config.device}")
        if config.dtype != torch.bfloat16 or config.hidden % 128:
            raise ValueError(
                f"Mooncake EP needs bfloat16 and hidden % 128 == 0, got {config.dtype} and hidden={config.hidden}"
            )
        if buffer is None:
            buffer = make_mooncake_buffer(
                group, config.max_tokens_per_rank, config.hidden, config.num_experts
            )
        self._buffer = buffer
        self.timeout_us = timeout_us
        self.active_ranks = torch.ones(config.world_size, dtype=torch.int32, device=config.device)

    @property
    def uses_fallback(self) -> bool:
        """True when Mooncake found neither NVLink IPC nor IBGDA and runs its Python fallback."""
        return bool(getattr(self._buffer, "_use_fallback", False))

    def ll_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> LLDispatch:
        self._check_ll(x, topk_idx)
        cfg = self.config
        recv_x, recv_count, handle, _event, _hook = self._buffer.dispatch(
            x.contiguous(),
            topk_idx.contiguous(),
            self.active_ranks,
            cfg.max_tokens_per_rank,
            cfg.num_experts,
            self.timeout_us,
            use_fp8=False,
            async_finish=False,
            return_recv_hook=False,
        )
        return LLDispatch(recv_x=recv_x, recv_count=recv_count, handle=handle)

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: object
    ) -> torch.Tensor:
        self._check_ll_combine(y, topk_idx, topk_weights)
        out, _event, _hook = self._buffer.combine(
            y.contiguous(),
            topk_idx.contiguous(),
            topk_weights.contiguous(),
            self.active_ranks,
            self.timeout_us,
            handle,
            async_finish=False,
            return_recv_hook=False,
        )
        return out
