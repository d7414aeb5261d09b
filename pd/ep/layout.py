"""Device-side index arithmetic shared by the built-in backends' low-latency paths.

Every function here has static output shapes and no host synchronisation (scatter, cumsum,
gather, where), so it can be captured in a CUDA graph. "Dump" slots: an entry that must not be
written anywhere is pointed at one extra row past the end of the destination buffer, so the
number of writes stays static; that row is never read.
"""

from __future__ import annotations

import torch

from pd.ep.base import EPConfig
from pd.ep.fp8 import FP8_DTYPE, GROUP


def token_ranks(topk_idx: torch.Tensor, num_local_experts: int, world_size: int) -> torch.Tensor:
    """``[T, W]`` bool: token t has at least one expert on rank r (-1 slots name no rank)."""
    owner = torch.where(topk_idx >= 0, topk_idx // num_local_experts, world_size)
    hit = torch.zeros(topk_idx.shape[0], world_size + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, owner, True)
    return hit[:, :world_size]


def rank_slots(
    topk_idx: torch.Tensor, num_local_experts: int, world_size: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes in a send buffer of ``world_size`` blocks of ``capacity`` rows.

    topk_idx: ``[T, K]`` int64 global expert ids or -1; requires ``T <= capacity``.
    Returns ``sent [T, W]`` bool (``token_ranks``) and ``slot [T, W]`` int64:
    ``r * capacity + (rank of t among the tokens sent to r)`` where sent, else the dump row
    ``W * capacity``. A token goes to a rank once however many of its experts live there, so
    block r never needs more than T rows.
    """
    sent = token_ranks(topk_idx, num_local_experts, world_size)
    pos = torch.cumsum(sent, dim=0) - 1
    base = torch.arange(world_size, device=topk_idx.device) * capacity
    slot = torch.where(sent, base + pos, world_size * capacity)
    return sent, slot


def expert_slots(
    local_idx: torch.Tensor, num_local_experts: int, rows_per_expert: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of (row, top-k slot) entries in the masked layout ``[E_local, rows_per_expert]``.

    local_idx: ``[R, K]`` integer local expert ids; anything outside ``[0, E_local)`` is "not
        here" (other ranks' experts, -1, empty rows).
    Returns ``valid [R, K]`` bool, ``slot [R, K]`` int64 flat index ``e * rows_per_expert + p``
    (the dump index ``E_local * rows_per_expert`` where not valid) and ``count [E_local]`` int32.
    Entries of one expert are packed in row order. Requires at most ``rows_per_expert`` entries per
    expert, which holds when ``R <= rows_per_expert`` and no row names an expert twice.
    """
    rows, k = local_idx.shape
    valid = (local_idx >= 0) & (local_idx < num_local_experts)
    key = torch.where(valid, local_idx, num_local_experts).reshape(-1, 1).long()
    # One-hot of each entry's expert (last column collects the invalid ones); a running count
    # down the column gives each entry its position among its expert's entries.
    onehot = torch.zeros(rows * k, num_local_experts + 1, dtype=torch.int32, device=local_idx.device)
    onehot.scatter_(1, key, 1)
    pos = torch.cumsum(onehot, dim=0, dtype=torch.int32).gather(1, key).view(rows, k) - 1
    count = onehot[:, :num_local_experts].sum(dim=0, dtype=torch.int32)
    slot = torch.where(valid, key.view(rows, k) * rows_per_expert + pos, num_local_experts * rows_per_expert)
    return valid, slot, count


def weighted_gather_sum(
    y_flat: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``out[r] = sum_k valid[r, k] * weights[r, k] * y_flat[slot[r, k]]`` in float32.

    y_flat: ``[E_local * rows_per_expert, H]``; rows not named by a valid entry may hold garbage
    (NaN included): they are selected away with ``where``, never multiplied by zero.
    slot, valid, weights: ``[R, K]`` (weights float32, may be garbage where not valid).
    Returns ``[R, H]`` float32 (a fresh tensor).
    """
    safe = torch.where(valid, slot, 0)
    gathered = y_flat[safe]
    gathered = torch.where(valid.unsqueeze(-1), gathered, 0).float()
    w = torch.where(valid, weights, 0.0).unsqueeze(1)
    return torch.bmm(w, gathered).squeeze(1)


class MaskedRows:
    """The persistent masked-layout buffers behind a built-in backend's ``LLDispatch``.

    ``E_local * R + 1`` rows of H (R rows per local expert; the last row is the dump row):
    config dtype, or with ``config.ll_fp8`` the e4m3 bytes (kept as uint8 so that the scatter
    needs no float8 kernels) plus ``[E_local * R + 1, H / 128]`` float32 scales. Allocated once;
    every ``put`` overwrites the rows it names, the others keep stale data.
    """

    def __init__(self, config: EPConfig, num_local_experts: int, rows_per_expert: int) -> None:
        self._shape = (num_local_experts, rows_per_expert)
        rows = num_local_experts * rows_per_expert + 1
        self.fp8 = config.ll_fp8
        x_dtype = torch.uint8 if self.fp8 else config.dtype
        self._x = torch.empty(rows, config.hidden, dtype=x_dtype, device=config.device)
        self._scale = (
            torch.empty(rows, config.hidden // GROUP, dtype=torch.float32, device=config.device)
            if self.fp8
            else None
        )

    def put(self, slot: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Write row r (and its scales) to every flat position ``slot[r, k]`` (``expert_slots``).

        rows: ``[R, H]`` config dtype, or with fp8 the e4m3 rows as float8_e4m3fn or uint8 bytes.
        scale: ``[R, H / 128]`` float32 with fp8, else None.
        """
        if self.fp8:
            assert scale is not None and self._scale is not None
            self._x[slot] = rows.view(torch.uint8).unsqueeze(1)
            self._scale[slot] = scale.unsqueeze(1)
        else:
            self._x[slot] = rows.unsqueeze(1)  # the [R, 1, H] value is expanded over K, not copied

    @property
    def recv_x(self) -> torch.Tensor:
        """``[E_local, R, H]`` view: config dtype, or float8_e4m3fn with fp8."""
        x = self._x[:-1].view(FP8_DTYPE) if self.fp8 else self._x[:-1]
        return x.view(*self._shape, x.shape[-1])

    @property
    def recv_scale(self) -> torch.Tensor | None:
        """``[E_local, R, H / 128]`` float32 view with fp8, else None."""
        return None if self._scale is None else self._scale[:-1].view(*self._shape, self._scale.shape[-1])
