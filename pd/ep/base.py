"""The expert-parallel (EP) communication interface.

Routed experts are sharded over the W ranks of an EP group: global expert ``e`` lives on rank
``e // E_local`` (``E_local = E // W``) as its local expert ``e % E_local``. An EP backend moves
tokens to the ranks that own their experts ("dispatch") and brings the expert outputs back
("combine"). Two modes, as in DeepEP:

Normal mode (prefill): eager, variable row counts, host synchronisation allowed.
    ``dispatch(x, topk_idx, topk_weights) -> NormalDispatch``; the caller runs its experts on
    ``recv_x`` and passes the top-k-weighted sum over local experts per received row to
    ``combine(y, handle) -> [T, H]``, which sums the rows of every rank back per source token.

Low-latency mode (decode): static shapes, no host synchronisation (no ``.item()``, ``.tolist()``,
``.nonzero()``, no data-dependent shapes), CUDA-graph capturable where the backend allows.
    ``ll_dispatch(x, topk_idx) -> LLDispatch`` returns the "masked" layout
    ``recv_x [E_local, M * W, H]`` with ``recv_count [E_local]``; the caller runs local expert
    ``e`` on ``recv_x[e, :recv_count[e]]`` and passes the unweighted outputs in the same layout to
    ``ll_combine(y, topk_idx, topk_weights, handle) -> [T, H]``, which applies the weights and
    sums per source token.
    With ``EPConfig.ll_fp8`` the dispatch moves FP8: ``recv_x`` is float8_e4m3fn and
    ``recv_scale [E_local, M * W, H / 128]`` float32 holds one scale per row per 128 columns
    (``pd.ep.fp8``: scale = amax / 448, x ~= q * scale). Combine always moves ``dtype``.

Conventions for every backend:
- ``topk_idx`` holds GLOBAL expert ids (int64); ``-1`` means "no expert" for that slot and is
  how CUDA-graph padding rows are made inert. A row must not name the same expert twice (a
  router's top-k never does); backends do not check this in low-latency mode.
- Lockstep: every rank of the group calls the same sequence of dispatch/combine; a rank with no
  tokens still calls them (normal mode with T = 0, low-latency mode with any T <= M).
- How many copies of a token cross the wire is the backend's business: normal mode delivers it
  once per rank (the ``torch`` backend does so in low-latency mode too); DeepEP and Mooncake
  low-latency send one copy per (token, expert).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist

__all__ = ["EPBackend", "EPConfig", "LLDispatch", "NormalDispatch"]


@dataclass(frozen=True)
class EPConfig:
    """What an EP backend is built for; fixed for its lifetime.

    num_experts: E, global number of routed experts; must be divisible by world_size.
    hidden: H, the model's hidden size (columns of x).
    max_tokens_per_rank: M, the most tokens any rank passes to one ``ll_dispatch`` call; the
        same on every rank. Sizes the low-latency buffers (normal mode has no limit).
    dtype: dtype of x and of the expert outputs (bf16 on GPUs; float32 for CPU tests).
    rank, world_size: this rank's index in the EP group and the group's size W.
    device: where tensors live (``cuda:<i>`` or ``cpu``).
    ll_fp8: low-latency dispatch sends x as float8_e4m3fn rows plus float32 scales, one per row
        per 128 columns (dynamic: scale = amax / 448, an all-zero group is safe; ``pd.ep.fp8``),
        and ``LLDispatch`` returns them as ``recv_x`` / ``recv_scale``. Requires
        ``hidden % 128 == 0``. Normal-mode dispatch and every combine stay in ``dtype``.
    """

    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    dtype: torch.dtype = torch.bfloat16
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ll_fp8: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.num_experts < 1 or self.num_experts % self.world_size:
            raise ValueError(
                f"num_experts={self.num_experts} must be a positive multiple of world_size={self.world_size}"
            )
        if self.hidden < 1 or self.max_tokens_per_rank < 1:
            raise ValueError(
                f"hidden={self.hidden} and max_tokens_per_rank={self.max_tokens_per_rank} must be positive"
            )
        if self.ll_fp8 and self.hidden % 128:
            raise ValueError(
                f"ll_fp8 quantizes in groups of 128 columns: hidden={self.hidden} is not a multiple of 128"
            )

    @property
    def num_local_experts(self) -> int:
        """E_local = E // W: experts on each rank."""
        return self.num_experts // self.world_size

    @property
    def first_local_expert(self) -> int:
        """Global id of this rank's local expert 0."""
        return self.rank * self.num_local_experts

    @property
    def ll_rows_per_expert(self) -> int:
        """M * W: rows per local expert in the low-latency layout (every token of every rank)."""
        return self.max_tokens_per_rank * self.world_size


