"""A tiny DeepSeek-V3 checkpoint made offline: the input every test hands to its oracle.

`make_tiny_model` writes, deterministically (same arguments, byte-identical files):

- `config.json` in the style of published DeepSeek-V3 checkpoints (`rope_scaling`, not transformers 5's
  `rope_parameters`; `torch_dtype`; `num_nextn_predict_layers`),
- random weights named as Hugging Face DeepSeek-V3 checkpoints name them (one tensor per expert), in one
  `model.safetensors` or in shards with `model.safetensors.index.json`, optionally with the MTP layer
  `model.layers.{num_hidden_layers}.*` that published checkpoints carry and serving skips,
- a small byte-level BPE tokenizer trained on text generated here, DeepSeek's special tokens, a
  DeepSeek-like chat template (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`).

Every tensor is drawn from its own random stream keyed by (seed, tensor name), so a tensor does not depend
on which other tensors are written (the model with `--with-mtp` has the same base weights as without).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"

# DeepSeek-like: system prompts first (joined by a blank line) after BOS, then user and assistant turns,
# EOS closing each assistant turn, and the assistant tag as the generation prompt.
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = false -%}{%- endif -%}"
    "{%- set ns = namespace(system_prompt='', seen_system=false) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if ns.seen_system -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' -%}{%- endif -%}"
    "{%- set ns.system_prompt = ns.system_prompt + message['content'] -%}"
    "{%- set ns.seen_system = true -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    f"{{{{- '{USER_TOKEN}' + message['content'] -}}}}"
    "{%- elif message['role'] == 'assistant' -%}"
    f"{{{{- '{ASSISTANT_TOKEN}' + message['content'] + eos_token -}}}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('Unknown message role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT_TOKEN}' -}}}}{{%- endif -%}}"
)

# The tokenizer is trained to the model's vocabulary size up to this many tokens; a preset with a larger
# vocabulary (the benchmark shape) has embedding rows no token of the tokenizer maps to.
MAX_TOKENIZER_VOCAB = 2048
_TOKENIZER_CORPUS_SEED = 20240101  # the tokenizer depends on its vocabulary size only, not on --seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}

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


# ---------------------------------------------------------------------------------------------- config


def model_config(preset: Preset, *, bos_token_id: int, eos_token_id: int, dtype: str, with_mtp: bool) -> dict:
    """config.json as published DeepSeek-V3 checkpoints write it."""
    p = preset
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "first_k_dense_replace": p.first_k_dense_replace,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "kv_lora_rank": p.kv_lora_rank,
        "max_position_embeddings": p.max_position_embeddings,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": p.moe_intermediate_size,
        "moe_layer_freq": 1,
        "n_group": p.n_group,
        "n_routed_experts": p.n_routed_experts,
        "n_shared_experts": p.n_shared_experts,
        "norm_topk_prob": p.norm_topk_prob,
        "num_attention_heads": p.num_attention_heads,
        "num_experts_per_tok": p.num_experts_per_tok,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_attention_heads,
        "num_nextn_predict_layers": 1 if with_mtp else 0,
        "q_lora_rank": p.q_lora_rank,
        "qk_nope_head_dim": p.qk_nope_head_dim,
        "qk_rope_head_dim": p.qk_rope_head_dim,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_scaling": p.rope_scaling.to_config() if p.rope_scaling else None,
        "rope_theta": p.rope_theta,
        "routed_scaling_factor": p.routed_scaling_factor,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": p.tie_word_embeddings,
        "topk_group": p.topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": dtype,
        "use_cache": True,
        "v_head_dim": p.v_head_dim,
        "vocab_size": p.vocab_size,
    }


# --------------------------------------------------------------------------------------------- weights


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


def _write_safetensors(path: Path, specs: list[TensorSpec], preset: Preset, seed: int) -> None:
    """Writes the safetensors format directly (header with sorted keys and fixed metadata, then the data in
    the same order), generating one tensor at a time so memory stays at one tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            f.write(random_tensor(spec, preset, seed).contiguous().view(torch.uint8).numpy().tobytes())


def _plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


# ------------------------------------------------------------------------------------------- tokenizer

_EN_TEXT = (
    "the of and to in is it that was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call first who may down side "
    "been now find model token server request prefill decode cache page expert router attention latent batch "
    "graph kernel memory transfer stream prompt answer question system user assistant hello world data "
    "learning machine language small large fast slow quick brown fox jumps lazy dog river mountain city "
    "green blue red yellow morning evening night summer winter table window garden music story"
)
_EN_WORDS = tuple(_EN_TEXT.split())
_ACCENTED_TEXT = (
    "café naïve über señor façade résumé Zürich crème brûlée déjà piñata jalapeño smörgåsbord straße "
    "Øresund Ångström élan fiancée garçon Málaga São Paulo Kraków Łódź Ελλάδα καλημέρα Москва привет "
    "mañana año niño Müller Köln Größe français español português"
)
_ACCENTED_WORDS = tuple(_ACCENTED_TEXT.split())
_CJK_TEXT = (
    "中文 你好 世界 模型 日本語 こんにちは 東京 한국어 서울 数据 计算 注意力 専門家 機械学習 大規模 推理 "
    "服务器 请求 缓存 学生 老师 今天 明天 天气 很好 ありがとう さようなら 안녕하세요 감사합니다"
)
_CJK_WORDS = tuple(_CJK_TEXT.split())
_EMOJI = ("🙂", "🚀", "🎉", "👍🏽", "🇫🇷", "❤️", "🤖", "🔥", "✨", "👩‍💻", "🌍", "☕")
_PUNCT = (".", ".", ".", "!", "?", "...", ";")
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiouy"


