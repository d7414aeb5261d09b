"""DeepSeek-V3's multi-token-prediction (MTP) layer: the drafter of speculative decoding (DESIGN.md §11).

Published checkpoints store it after the main layers, as ``model.layers.{num_hidden_layers}.*``:

- ``enorm``, ``hnorm``: RMSNorms of the next token's embedding and of the main model's hidden state;
- ``eh_proj [hidden, 2 * hidden]``: projects ``[enorm(embed(t_{i+1})); hnorm(h_i)]`` (that order) to one
  hidden state;
- a decoder layer (``self_attn``, ``mlp`` -- MoE in DeepSeek-V3 --, ``input_layernorm``,
  ``post_attention_layernorm``), whose MLA cache is one more layer of the KV pool, index
  ``num_hidden_layers`` (``SpeculativeConfig.kv_layers``);
- ``shared_head.norm`` and then the output head;
- ``embed_tokens`` and ``shared_head.head``: copies of the main model's embedding and ``lm_head``. pd
  holds them once: the MTP layer uses the main model's (``pd.model.weights`` checks the copies are equal).

Position ``i`` of a draft step pairs the hidden state of the token at ``i`` with the embedding of the token
at ``i + 1`` and predicts the token at ``i + 2``; its KV goes in the MTP layer's cache at position ``i``.
The hidden state handed in is the main model's final-normed one (the input of ``lm_head``); the MTP layer
hands out its own head input (after ``shared_head.norm``), which the next draft of a chain (K > 1) takes
in the same role.
"""

from __future__ import annotations

import torch
from torch import nn

from pd.config import FP8Quant, ModelConfig
from pd.ep.base import EPBackend
from pd.ep.placement import PlacementMap
from pd.model.context import ForwardContext
from pd.model.deepseek_v3 import DecoderLayer, DeepseekV3ForCausalLM
from pd.model.layers import RMSNorm, RotaryEmbedding
from pd.model.moe import MoE
from pd.speculative import require_mtp_layer

# The MTP layer's checkpoint tensors that are copies of the main model's, and the parameter each copies.
SHARED_COPIES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "shared_head.head.weight": "lm_head.weight",
}


class SharedHead(nn.Module):
    """``shared_head``: its norm (the output head itself is the main model's ``lm_head``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """``model.layers.{num_hidden_layers}``: a decoder layer (attention on KV layer ``num_hidden_layers``)
    with the MTP input projection and head norm. Parameter names are the checkpoint's, less the
    ``model.layers.{n}.`` prefix (the model holds it as ``mtp``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        ep: EPBackend,
        placement: PlacementMap | None,
        quant: FP8Quant | None,
    ) -> None:
        super().__init__(cfg, cfg.num_hidden_layers, rotary, ep, placement, quant)
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)  # unquantized in FP8 checkpoints too
        self.shared_head = SharedHead(cfg)

    def head_input(
        self,
        embedded: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """``embedded``: the next tokens' embeddings ``[T, hidden]``; ``hidden``: the hidden states they
        follow ``[T, hidden]`` (activation dtype); ``positions [T]`` int64, those of ``hidden``. Stores the
        layer's KV for all ``T`` rows and returns the output head's input (after ``shared_head.norm``) of
        ``rows`` (``[R]`` int64): ``[R, hidden]``."""
        e = self.enorm(embedded)
        h = self.hnorm(hidden)
        assert isinstance(e, torch.Tensor) and isinstance(h, torch.Tensor)  # no residual given
        x = self.eh_proj(torch.cat([e, h], dim=-1))
        out, residual = self(x, None, positions, ctx)
        normed, _ = self.shared_head.norm(out[rows], residual[rows])
        return normed

    def idle(self, low_latency: bool) -> None:
        """A draft step with no tokens: the layer's MoE joins its EP collectives."""
        if isinstance(self.mlp, MoE):
            self.mlp.idle(low_latency)


class DeepseekV3WithMTP(DeepseekV3ForCausalLM):
    """The causal LM plus its MTP layer (``mtp``), which drafts with the main model's embedding and
    ``lm_head``. Refuses a config without an MTP layer (``num_nextn_predict_layers`` 0)."""

    def __init__(
        self,
        cfg: ModelConfig,
        ep: EPBackend,
        max_positions: int,
        placement: PlacementMap | None = None,
        quant: FP8Quant | None = None,
    ) -> None:
        require_mtp_layer(cfg)
        super().__init__(cfg, ep, max_positions, placement, quant)
        self.mtp = MTPLayer(cfg, self.model.rotary, ep, placement, quant)
        for p in self.mtp.parameters():
            p.requires_grad_(False)

    def draft(
        self,
        hidden: torch.Tensor,
        next_token_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP step over ``T`` rows: ``hidden [T, hidden]`` (activation dtype: the main model's
        final-normed hidden states, or a previous draft's returned ones), ``next_token_ids [T]`` int64 (the
        token after each), ``positions [T]`` int64 (those of ``hidden``; the MTP layer's KV is stored there,
        in KV layer ``num_hidden_layers`` through ``ctx.attn``, prepared for that layer's cache as for any
        layer's). Returns, for the rows ``ctx.logits_indices`` (``R`` of them), float32 draft logits
        ``[R, V]`` of the token after ``next_token_ids`` and the hidden states ``[R, hidden]`` that a chained
        next draft takes."""
        embedded = self.model.embed_tokens(next_token_ids)
        head_input = self.mtp.head_input(embedded, hidden, positions, ctx, ctx.logits_indices)
        return self.logits(head_input), head_input
