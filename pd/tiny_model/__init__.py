"""A tiny DeepSeek-V3 checkpoint made offline: the input every test hands to its oracle.

`make_tiny_model` writes, deterministically (same arguments, byte-identical files):

- `config.json` in the style of published DeepSeek-V3 checkpoints (`rope_scaling`, not transformers 5's
  `rope_parameters`; `torch_dtype`; `num_nextn_predict_layers`),
- random weights named as Hugging Face DeepSeek-V3 checkpoints name them (one tensor per expert), in one
  `model.safetensors` or in shards with `model.safetensors.index.json`, optionally with the MTP layer
  `model.layers.{num_hidden_layers}.*` that published checkpoints carry and serving skips,
- a small byte-level BPE tokenizer trained on text generated here, DeepSeek's special tokens, a
  DeepSeek-like chat template (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`).

With `fp8=True` (`--fp8`) the checkpoint is block-FP8 quantized as DeepSeek-V3/R1 publish theirs
(`quantization_config`, the linear projections in float8_e4m3fn with `<name>_scale_inv`), and its dequantized
copy, the oracle's input, goes in `dequantized/` (see `fp8`).

Every tensor is drawn from its own random stream keyed by (seed, tensor name), so a tensor does not depend
on which other tensors are written (the model with `--with-mtp` has the same base weights as without).

Modules: `presets` (the architectures), `weights` (tensor names, shapes and random values), `corpus` (the
tokenizer's generated training text), `tokenizer` (BPE training, special tokens, chat template) and
`fp8` (block quantization) and `checkpoint` (the files, and `make_tiny_model`).
"""

from pd.tiny_model.checkpoint import DEQUANTIZED_DIR, make_tiny_model, model_config
from pd.tiny_model.fp8 import is_quantized
from pd.tiny_model.presets import DTYPES, MAX_TOKENIZER_VOCAB, PRESETS, Preset, YarnScaling, get_preset
from pd.tiny_model.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    USER_TOKEN,
    train_tokenizer,
)
from pd.tiny_model.weights import TensorSpec, random_tensor, tensor_specs

__all__ = [
    "ASSISTANT_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEQUANTIZED_DIR",
    "DTYPES",
    "EOS_TOKEN",
    "MAX_TOKENIZER_VOCAB",
    "PRESETS",
    "USER_TOKEN",
    "Preset",
    "TensorSpec",
    "YarnScaling",
    "get_preset",
    "is_quantized",
    "make_tiny_model",
    "model_config",
    "random_tensor",
    "tensor_specs",
    "train_tokenizer",
]