def _pseudo_word(rng: random.Random) -> str:
    syllables = [rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.4:
        syllables.append(rng.choice(_CONSONANTS))
    return "".join(syllables)


def _corpus(n_lines: int = 6000) -> Iterator[str]:
    """Deterministic training text: sentences from word lists (Zipf-weighted) with invented words, accented
    Latin, Greek, Cyrillic, CJK and emoji (so merges span multi-byte characters), numbers and code."""
    rng = random.Random(_TOKENIZER_CORPUS_SEED)
    pseudo = sorted({_pseudo_word(rng) for _ in range(3000)})
    rng.shuffle(pseudo)
    latin = [*_EN_WORDS, *pseudo]
    latin_weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(latin))]
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.12:
            line = "".join(rng.choices(_CJK_WORDS, k=rng.randint(2, 8))) + rng.choice(("。", "！", "？", ""))
        elif kind < 0.17:
            name = rng.choice(latin[:200])
            line = f"def {name}(x, y={rng.randint(0, 99)}):\n    return x * {rng.randint(1, 9)} + y  # {rng.choice(latin)}"
        else:
            words = rng.choices(latin, weights=latin_weights, k=rng.randint(4, 16))
            for _ in range(rng.randint(0, 3)):
                extra = rng.random()
                if extra < 0.45:
                    word = rng.choice(_ACCENTED_WORDS)
                elif extra < 0.65:
                    word = rng.choice(_CJK_WORDS)
                elif extra < 0.85:
                    word = rng.choice(_EMOJI)
                else:
                    word = str(
                        rng.choice(
                            (rng.randint(0, 100), rng.randint(0, 100000), round(rng.random() * 100, 2))
                        )
                    )
                words.insert(rng.randrange(len(words) + 1), word)
            line = " ".join(words).capitalize() + rng.choice(_PUNCT)
            if rng.random() < 0.1:
                line = f'"{line}" {rng.choice(("she said", "he asked", "they wrote"))}.'
        yield line + ("\n" if rng.random() < 0.3 else "")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: BOS and EOS (special, ids 0 and 1), the 256
    byte symbols and merges learned on `_corpus()`, then the User and Assistant tags (added, not special, as
    DeepSeek-V3's tokenizer has them) as the last two ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)]
    chat_tags = [AddedToken(t, special=False, normalized=False) for t in (USER_TOKEN, ASSISTANT_TOKEN)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(chat_tags),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.add_tokens(chat_tags)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"trained tokenizer has {tokenizer.get_vocab_size()} tokens, expected {vocab_size}: the generated "
            "corpus is too small for this vocabulary"
        )
    return tokenizer


def _token_entry(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _tokenizer_config(max_length: int) -> dict[str, Any]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _token_entry(BOS_TOKEN),
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": _token_entry(EOS_TOKEN),
        "legacy": True,
        "model_max_length": max_length,
        "pad_token": _token_entry(EOS_TOKEN),
        # DeepSeek-V3 names LlamaTokenizerFast here, which transformers 5 rebuilds as a SentencePiece-style
        # tokenizer; the generic class loads tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------- writer


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: str | Path,
    preset: str = "ci",
    seed: int = 0,
    *,
    shard_size: int | None = None,
    with_mtp: bool = False,
    config_only: bool = False,
    dtype: str | None = None,
) -> Path:
    """Writes the checkpoint described in the module docstring into `out_dir` (created if missing; weight
    files from an earlier run there are removed) and returns it as a Path.

    shard_size: bytes per weight shard (`model-0000k-of-0000n.safetensors` + index); None: one file.
    dtype: "float32" or "bfloat16"; None: the preset's default.
    """
    p = get_preset(preset)
    dtype = dtype or p.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size {shard_size} must be a positive number of bytes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(p.tokenizer_vocab_size)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(p.max_position_embeddings))
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    config = model_config(p, bos_token_id=bos_id, eos_token_id=eos_id, dtype=dtype, with_mtp=with_mtp)
    _write_json(out / "config.json", config)

    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if config_only:
        return out
    specs = tensor_specs(p, dtype, with_mtp)
    if shard_size is None:
        _write_safetensors(out / "model.safetensors", specs, p, seed)
        return out
    shards = _plan_shards(specs, shard_size)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / filename, shard, p, seed)
        weight_map.update({spec.name: filename for spec in shard})
    total = sum(spec.nbytes for spec in specs)
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return out