@dataclass(frozen=True)
class NormalDispatch:
    """Result of normal-mode ``dispatch`` on one rank (N = rows received here).

    recv_x: ``[N, H]``, config dtype. Each source token (of any rank) that has at least one
        expert on this rank arrives exactly once. Backends may also deliver rows without a local
        expert (the ``local`` backend delivers every token); their recv_topk_idx row is all -1.
    recv_topk_idx: ``[N, K]`` int64, LOCAL expert ids in ``[0, E_local)``, or -1 where the
        token's expert lives elsewhere (or the source slot was -1).
    recv_topk_weights: ``[N, K]`` float32, the source's weights; 0 where recv_topk_idx is -1.
    recv_counts: ``[E_local]`` int64 on the device: entries of recv_topk_idx equal to each local
        expert (rows that local expert must process). ``num_recv_per_expert`` is the same as
        Python ints (reading it synchronises with the device).
    handle: opaque; pass it to ``combine``. Owned by the caller; valid until that combine.

    The tensors are freshly allocated (not reused by later calls).
    """

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_counts: torch.Tensor
    handle: object

    @property
    def num_recv_per_expert(self) -> list[int]:
        return self.recv_counts.tolist()


@dataclass(frozen=True)
class LLDispatch:
    """Result of low-latency ``ll_dispatch`` on one rank.

    recv_x: ``[E_local, M * W, H]``, config dtype, or float8_e4m3fn with ``ll_fp8``. The rows
        for local expert e are packed at the front of ``recv_x[e]`` (in no guaranteed order);
        rows from ``recv_count[e]`` on hold stale data. Usually a persistent buffer: it is
        overwritten by the next ``ll_dispatch`` (see each backend), so run the experts before
        dispatching again.
    recv_count: ``[E_local]`` int32 on the device: number of valid rows of each local expert
        (one per (source token, top-k slot) naming it; at most M * W).
    handle: opaque; pass it to the matching ``ll_combine``. Valid until the next ``ll_dispatch``.
    recv_scale: with ``ll_fp8``, ``[E_local, M * W, H / 128]`` float32, contiguous (row-major):
        ``recv_scale[e, r, g]`` scales columns ``[128 g, 128 g + 128)`` of ``recv_x[e, r]``, so
        ``recv_x[e, r] ~= q.float() * scale`` expanded over each group (``pd.ep.fp8.dequant_rows``).
        Same row packing, staleness and lifetime as ``recv_x``. None without ``ll_fp8``.
    """

    recv_x: torch.Tensor
    recv_count: torch.Tensor
    handle: object
    recv_scale: torch.Tensor | None = None


