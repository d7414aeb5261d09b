"""The DeepSeek-V3 causal LM over flattened tokens (no padding): ``[T]`` ids -> logits of chosen rows."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from pd.config import FP8Quant, ModelConfig
from pd.ep.base import EPBackend
from pd.ep.placement import PlacementMap
from pd.model.context import ForwardContext
from pd.model.layers import MLP, RMSNorm, RotaryEmbedding
from pd.model.mla import MLAttention
from pd.model.moe import MoE, Pieces, run_pieces


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        rotary: RotaryEmbedding,
        ep: EPBackend,
        placement: PlacementMap | None,
        quant: FP8Quant | None,
    ) -> None:
        super().__init__()
        self.self_attn = MLAttention(cfg, layer, rotary, quant)
        moe = cfg.is_moe_layer(layer)
        self.mlp = (
            MoE(cfg, ep, placement, quant) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, quant)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the previous layer's output; ``residual``: the stream before it (None at layer 0).
        Returns this layer's output and the stream before it; the sum of the two is the hidden state."""
        return run_pieces(self.pieces(x, residual, positions, ctx))

    def pieces(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, ctx: ForwardContext
    ) -> Pieces[tuple[torch.Tensor, torch.Tensor]]:
        """``forward`` cut at its routed experts (``pd.model.moe.run_pieces``)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        if not isinstance(self.mlp, MoE):
            return self.mlp(h), residual
        call = self.mlp.route(h, ctx)
        routed = yield call
        return self.mlp.finish(call, routed), residual


class DeepseekV3Model(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        ep: EPBackend,
        max_positions: int,
        placement: PlacementMap | None,
        quant: FP8Quant | None,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, max_positions)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rotary, ep, placement, quant) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    """Parameter names follow the Hugging Face checkpoint, except the merged ``gate_up_proj`` and
    ``self_attn.q_kv_a_proj`` and the stacked routed experts ``mlp.experts.w13`` / ``w2`` (see
    ``pd.model.weights``). With ``quant`` the linear projections hold block-FP8 weights (``pd.model.quant``);
    router, norms, embeddings, lm_head and ``kv_b_proj`` stay in the activation dtype."""

    def __init__(
        self,
        cfg: ModelConfig,
        ep: EPBackend,
        max_positions: int,
        placement: PlacementMap | None = None,
        quant: FP8Quant | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.placement = placement
        self.quant = quant
        self.model = DeepseekV3Model(cfg, ep, max_positions, placement, quant)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for p in self.parameters():
            p.requires_grad_(False)

    def expert_token_counts(self) -> torch.Tensor:
        """``[E_local]`` int64: (token, expert) pairs each local expert slot received, summed over MoE layers."""
        total = sum(layer.mlp.expert_tokens for layer in self.model.layers if isinstance(layer.mlp, MoE))
        assert isinstance(total, torch.Tensor), "the model has no MoE layer"
        return total

    def reset_expert_token_counts(self) -> None:
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.expert_tokens.zero_()

    def idle(self, low_latency: bool) -> None:
        """A step with no tokens: every MoE layer joins its EP collectives, in forward order."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.idle(low_latency)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``input_ids``, ``positions`` ``[T]`` int64 -> float32 logits ``[len(ctx.logits_indices), V]``."""
        return self.logits(self.hidden(input_ids, positions, ctx, ctx.logits_indices))

    def hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor
    ) -> torch.Tensor:
        """``input_ids``, ``positions`` ``[T]`` int64 -> the final-normed hidden states of ``rows``
        (``[R]`` int64) ``[R, hidden]``."""
        return run_pieces(self.hidden_pieces(input_ids, positions, ctx, rows))

    def hidden_pieces(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor
    ) -> Pieces[torch.Tensor]:
        """``hidden`` cut at every MoE layer's routed experts (``pd.model.moe.run_pieces``)."""
        x = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            x, residual = yield from cast(DecoderLayer, layer).pieces(x, residual, positions, ctx)
        assert residual is not None  # set by the first layer
        x, _ = self.model.norm(x[rows], residual[rows])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[N, hidden]`` -> float32 logits ``[N, V]``."""
        return self.lm_head(hidden).float()
