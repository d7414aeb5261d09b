"""Multi-head latent attention (MLA) of DeepSeek-V3."""

from __future__ import annotations

import torch
from torch import nn

from pd.config import FP8Quant, ModelConfig
from pd.kernels import mla_rope, skinny
from pd.model.context import ForwardContext
from pd.model.layers import RMSNorm, RotaryEmbedding
from pd.model.quant import linear
from pd.types import BatchMode


def q_kv_a_parts(cfg: ModelConfig) -> tuple[int, int]:
    """Rows of ``q_kv_a_proj``'s two parts: the first query projection's (``q_a_proj``, or ``q_proj`` without a
    query LoRA), then ``kv_a_proj_with_mqa``'s."""
    return (
        cfg.q_lora_rank or cfg.num_attention_heads * cfg.qk_head_dim,
        cfg.kv_lora_rank + cfg.qk_rope_head_dim,
    )


class MLAttention(nn.Module):
    """MLA with a latent KV cache.

    The cache holds, per token, ``c_kv`` (``kv_lora_rank``, normalised) and the rotated ``k_pe``
    (``qk_rope_head_dim``). Extend expands the context latent through ``kv_b_proj`` into per-head
    keys and values; decode absorbs ``kv_b_proj`` into the query and the output instead.

    With ``quant`` the projections hold block-FP8 weights, except ``kv_b_proj``: decode uses it as two
    per-head factors, so it stays in the activation dtype (dequantized on load; it is small: 32 MB of
    DeepSeek-V3's 61 layers x 16.8M parameters... per layer 16.8M values).
    """

    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, quant: FP8Quant | None = None
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        h, qk = cfg.hidden_size, cfg.qk_head_dim
        # The first query projection (q_a_proj, or q_proj without a query LoRA) and kv_a_proj_with_mqa read the
        # same input: one GEMM over their rows stacked (the checkpoint's two tensors fill its two parts).
        self.q_kv_a_parts = q_kv_a_parts(cfg)
        self.q_kv_a_proj = linear(h, sum(self.q_kv_a_parts), quant, parts=self.q_kv_a_parts)
        if cfg.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = linear(cfg.q_lora_rank, self.num_heads * qk, quant)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = linear(self.num_heads * self.v_dim, h, quant)
        self.rotary = rotary

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head: ``w_uk [Hh, nope, kv_lora]`` and ``w_uv [Hh, v, kv_lora]``.

        Views of the loaded weight; computed on use so they always follow it.
        """
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, kv = self.q_kv_a_proj(x).split(self.q_kv_a_parts, dim=-1)  # kv: [T, kv_lora + rope]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        attn = ctx.attn
        if mla_rope.usable(kv):  # one kernel, the cache write included
            norm, rotary, cache = self.kv_a_layernorm, self.rotary, attn.store_target(self.layer)
            q_rope, latent = mla_rope.mla_rope_norm(
                q_rope, kv, positions, rotary.cos_sin, norm.weight, norm.eps, rotary.interleave, cache
            )
        else:
            c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            q_rope, k_rope = self.rotary.rotate_pair(positions, q_rope, k_rope)
            latent = torch.cat([self.kv_a_layernorm(c_kv), k_rope], dim=-1)  # [T, kv_lora + rope]
            attn.store(self.layer, latent)
        if ctx.kv_stored is not None:
            ctx.kv_stored(self.layer)

        if ctx.mode is BatchMode.EXTEND:
            context = attn.context_latent(self.layer, latent).to(x.dtype)  # [S, D]
            s = context.shape[0]
            kv = self.kv_b_proj(context[:, : self.kv_lora_rank]).view(s, self.num_heads, -1)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            k_pe = context[:, None, self.kv_lora_rank :].expand(s, self.num_heads, self.rope_dim)
            k = torch.cat([k_nope, k_pe], dim=-1)
            out = attn.extend(self.layer, torch.cat([q_nope, q_rope], dim=-1), k, v)  # [T, Hh, v]
        else:
            w_uk, w_uv = self.absorbed_weights()
            q_latent = skinny.head_mm(q_nope, w_uk.transpose(1, 2))  # no copies of strided operands on CUDA
            out_latent = attn.decode(self.layer, q_latent, q_rope)  # [T, Hh, kv_lora]
            out = skinny.head_mm(out_latent, w_uv)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))
