"""Configuration: the model architecture read from a Hugging Face ``config.json``.

Frozen dataclasses with derived properties; nothing here reads the environment.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pd.attention import ATTENTION_BACKENDS
from pd.speculative import SpeculativeConfig

# Model types that carry the DeepSeek-V3 architecture (Kimi-K2 ships its own model_type).
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")

# How weights are loaded: "auto" reads the checkpoint's safetensors, "dummy" makes random weights.
LOAD_FORMATS = ("auto", "dummy")
KV_LAYOUTS = ("layer_major", "page_major")  # pd.kv_cache.KVOrder's values

# How linear weights are held on the device: "auto" follows the checkpoint's quantization_config,
# "fp8" keeps (or makes) block-FP8 weights, "none" holds them in the activation dtype.
QUANTIZATIONS = ("auto", "fp8", "none")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: plain (``kind="default"``) or YaRN with DeepSeek's two mscales."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    interleave: bool = True

    @staticmethod
    def yarn_mscale(factor: float, mscale: float | None) -> float:
        if factor <= 1 or not mscale:
            return 1.0
        return 0.1 * mscale * math.log(factor) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """Scale applied to cos/sin (YaRN's attention factor)."""
        if self.kind != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return self.yarn_mscale(self.factor, 1.0)

    @property
    def softmax_scale_factor(self) -> float:
        """Extra factor on the attention softmax scale (DeepSeek applies ``mscale_all_dim`` squared)."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        m = self.yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m

    def inv_freq(self, dim: int) -> torch.Tensor:
        """Inverse frequencies ``[dim // 2]`` float32 for a rotary dimension ``dim``."""
        pos_freqs = self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        extrapolation = 1.0 / pos_freqs
        if self.kind != "yarn":
            return extrapolation
        interpolation = 1.0 / (self.factor * pos_freqs)
        orig = self.original_max_position_embeddings
        assert orig is not None, "yarn rope scaling needs original_max_position_embeddings"

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoids a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp
        return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        # Published checkpoints write `rope_scaling` + `rope_theta`; transformers 5 writes `rope_parameters`.
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        interleave = bool(hf.get("rope_interleave", True))
        if kind == "default":
            return cls(theta=theta, interleave=interleave)
        if kind != "yarn":
            raise ValueError(f"unsupported rope scaling type {kind!r}; expected 'yarn' or none")
        orig = params.get("original_max_position_embeddings")
        if orig is None:
            raise ValueError("yarn rope scaling needs original_max_position_embeddings")
        factor = params.get("factor")
        if factor is None:
            factor = hf["max_position_embeddings"] / orig
        return cls(
            theta=theta,
            kind="yarn",
            factor=float(factor),
            original_max_position_embeddings=int(orig),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            interleave=interleave,
        )


@dataclass(frozen=True)
class FP8Quant:
    """Block-quantized FP8 weights (``quantization_config`` fmt e4m3): float8_e4m3fn values with one
    float32 scale per ``[block_out, block_in]`` block (edge blocks partial)."""

    block_out: int = 128
    block_in: int = 128

    @property
    def block(self) -> tuple[int, int]:
        return self.block_out, self.block_in


@dataclass(frozen=True)
class ModelConfig:
    """The DeepSeek-V3 architecture fields that serving needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
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
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "bfloat16"
    fp8: FP8Quant | None = None
    num_nextn_predict_layers: int = (
        0  # MTP layers the checkpoint carries, as model.layers.{num_hidden_layers}...
    )

    def __post_init__(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}"
            )
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.experts_per_group < 2:
            raise ValueError(
                "grouped routing scores each group by its top-2 experts: need >= 2 experts per group"
            )
        if self.num_experts_per_tok > self.topk_group * self.experts_per_group:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts in topk_group "
                f"{self.topk_group} groups of {self.experts_per_group}"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token per layer in the KV cache: the compressed KV plus the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_scale_factor

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES and "DeepseekV3ForCausalLM" not in archs:
            raise ValueError(
                f"unsupported architecture: model_type {model_type!r}, architectures {archs}; "
                f"pd serves the DeepSeek-V3 architecture (model_type in {SUPPORTED_MODEL_TYPES})"
            )
        scoring = hf.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ValueError(f"unsupported scoring_func {scoring!r}; DeepSeek-V3 routing uses 'sigmoid'")
        topk_method = hf.get("topk_method", "noaux_tc")
        if topk_method != "noaux_tc":
            raise ValueError(f"unsupported topk_method {topk_method!r}; expected 'noaux_tc'")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; expected 'silu'")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        n_routed = hf.get("n_routed_experts") or 0
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            n_routed_experts=n_routed,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=RopeConfig.from_hf(hf),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16",
            fp8=_parse_fp8(hf.get("quantization_config")),
            num_nextn_predict_layers=int(hf.get("num_nextn_predict_layers") or 0),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(load_hf_config(path))


def load_hf_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    with open(config_path) as f:
        return json.load(f)


def _parse_fp8(qc: dict[str, Any] | None) -> FP8Quant | None:
    if not qc:
        return None
    method = qc.get("quant_method")
    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size")
    if method != "fp8" or fmt != "e4m3" or not block or len(block) != 2:
        raise ValueError(
            f"unsupported quantization_config {qc}; pd serves block-quantized fp8 "
            "(quant_method 'fp8', fmt 'e4m3', weight_block_size [out, in]) and nothing else"
        )
    return FP8Quant(block_out=int(block[0]), block_in=int(block[1]))


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    chunk_size: int  # token budget of one extend step
    max_running: int  # most requests decoding at once
    max_waiting: int = 4096  # bound of the waiting queue

    def __post_init__(self) -> None:
        for name in ("page_size", "chunk_size", "max_running", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    """How one rank runs a model: device, precision, KV cache and batching limits."""

    model_path: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    load_format: str = "auto"  # auto: safetensors from model_path; dummy: random weights
    quantization: str = "auto"  # auto: as the checkpoint ships; fp8: block-FP8 weights; none: dequantized
    page_size: int = 16
    num_pages: int | None = None  # None: fill gpu_memory_fraction on CUDA, DEFAULT_CPU_KV_TOKENS on CPU
    gpu_memory_fraction: float = 0.85  # this process's share of the device (weights + KV pool)
    chunk_size: int = 2048  # token budget of one prefill forward
    max_running: int = 64
    max_waiting: int = 4096
    max_context_len: int | None = None  # None: the model's max_position_embeddings
    attention_backend: str = "auto"  # auto: triton (FlashInfer + pd's split kernel) on CUDA, else torch
    # Full-model CUDA graphs on CUDA (needs a graph-capable attention backend): decode steps, and on single-rank
    # engines prompt steps of at most graph_extend_tokens tokens (pd.engine.extend_graph; 0: those eager).
    cuda_graph: bool = True
    graph_extend_tokens: int = 256
    # Graphs cut at every MoE layer's routed experts, which run eagerly between them in the EP backend's normal
    # mode (pd.engine.graph.PiecewiseGraph): decode without low-latency dispatch (multi-rank decode ranks then use
    # normal mode), and single-rank prompt steps. Multi-rank prompt steps always run so (normal-mode dispatch
    # synchronises with the host).
    piecewise_graphs: bool = False
    # Decode steps launched before the host reads the step in flight (pd.engine.engine.Engine.step): the host's
    # work of a step runs while the GPU computes the next. Single-rank decode graphs; with MTP, each verify step is
    # launched once the one before is read, before the host postprocesses it (Engine.pipelined).
    overlap: bool = True
    decodes: bool = True  # runs decode steps (False on prefill ranks: no decode graphs); set by the launcher
    # The KV pool's axis order (pd.kv_cache.KVOrder): layer_major, or page_major (all layers of a page contiguous:
    # a transfer moves one piece per page run); prefill and decode must agree.
    kv_layout: str = "layer_major"
    # Keep full KV pages of computed prompts (prefill, colocated ranks) or of finished requests (decode ranks)
    # and reuse them for later prompts with the same prefix (decode: not transferred again).
    prefix_cache: bool = True
    seed: int = 0
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if not 0 < self.gpu_memory_fraction < 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1), got {self.gpu_memory_fraction}")
        if self.piecewise_graphs and self.speculative.enabled:
            raise ValueError(
                "piecewise_graphs: speculative decoding's verify graphs are captured whole (turn one of them off)"
            )
        if self.graph_extend_tokens < 0:
            raise ValueError(
                f"graph_extend_tokens must be >= 0 (0: prompt steps eager), got {self.graph_extend_tokens}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return parse_dtype(self.dtype)

    def weight_quant(self, model: ModelConfig) -> FP8Quant | None:
        """How this rank holds the model's linear weights: the checkpoint's FP8 blocks (``auto`` on an FP8
        checkpoint, or ``fp8``), 128x128 FP8 blocks made on load (``fp8`` on an unquantized checkpoint), or
        None (the activation dtype)."""
        if self.quantization == "none":
            return None
        if self.quantization == "fp8":
            return model.fp8 or FP8Quant()
        return model.fp8

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.page_size, self.chunk_size, self.max_running, self.max_waiting)

    def context_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if self.max_context_len is not None and self.max_context_len > limit:
            raise ValueError(f"max_context_len {self.max_context_len} exceeds the model's {limit} positions")
        return self.max_context_len or limit


DEFAULT_CPU_KV_TOKENS = 1 << 16


@dataclass(frozen=True)
class ParallelConfig:
    """How one instance spans ranks: DP attention and EP MoE over the same ``size`` ranks.

    Each rank owns its requests and KV pages (DP attention) and ``E / size`` routed experts (EP);
    dense layers, shared experts, embeddings and lm_head are replicated and run on the rank's own
    tokens. Ranks may span ``nnodes`` nodes, ``size / nnodes`` per node, meeting at ``dist_init_addr``.
    """

    size: int = 1
    rank: int = 0
    ep_backend: str | None = None  # None: the default for the role and device (pd.ep.default_ep_backend)
    expert_placement: str = "linear"  # linear | round_robin (pd.ep.placement); does not change the KV cache
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # "host:port" of the rendezvous; needed when size > 1
    collective_timeout_s: float = 120.0  # a rank that stops answering fails the others' collectives

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} must be in [0, size={self.size})")
        if self.nnodes < 1 or self.size % self.nnodes:
            raise ValueError(f"size {self.size} must be a multiple of nnodes {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be in [0, nnodes={self.nnodes})")
        if self.size > 1 and not self.dist_init_addr:
            raise ValueError("a multi-rank instance needs dist_init_addr (host:port of the rendezvous)")

    @property
    def local_size(self) -> int:
        return self.size // self.nnodes

    @property
    def local_rank(self) -> int:
        return self.rank % self.local_size

    def rank_device(self, device: str) -> str:
        """This rank's device: ``cuda:N`` with dp ranks on GPUs N, N+1, ... of the node; CPU as is."""
        if not device.startswith("cuda"):
            return device
        first = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{first + self.local_rank}"
