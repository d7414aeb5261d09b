"""Reference MLA attention in plain torch: runs on CPU and GPU, the oracle for faster backends."""

from __future__ import annotations

import torch

from pd.attention.base import AttentionBackend, AttnInputs, pad_for_graph
from pd.kv_cache import KVPool
from pd.types import BatchMode


def token_slots(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    """Cache slot (``page * page_size + offset``) of every position in ``[start, end)``.

    ``page_table`` is the sequence's page ids, int64 on the pool's device.
    """
    pos = torch.arange(start, end, device=page_table.device)
    return page_table[pos // page_size] * page_size + pos % page_size


class TorchMLABackend(AttentionBackend):
    """Loops over sequences for extend; pads to the longest context for decode. Math in float32.

    Its graph hooks plan a padded bucket as FlashInfer's do, so the graph classes run (uncaptured) on CPU."""

    def __init__(self, pool: KVPool, softmax_scale: float, kv_lora_rank: int) -> None:
        self.pool = pool
        self.scale = softmax_scale
        self.kv_lora_rank = kv_lora_rank
        self.inputs: AttnInputs | None = None

    def prepare(self, inputs: AttnInputs) -> None:
        device = self.pool.buffer.device
        ps = self.pool.layout.page_size
        tables = [torch.tensor(t, dtype=torch.int64, device=device) for t in inputs.page_tables]
        self.inputs = inputs
        self.out_slots = torch.cat(
            [token_slots(t, s, e, ps) for t, s, e in zip(tables, inputs.starts, inputs.ends)]
        )
        self.ctx_slots = [token_slots(t, 0, e, ps) for t, e in zip(tables, inputs.ends)]
        if inputs.mode is BatchMode.DECODE:  # each query's sequence and position
            q_lens = torch.tensor(inputs.q_lens, device=device)
            self.q_seq = torch.repeat_interleave(torch.arange(len(q_lens), device=device), q_lens)
            self.q_pos = torch.cat(
                [torch.arange(s, e, device=device) for s, e in zip(inputs.starts, inputs.ends)]
            )

    def graph_state(
        self, batch: int, max_pages: int, tokens: int | None = None, max_q_per_row: int | None = None
    ) -> object:
        return (batch, batch if tokens is None else tokens)

    def prepare_graph(self, state: object, inputs: AttnInputs) -> None:
        assert isinstance(state, tuple)
        self.prepare(pad_for_graph(inputs, state[0], state[1], self.pool.layout.page_size))

    def store(self, layer: int, latent: torch.Tensor) -> None:
        self.pool.write_slots(layer, self.out_slots, latent.to(self.pool.layout.dtype))

    def store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.layer(layer), self.out_slots

    def context_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        assert self.inputs is not None, "prepare() comes first"
        if not self.inputs.has_prefix:
            return latent
        return self.pool.read_slots(layer, torch.cat(self.ctx_slots))

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self.inputs is not None, "prepare() comes first"
        out = []
        q_off = kv_off = 0
        for q_len, kv_len in zip(self.inputs.q_lens, self.inputs.ends):
            qi = q[q_off : q_off + q_len].float()
            ki = k[kv_off : kv_off + kv_len].float()
            vi = v[kv_off : kv_off + kv_len].float()
            scores = torch.einsum("qhd,khd->hqk", qi, ki) * self.scale
            # Query j sits at position kv_len - q_len + j and sees keys up to that position.
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] > q_pos[:, None]
            scores.masked_fill_(mask, float("-inf"))
            out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi))
            q_off += q_len
            kv_off += kv_len
        return torch.cat(out).to(q.dtype)

    def decode(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        assert self.inputs is not None, "prepare() comes first"
        max_len = max(self.inputs.ends)
        slots = torch.zeros(len(self.ctx_slots), max_len, dtype=torch.int64, device=q_latent.device)
        for i, s in enumerate(self.ctx_slots):
            slots[i, : s.numel()] = s
        latent = self.pool.read_slots(layer, slots[self.q_seq]).float()  # [T, L, D]: each query's sequence
        c_kv, k_rope = latent[..., : self.kv_lora_rank], latent[..., self.kv_lora_rank :]
        scores = torch.einsum("thc,tlc->thl", q_latent.float(), c_kv)
        scores += torch.einsum("thr,tlr->thl", q_rope.float(), k_rope)
        scores *= self.scale
        visible = torch.arange(max_len, device=q_latent.device)[None, :] <= self.q_pos[:, None]
        scores.masked_fill_(~visible[:, None, :], float("-inf"))
        return torch.einsum("thl,tlc->thc", scores.softmax(-1), c_kv).to(q_latent.dtype)
