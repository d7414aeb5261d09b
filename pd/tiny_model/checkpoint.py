"""Writing the checkpoint: config.json, the safetensors weights (one file, or shards with their index), the
tokenizer files and generation_config.json (`make_tiny_model`)."""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pd.model.quant import dequantize, quantize
from pd.tiny_model.fp8 import (
    DEFAULT_BLOCK,
    SCALE_SUFFIX,
    fp8_specs,
    is_quantized,
    quantization_config,
)
from pd.tiny_model.presets import DTYPES, Preset, get_preset
from pd.tiny_model.tokenizer import BOS_TOKEN, EOS_TOKEN, tokenizer_config, train_tokenizer
from pd.tiny_model.weights import TensorSpec, random_tensor, tensor_specs

_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}

# The dequantized copy of an FP8 checkpoint (the oracle's input) goes in this subdirectory.
DEQUANTIZED_DIR = "dequantized"


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


def _write_safetensors(
    path: Path, specs: list[TensorSpec], tensor_of: Callable[[TensorSpec], torch.Tensor]
) -> None:
    """Writes the safetensors format directly (header with sorted keys and fixed metadata, then the data in
    the same order), generating one tensor at a time (`tensor_of`) so memory stays at one tensor."""
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
            tensor = tensor_of(spec)
            assert tensor.dtype == spec.dtype and tuple(tensor.shape) == spec.shape, spec
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_checkpoint(
    out: Path,
    files: dict[str, str | dict],
    specs: list[TensorSpec],
    tensor_of: Callable[[TensorSpec], torch.Tensor],
    shard_size: int | None,
    config_only: bool,
) -> None:
    """Writes `files` (name -> text, or an object written as JSON), removes weight files from an earlier run,
    then (unless `config_only`) writes `specs` in one file or in shards with their index."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, str):
            (out / name).write_text(content, encoding="utf-8")
        else:
            _write_json(out / name, content)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if config_only:
        return
    if shard_size is None:
        _write_safetensors(out / "model.safetensors", specs, tensor_of)
        return
    shards = _plan_shards(specs, shard_size)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / filename, shard, tensor_of)
        weight_map.update({spec.name: filename for spec in shard})
    total = sum(spec.nbytes for spec in specs)
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def make_tiny_model(
    out_dir: str | Path,
    preset: str = "ci",
    seed: int = 0,
    *,
    shard_size: int | None = None,
    with_mtp: bool = False,
    config_only: bool = False,
    dtype: str | None = None,
    fp8: bool = False,
    fp8_block: tuple[int, int] = DEFAULT_BLOCK,
) -> Path:
    """Writes the checkpoint described in pd.tiny_model's docstring into `out_dir` (created if missing; weight
    files from an earlier run there are removed) and returns it as a Path.

    shard_size: bytes per weight shard (`model-0000k-of-0000n.safetensors` + index); None: one file.
    dtype: "float32" or "bfloat16"; None: the preset's default.
    fp8: write the checkpoint block-FP8 quantized as DeepSeek-V3/R1 publish theirs (`quantization_config`;
        the linear projections in float8_e4m3fn with a float32 `<name>_scale_inv` per `fp8_block` [out, in]
        block; gates, norms, embeddings and lm_head in `dtype`), and in `out_dir/dequantized/` the same
        model without quantization_config, its weights `fp8 * scale_inv` in `dtype` (the oracle's input).
    """
    p = get_preset(preset)
    dtype = dtype or p.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size {shard_size} must be a positive number of bytes")
    block = (int(fp8_block[0]), int(fp8_block[1]))
    if fp8 and (len(fp8_block) != 2 or min(block) <= 0):
        raise ValueError(f"fp8_block {fp8_block} must be two positive integers [out, in]")
    out = Path(out_dir)

    tokenizer = train_tokenizer(p.tokenizer_vocab_size)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    assert bos_id is not None and eos_id is not None  # train_tokenizer adds both
    config = model_config(p, bos_token_id=bos_id, eos_token_id=eos_id, dtype=dtype, with_mtp=with_mtp)
    files: dict[str, str | dict] = {
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": tokenizer_config(p.max_position_embeddings),
        "generation_config.json": {"bos_token_id": bos_id, "eos_token_id": eos_id},
        "config.json": config,
    }
    specs = tensor_specs(p, dtype, with_mtp)

    def plain(spec: TensorSpec) -> torch.Tensor:
        return random_tensor(spec, p, seed)

    if not fp8:
        _write_checkpoint(out, files, specs, plain, shard_size, config_only)
        return out

    wdtype = DTYPES[dtype]

    @functools.lru_cache(maxsize=1)  # a weight and its scale are written one after the other
    def quantized(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize(random_tensor(TensorSpec(name, shape_of[name], wdtype), p, seed), block)

    shape_of = {spec.name: spec.shape for spec in specs}

    def fp8_tensor(spec: TensorSpec) -> torch.Tensor:
        if spec.name.endswith(SCALE_SUFFIX):
            return quantized(spec.name.removesuffix(SCALE_SUFFIX))[1]
        return quantized(spec.name)[0] if is_quantized(spec.name) else plain(spec)

    def dequantized(spec: TensorSpec) -> torch.Tensor:
        if not is_quantized(spec.name):
            return plain(spec)
        return dequantize(*quantized(spec.name), block).to(spec.dtype)

    fp8_files = {**files, "config.json": {**config, "quantization_config": quantization_config(block)}}
    _write_checkpoint(out, fp8_files, fp8_specs(specs, block), fp8_tensor, shard_size, config_only)
    _write_checkpoint(out / DEQUANTIZED_DIR, files, specs, dequantized, shard_size, config_only)
    return out
