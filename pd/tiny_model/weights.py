"""The checkpoint's tensors: their names, shapes and dtypes as Hugging Face DeepSeek-V3 checkpoints have
them (`tensor_specs`), and their random values (`random_tensor`), each tensor from its own random stream
keyed by (seed, tensor name)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from pd.tiny_model.presets import DTYPES, Preset

# Initialization: a linear layer's weight has std GAIN / sqrt(fan_in), so a unit-RMS input gives outputs of
# RMS about GAIN. The logits then have a spread of about LOGIT_GAIN (the final norm makes the hidden state
# unit-RMS), large enough that greedy choices do not hinge on near-ties, and router logits have a spread of
# about ROUTER_GAIN so that sigmoid scores, and so the chosen experts, vary by token.
_LINEAR_GAIN = 1.0
_LOGIT_GAIN = 4.0
_ROUTER_GAIN = 2.0
_NORM_NOISE = 0.1  # RMSNorm weights are 1 + N(0, this)
_EXPERT_BIAS_STD = 0.1  # e_score_correction_bias ~ N(0, this): comparable to gaps between sigmoid scores
_EMBED_STD = 1.0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_specs(preset: Preset, dtype: str, with_mtp: bool = False) -> list[TensorSpec]:
    """Every tensor of the checkpoint, sorted by name. `e_score_correction_bias` is always float32 (as
    published); everything else has `dtype`."""
    p = preset
    wdtype = DTYPES[dtype]
    specs: list[TensorSpec] = []

    def add(name: str, *shape: int, dt: torch.dtype = wdtype) -> None:
        specs.append(TensorSpec(name, shape, dt))

    def add_layer(i: int) -> None:
        pre = f"model.layers.{i}"
        H = p.hidden_size
        q_out = p.num_attention_heads * p.qk_head_dim
        if p.q_lora_rank is None:
            add(f"{pre}.self_attn.q_proj.weight", q_out, H)
        else:
            add(f"{pre}.self_attn.q_a_proj.weight", p.q_lora_rank, H)
            add(f"{pre}.self_attn.q_a_layernorm.weight", p.q_lora_rank)
            add(f"{pre}.self_attn.q_b_proj.weight", q_out, p.q_lora_rank)
        add(f"{pre}.self_attn.kv_a_proj_with_mqa.weight", p.kv_lora_rank + p.qk_rope_head_dim, H)
        add(f"{pre}.self_attn.kv_a_layernorm.weight", p.kv_lora_rank)
        add(
            f"{pre}.self_attn.kv_b_proj.weight",
            p.num_attention_heads * (p.qk_nope_head_dim + p.v_head_dim),
            p.kv_lora_rank,
        )
        add(f"{pre}.self_attn.o_proj.weight", H, p.num_attention_heads * p.v_head_dim)
        add(f"{pre}.input_layernorm.weight", H)
        add(f"{pre}.post_attention_layernorm.weight", H)

        def add_mlp(mlp: str, inter: int) -> None:
            add(f"{mlp}.gate_proj.weight", inter, H)
            add(f"{mlp}.up_proj.weight", inter, H)
            add(f"{mlp}.down_proj.weight", H, inter)

        if i < p.first_k_dense_replace:
            add_mlp(f"{pre}.mlp", p.intermediate_size)
        else:
            add(f"{pre}.mlp.gate.weight", p.n_routed_experts, H)
            add(f"{pre}.mlp.gate.e_score_correction_bias", p.n_routed_experts, dt=torch.float32)
            for e in range(p.n_routed_experts):
                add_mlp(f"{pre}.mlp.experts.{e}", p.moe_intermediate_size)
            add_mlp(f"{pre}.mlp.shared_experts", p.moe_intermediate_size * p.n_shared_experts)

    add("model.embed_tokens.weight", p.vocab_size, p.hidden_size)
    for i in range(p.num_hidden_layers):
        add_layer(i)
    add("model.norm.weight", p.hidden_size)
    if not p.tie_word_embeddings:
        add("lm_head.weight", p.vocab_size, p.hidden_size)
    if with_mtp:
        # The multi-token-prediction module as published checkpoints store it: a decoder layer plus the
        # projection of [norm(embedding); norm(hidden)] and its own copy of the embedding and output head.
        n = p.num_hidden_layers
        add_layer(n)
        add(f"model.layers.{n}.embed_tokens.weight", p.vocab_size, p.hidden_size)
        add(f"model.layers.{n}.enorm.weight", p.hidden_size)
        add(f"model.layers.{n}.hnorm.weight", p.hidden_size)
        add(f"model.layers.{n}.eh_proj.weight", p.hidden_size, 2 * p.hidden_size)
        add(f"model.layers.{n}.shared_head.norm.weight", p.hidden_size)
        add(f"model.layers.{n}.shared_head.head.weight", p.vocab_size, p.hidden_size)
    return sorted(specs, key=lambda s: s.name)


def _stream_name(spec: TensorSpec, preset: Preset) -> str:
    """The tensor whose random values `spec` takes: the MTP layer's embedding and output head are copies of
    the main model's, as in published checkpoints."""
    if spec.name.endswith(".embed_tokens.weight"):
        return "model.embed_tokens.weight"
    if spec.name.endswith(".shared_head.head.weight"):
        return "model.embed_tokens.weight" if preset.tie_word_embeddings else "lm_head.weight"
    return spec.name


def _init_std(name: str, shape: tuple[int, ...], preset: Preset) -> float:
    """Standard deviation of tensor `name`'s random values (centred on 1 for RMSNorm weights, else on 0)."""
    if name.endswith("e_score_correction_bias"):
        return _EXPERT_BIAS_STD
    if len(shape) == 1:
        return _NORM_NOISE
    if name == "model.embed_tokens.weight":
        # A tied embedding is also the output head: scale it like one.
        return _LOGIT_GAIN / math.sqrt(shape[1]) if preset.tie_word_embeddings else _EMBED_STD
    # A linear layer's [out, in] weight.
    if name == "lm_head.weight":
        gain = _LOGIT_GAIN
    elif name.endswith("mlp.gate.weight"):
        gain = _ROUTER_GAIN
    else:
        gain = _LINEAR_GAIN
    return gain / math.sqrt(shape[1])


def random_tensor(spec: TensorSpec, preset: Preset, seed: int) -> torch.Tensor:
    """The values of one tensor of the checkpoint, from a random stream keyed by (seed, tensor name)."""
    name = _stream_name(spec, preset)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
    values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(
        _init_std(name, spec.shape, preset)
    )
    if len(spec.shape) == 1 and not name.endswith("e_score_correction_bias"):
        values += np.float32(1.0)  # RMSNorm weights
    return torch.from_numpy(values).to(spec.dtype)
