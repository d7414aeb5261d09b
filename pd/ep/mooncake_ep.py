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

FP8 dispatch (``EPConfig.ll_fp8``; read in Mooncake's source, ``mooncake-wheel/mooncake/
mooncake_ep_buffer.py`` ``Buffer.dispatch`` and ``mooncake-ep/src/mooncake_ep_kernel.cu``
``dispatch``, v0.3.12.post1 and the Aug 2026 main branch; the GPU host's 0.3.14 wheel is newer
and was not read): with ``use_fp8=True`` the first return
value is the tuple ``(x, scales)``: x ``[E_local, W * M, H]`` float8_e4m3fn and scales
``[E_local, W * M, H / 128]`` float32 allocated as ``[E_local, H / 128, W * M]`` and transposed
(column-major in the last two dims, strides ``(H / 128 * W * M, 1, W * M)``). The kernel
quantizes each row in groups of 128 columns: amax = max(|x|, 1e-4), stored scale = amax / 448
(no power-of-2 rounding, no UE8M0 option), e4m3 = saturating cast of ``x * (448 / amax)``. So
dequant = q * scale, as ``pd.ep.fp8``; the bytes may differ from ``quant_rows``' in the last bit
(reciprocal multiply) and an all-zero group gets scale 1e-4 / 448 instead of 1e-10 / 448 (q = 0
either way). Mooncake needs ``W * M % 4 == 0`` for FP8 (TMA-aligned scales). The scales are made
row-major here with ``.contiguous()`` (one device copy, graph-capturable). Combine stays bf16.
Mooncake's pure-Python fallback path returns row-major scales (amax floored at 1e-4 too); the
same conversion leaves them as they are.

The module imports everywhere; constructing the backend where ``mooncake.ep`` is missing (CPU
builds) raises a RuntimeError that says so.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pd.ep.base import EPConfig, LLDispatch
from pd.ep.fp8 import library_ll_recv
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

    Requirements (Mooncake's): CUDA device, bfloat16, hidden a multiple of 128, T <= M; with
    ``ll_fp8`` also ``W * M % 4 == 0``.
    Options: ``buffer`` an existing Mooncake Buffer (``make_mooncake_buffer``) large enough for
    this config, else one is allocated; ``timeout_us`` per dispatch/combine (-1: wait forever).

    Lifetimes: treat ``ll_dispatch``'s ``recv_x``/``recv_scale``/``recv_count`` and
    ``ll_combine``'s output as valid until the next call of the same kind (the Mooncake source
    read allocates them, and the handle's tensors, per call with ``torch.empty``, outside its
    registered buffer). ``active_ranks`` is a persistent int32 ``[W]`` device tensor that Mooncake
    updates in place (0 = peer timed out). ``ll_fp8`` passes ``use_fp8=True`` (module docstring:
    the layout Mooncake returns and how it is mapped). Graph capture of bf16 dispatch+combine was
    verified on 2 H200s (gpu/NOTES.md) when Mooncake uses its NVLink/IBGDA path; its pure-Python
    fallback path (``uses_fallback``) syncs the host and cannot be captured.
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
        if config.ll_fp8 and config.ll_rows_per_expert % 4:
            raise ValueError(
                f"Mooncake EP's FP8 dispatch needs world_size * max_tokens_per_rank % 4 == 0, "
                f"got {config.world_size} * {config.max_tokens_per_rank}"
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
        recv, recv_count, handle, _event, _hook = self._buffer.dispatch(
            x.contiguous(),
            topk_idx.contiguous(),
            self.active_ranks,
            cfg.max_tokens_per_rank,
            cfg.num_experts,
            self.timeout_us,
            use_fp8=cfg.ll_fp8,
            async_finish=False,
            return_recv_hook=False,
        )
        recv_x, recv_scale = library_ll_recv(recv, cfg.ll_fp8)
        return LLDispatch(recv_x, recv_count, handle, recv_scale)

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
