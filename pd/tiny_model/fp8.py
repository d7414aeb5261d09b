"""Block-FP8 quantization laid out like DeepSeek-V3/R1's published checkpoints: the linear projections'
weights in float8_e4m3fn, each with a float32 `<name>_scale_inv` holding one scale per [bo, bi] block
(edge blocks partial), such that the dequantized weight is `fp8 * scale_inv` over each block."""

from __future__ import annotations

import re

import torch

from pd.model.quant import scale_shape
from pd.tiny_model.weights import TensorSpec

DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"

# The projections DeepSeek quantizes: attention, dense MLP and shared/routed experts (in the MTP layer too).
# Router gates, norms, embeddings, lm_head and the MTP layer's eh_proj stay unquantized.
_QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.((shared_experts|experts\.\d+)\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def quantization_config(block: tuple[int, int]) -> dict:
    """config.json's `quantization_config` as DeepSeek-V3/R1 write it."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }


def is_quantized(name: str) -> bool:
    """Whether tensor `name` is stored in FP8 (with a `<name>_scale_inv` sibling)."""
    return _QUANTIZED.match(name) is not None


def fp8_specs(specs: list[TensorSpec], block: tuple[int, int]) -> list[TensorSpec]:
    """The FP8 checkpoint's tensors: every quantized weight in float8_e4m3fn plus its float32 scale, the rest
    as in `specs`; sorted by name."""
    out: list[TensorSpec] = []
    for spec in specs:
        if is_quantized(spec.name):
            out.append(TensorSpec(spec.name, spec.shape, torch.float8_e4m3fn))
            out.append(
                TensorSpec(
                    spec.name + SCALE_SUFFIX, scale_shape(spec.shape[:1], spec.shape[1], block), torch.float32
                )
            )
        else:
            out.append(spec)
    return sorted(out, key=lambda s: s.name)
