"""The architectures of the tiny (and benchmark-shaped) DeepSeek-V3 models: `Preset`, `PRESETS` by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

# The tokenizer is trained to the model's vocabulary size up to this many tokens; a preset with a larger
# vocabulary (the benchmark shape) has embedding rows no token of the tokenizer maps to.
MAX_TOKENIZER_VOCAB = 2048

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling as DeepSeek-V3's config.json writes it (`rope_scaling`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def to_config(self) -> dict[str, Any]:
        return {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Preset:
    """The architecture of one tiny (or benchmark-shaped) DeepSeek-V3 model."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    n_shared_experts: int
    moe_intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"  # the default for --dtype

    def __post_init__(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"{self.name}: n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}"
            )
        if not 0 < self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"{self.name}: first_k_dense_replace {self.first_k_dense_replace} out of range")
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype {self.dtype!r}, expected one of {sorted(DTYPES)}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def tokenizer_vocab_size(self) -> int:
        return min(self.vocab_size, MAX_TOKENIZER_VOCAB)


_CI = Preset(
    name="ci",
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    intermediate_size=128,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    moe_intermediate_size=32,
    max_position_embeddings=4096,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _CI,
        dataclasses.replace(
            _CI,
            name="nolora-groups",
            q_lora_rank=None,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=2,
        ),
        dataclasses.replace(
            _CI,
            name="yarn",
            max_position_embeddings=1024,
            rope_scaling=YarnScaling(
                factor=4.0, original_max_position_embeddings=256, mscale=0.707, mscale_all_dim=1.0
            ),
        ),
        dataclasses.replace(_CI, name="tied", tie_word_embeddings=True),
        # Tiny, but with DeepSeek-V3's attention widths (latent 512 + 64, heads 128 + 64 / 128), which
        # FlashInfer's MLA kernels are built for: the GPU correctness tests run it.
        dataclasses.replace(
            _CI,
            name="gpu-tiny",
            hidden_size=256,
            intermediate_size=512,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            moe_intermediate_size=128,
        ),
        # DESIGN.md §8's benchmark shape (sized like Moonlight-16B-A3B): meant for --config-only.
        Preset(
            name="moonlight-shape",
            vocab_size=163840,
            hidden_size=2048,
            num_hidden_layers=27,
            first_k_dense_replace=1,
            intermediate_size=11264,
            num_attention_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_group=1,
            topk_group=1,
            n_shared_experts=2,
            moe_intermediate_size=1408,
            max_position_embeddings=8192,
            rope_theta=50000.0,
            routed_scaling_factor=2.446,
            rms_norm_eps=1e-5,
            dtype="bfloat16",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}") from None