class EPBackend(abc.ABC):
    """One EP group's dispatch/combine. Subclasses: local, torch, mooncake, deepep.

    Constructed collectively (every rank of ``group`` at the same time) with the same config
    apart from ``rank``. ``group`` may be None only when ``world_size == 1``.
    """

    name: ClassVar[str]

    def __init__(self, config: EPConfig, group: dist.ProcessGroup | None) -> None:
        if group is None:
            if config.world_size != 1:
                raise ValueError(f"{self.name}: a process group is needed for world_size={config.world_size}")
        elif (group.rank(), group.size()) != (config.rank, config.world_size):
            raise ValueError(
                f"{self.name}: config says rank {config.rank} of {config.world_size}, "
                f"the process group says rank {group.rank()} of {group.size()}"
            )
        self.config = config
        self.group = group

    # ---- normal mode (prefill) ----

    @abc.abstractmethod
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> NormalDispatch:
        """Send each token to the ranks owning its experts. Collective; may synchronise the host.

        x: ``[T, H]`` config dtype, contiguous. T may differ per rank and may be 0.
        topk_idx: ``[T, K]`` int64 global expert ids in ``[0, E)`` or -1.
        topk_weights: ``[T, K]`` float32.
        The inputs are not retained after the call returns.
        """

    @abc.abstractmethod
    def combine(self, y: torch.Tensor, handle: object) -> torch.Tensor:
        """Return expert outputs to their source ranks and sum them per source token. Collective.

        y: ``[N, H]`` config dtype: for each row of the matching ``NormalDispatch.recv_x``, the sum
            over its local experts of ``weight * expert(row)`` (0 for rows without a local expert).
        Returns ``[T, H]`` config dtype, freshly allocated: the sum over all ranks.
        """

    # ---- low-latency mode (decode) ----

    @abc.abstractmethod
    def ll_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> LLDispatch:
        """Dispatch into the masked layout. Collective; no host sync; static shapes.

        x: ``[T, H]`` config dtype, contiguous, ``T <= M`` (T may differ per rank).
        topk_idx: ``[T, K]`` int64 global expert ids or -1 (skipped: padding rows are all -1).
        Values are not validated (that would synchronise); out-of-range ids are undefined.
        With ``config.ll_fp8`` each row is quantized per 128 columns before it is sent and the
        result carries ``recv_x`` float8_e4m3fn ``[E_local, M * W, H]`` plus ``recv_scale``
        float32 ``[E_local, M * W, H / 128]`` (see ``LLDispatch``); else ``recv_scale`` is None.
        """

    @abc.abstractmethod
    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: object
    ) -> torch.Tensor:
        """Weighted sum of expert outputs per source token. Collective; no host sync.

        y: ``[E_local, M * W, H]`` config dtype (also with ``ll_fp8``), contiguous: expert e's output
            for row r of ``recv_x[e]`` at ``y[e, r]``; rows from ``recv_count[e]`` on are ignored
            (may be garbage, even NaN).
        topk_idx, topk_weights: the ``[T, K]`` int64 / float32 routing of the matching ll_dispatch.
        Returns ``[T, H]`` config dtype: ``sum_k topk_weights[t, k] * expert_{topk_idx[t, k]}(x[t])``
        over the slots that are not -1 (a row of -1 gives 0). Freshly allocated unless the
        backend says otherwise.
        """

    def close(self) -> None:  # noqa: B027 (optional hook, most backends hold nothing to release)
        """Release communication resources (call on every rank before destroying the group)."""

    # ---- input checks shared by the backends (shape/dtype only in low-latency mode) ----

    def _check_routing(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None
    ) -> None:
        cfg = self.config
        if x.dim() != 2 or x.shape[1] != cfg.hidden or x.dtype != cfg.dtype:
            raise ValueError(f"x must be [T, {cfg.hidden}] {cfg.dtype}, got {list(x.shape)} {x.dtype}")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_idx.dtype != torch.int64:
            raise ValueError(
                f"topk_idx must be [{x.shape[0]}, K] int64, got {list(topk_idx.shape)} {topk_idx.dtype}"
            )
        if topk_weights is not None and (
            topk_weights.shape != topk_idx.shape or topk_weights.dtype != torch.float32
        ):
            raise ValueError(
                f"topk_weights must be {list(topk_idx.shape)} float32, "
                f"got {list(topk_weights.shape)} {topk_weights.dtype}"
            )

    def _check_normal(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        self._check_routing(x, topk_idx, topk_weights)
        bad_ids = (topk_idx < -1) | (topk_idx >= self.config.num_experts)
        if topk_idx.numel() and bool(
            bad_ids.any()
        ):  # reads the device: backends whose normal mode syncs anyway
            bad = topk_idx[bad_ids][0].item()
            raise ValueError(
                f"topk_idx holds {bad}; expected -1 or an expert id in [0, {self.config.num_experts})"
            )

    def _check_ll(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None = None
    ) -> None:
        self._check_routing(x, topk_idx, topk_weights)
        if x.shape[0] > self.config.max_tokens_per_rank:
            raise ValueError(
                f"low-latency dispatch of {x.shape[0]} tokens exceeds max_tokens_per_rank="
                f"{self.config.max_tokens_per_rank}"
            )

    def _check_ll_combine(self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        cfg = self.config
        shape = [cfg.num_local_experts, cfg.ll_rows_per_expert, cfg.hidden]
        if list(y.shape) != shape or y.dtype != cfg.dtype:
            raise ValueError(f"y must be {shape} {cfg.dtype}, got {list(y.shape)} {y.dtype}")
        if (
            topk_idx.dim() != 2
            or topk_idx.dtype != torch.int64
            or topk_idx.shape[0] > cfg.max_tokens_per_rank
        ):
            raise ValueError(
                f"topk_idx must be [T <= {cfg.max_tokens_per_rank}, K] int64, "
                f"got {list(topk_idx.shape)} {topk_idx.dtype}"
            )
        if topk_weights.shape != topk_idx.shape or topk_weights.dtype != torch.float32:
            raise ValueError(
                f"topk_weights must be {list(topk_idx.shape)} float32, "
                f"got {list(topk_weights.shape)} {topk_weights.dtype}"
            )
