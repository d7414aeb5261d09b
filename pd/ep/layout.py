"""Device-side index arithmetic shared by the built-in backends' low-latency paths.

Every function here has static output shapes and no host synchronisation (scatter, cumsum,
gather, where), so it can be captured in a CUDA graph. "Dump" slots: an entry that must not be
written anywhere is pointed at one extra row past the end of the destination buffer, so the
number of writes stays static; that row is never read.
"""

from __future__ import annotations

import torch


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
