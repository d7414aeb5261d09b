"""Loads Hugging Face DeepSeek-V3 safetensors checkpoints (or dummy weights) into the model.

Checkpoint names map onto parameters one to one, except:
- ``gate_proj`` / ``up_proj`` (dense MLP, shared experts) fill the two halves of ``gate_up_proj``;
- ``q_a_proj`` (``q_proj`` without a query LoRA) and ``kv_a_proj_with_mqa`` fill the two parts of
  ``self_attn.q_kv_a_proj`` (one GEMM: both read the layer's input);
- routed experts ``mlp.experts.{e}.{gate,up,down}_proj`` fill rows of the stacked ``w13`` / ``w2``
  when expert ``e`` lives on this EP rank (``e // E_local == rank``), and are skipped otherwise;
- the MTP layer ``model.layers.{num_hidden_layers}.*`` is skipped, unless the model has one
  (``pd.model.mtp.DeepseekV3WithMTP``, speculative decoding): then it fills ``mtp.*``, and its copies of the
  embedding and output head (``embed_tokens``, ``shared_head.head``) are checked equal to the main model's,
  which the MTP layer uses; further MTP layers (``num_nextn_predict_layers`` > 1) are skipped;
- block-FP8 tensors (with ``weight_scale_inv``) fill an FP8 parameter and its ``<param>_scale_inv``
  as they are, and are dequantized into a parameter in the activation dtype (``--quantization none``,
  and ``kv_b_proj`` always); an unquantized tensor bound for an FP8 parameter is quantized on load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pd.ep.placement import placement_of
from pd.model.deepseek_v3 import DeepseekV3ForCausalLM
from pd.model.mla import q_kv_a_parts
from pd.model.moe import MoE
from pd.model.mtp import SHARED_COPIES, MTPLayer
from pd.model.quant import FP8_DTYPE, dequantize, quantize

_EXPERT = re.compile(r"^((?:model\.layers\.\d+|mtp)\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_GATE_UP = re.compile(r"^(.*)\.(gate|up)_proj\.weight$")
_Q_KV_A = re.compile(r"^(.*\.self_attn)\.(q_a_proj|q_proj|kv_a_proj_with_mqa)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
MTP_PREFIX = (
    "mtp."  # the MTP layer's parameters (pd.model.mtp), model.layers.{num_hidden_layers}. in checkpoints
)


class WeightLoadError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensors."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: parameter ``param``, in local expert slot ``expert`` (stacked
    experts) and row part ``part`` of a merged weight (0 gate, 1 up of a gate/up weight: two halves; or of
    ``parts``, the merged weight's row counts); None = all of it."""

    param: str
    expert: int | None = None
    part: int | None = None
    parts: tuple[int, ...] | None = None

    def rows(self, t: torch.Tensor, block_rows: int = 1) -> torch.Tensor:
        """The view of ``t`` (the parameter, or with ``block_rows`` its block scales: each part blocked on its
        own) this target fills."""
        if self.expert is not None:
            t = t[self.expert]
        if self.part is not None:
            sizes = [-(-p // block_rows) for p in self.parts] if self.parts else [t.shape[-2] // 2] * 2
            start = sum(sizes[: self.part])
            t = t[..., start : start + sizes[self.part], :]
        return t


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {model_dir} (use --load-format dummy for random weights)"
        )
    return files


class WeightMapper:
    """Maps checkpoint tensor names onto this rank's parameters."""

    def __init__(self, model: DeepseekV3ForCausalLM, ep_rank: int, ep_size: int) -> None:
        cfg = model.cfg
        self.cfg = cfg
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.mtp = isinstance(getattr(model, "mtp", None), MTPLayer)
        self.mtp_layer = f"model.layers.{cfg.num_hidden_layers}."  # the MTP layer's checkpoint prefix
        self.ep_rank = ep_rank
        self.num_local = cfg.n_routed_experts // ep_size
        # Global expert e lives in physical slot placement.physical(e): rank p // E_local, slot p % E_local.
        placement = placement_of(model.placement, cfg.n_routed_experts, ep_size)
        self.physical = placement.physical
        self.local_experts = placement.local_experts(ep_rank)
        self.q_first = "q_a_proj" if cfg.q_lora_rank is not None else "q_proj"  # q_kv_a_proj's first part
        self.q_kv_a_parts = q_kv_a_parts(cfg)

    def target(self, name: str) -> Target | None:
        """The parameter slot for ``name``; None for tensors serving skips. Raises on unknown names."""
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= self.cfg.num_hidden_layers:
            if not self.mtp or int(layer.group(1)) > self.cfg.num_hidden_layers:
                return None  # an MTP layer serving does not use
            rest = name[layer.end() :]
            if rest in SHARED_COPIES:
                return None  # the main model's tensor serves (``shared_copy`` checks they are equal)
            name = MTP_PREFIX + rest
        if _IGNORED.search(name) or (self.cfg.tie_word_embeddings and name == "lm_head.weight"):
            return None
        if m := _EXPERT.match(name):
            expert, kind = int(m.group(2)), m.group(3)
            physical = self.physical(expert)
            if physical // self.num_local != self.ep_rank:
                return None  # lives on another EP rank
            local = physical % self.num_local
            if kind == "down":
                return Target(f"{m.group(1)}.w2", local)
            return Target(f"{m.group(1)}.w13", local, 0 if kind == "gate" else 1)
        if m := _Q_KV_A.match(name):
            param = f"{m.group(1)}.q_kv_a_proj.weight"
            if param in self.params:
                return Target(param, None, int(m.group(2) == "kv_a_proj_with_mqa"), self.q_kv_a_parts)
        if m := _GATE_UP.match(name):
            param = f"{m.group(1)}.gate_up_proj.weight"
            if param in self.params:
                return Target(param, None, 0 if m.group(2) == "gate" else 1)
        if name in self.params:
            return Target(name)
        raise WeightLoadError(f"unexpected tensor {name!r} in checkpoint: no such parameter in DeepSeek-V3")

    def shared_copy(self, name: str) -> str | None:
        """For the MTP layer's copy of the embedding or output head (when the model has an MTP layer): the
        main model's parameter it must equal; else None."""
        if not self.mtp or not name.startswith(self.mtp_layer):
            return None
        main = SHARED_COPIES.get(name.removeprefix(self.mtp_layer))
        if main == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return main

    def checkpoint_name(self, param_name: str) -> str:
        """The checkpoint's name for a name in parameter space (``mtp.x`` is ``model.layers.{n}.x``)."""
        if param_name.startswith(MTP_PREFIX):
            return self.mtp_layer + param_name.removeprefix(MTP_PREFIX)
        return param_name

    def expected_names(self) -> set[str]:
        """Every checkpoint tensor this rank needs."""
        cfg = self.cfg
        names: set[str] = set()
        for pname in self.params:
            if (pname == "lm_head.weight" and cfg.tie_word_embeddings) or pname.endswith("_scale_inv"):
                continue  # scales come with their FP8 weight (or are made from it)
            if pname.endswith(".q_kv_a_proj.weight"):
                base = pname.removesuffix(".q_kv_a_proj.weight")
                names |= {f"{base}.{self.q_first}.weight", f"{base}.kv_a_proj_with_mqa.weight"}
            elif pname.endswith("gate_up_proj.weight"):
                base = pname.removesuffix(".gate_up_proj.weight")
                names |= {f"{base}.gate_proj.weight", f"{base}.up_proj.weight"}
            elif pname.endswith(".experts.w13") or pname.endswith(".experts.w2"):
                base = pname.rsplit(".", 1)[0]
                kinds = ("gate", "up") if pname.endswith("w13") else ("down",)
                for e in self.local_experts:
                    names |= {f"{base}.{e}.{k}_proj.weight" for k in kinds}
            else:
                names.add(pname)
        return {self.checkpoint_name(n) for n in names}


@dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor: ``value``, and for a block-FP8 one its float32 ``scale`` per ``block``."""

    value: torch.Tensor
    scale: torch.Tensor | None = None
    block: tuple[int, int] | None = None

    def dequantized(self) -> torch.Tensor:
        if self.scale is None or self.block is None:
            return self.value
        try:
            return dequantize(self.value, self.scale, self.block)
        except ValueError as e:
            raise WeightLoadError(str(e)) from None


def _iter_checkpoint(
    model_dir: Path, fp8_block: tuple[int, int] | None
) -> Iterator[tuple[str, CheckpointTensor]]:
    files = checkpoint_files(model_dir)
    handles = {f: safe_open(str(f), framework="pt") for f in files}
    where = {name: f for f, h in handles.items() for name in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    total = sum(1 for n in where if not n.endswith("weight_scale_inv"))
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for name, f in where.items():
            if name.endswith("weight_scale_inv"):
                continue
            tensor = handles[f].get_tensor(name)
            bar.update()
            if tensor.dtype != FP8_DTYPE:
                yield name, CheckpointTensor(tensor)
                continue
            scale_name = name + "_scale_inv"
            if fp8_block is None or scale_name not in where:
                raise WeightLoadError(f"fp8 tensor {name!r} without quantization_config or {scale_name!r}")
            yield name, CheckpointTensor(tensor, handles[where[scale_name]].get_tensor(scale_name), fp8_block)


def _fill(
    params: dict[str, torch.nn.Parameter],
    target: Target,
    name: str,
    t: CheckpointTensor,
    block: tuple[int, int] | None,
) -> None:
    """Copies checkpoint tensor ``t`` into ``target``: FP8 values and scales as they are into an FP8
    parameter (quantizing an unquantized tensor with the model's ``block``), dequantized otherwise."""
    param = params[target.param]
    dest = target.rows(param)
    fp8 = param.dtype == FP8_DTYPE
    value, scale = (t.value, t.scale) if fp8 and t.scale is not None else (t.dequantized(), None)
    if tuple(dest.shape) != tuple(value.shape):
        raise WeightLoadError(
            f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(dest.shape)} "
            f"(parameter {target.param})"
        )
    if not fp8:
        dest.copy_(value)
        return
    assert block is not None, "FP8 parameters belong to a model with a quantization block"
    scale_dest = target.rows(params[target.param + "_scale_inv"], block[0])
    if scale is None:
        value, scale = quantize(value.to(dest.device), block)
    if tuple(scale_dest.shape) != tuple(scale.shape):
        raise WeightLoadError(
            f"fp8 scales of {name!r} have shape {tuple(scale.shape)}, expected {tuple(scale_dest.shape)}"
        )
    dest.copy_(value)
    scale_dest.copy_(scale)


def load_weights(
    model: DeepseekV3ForCausalLM, model_dir: str | Path, ep_rank: int = 0, ep_size: int = 1
) -> None:
    """Fills ``model`` from the checkpoint in ``model_dir``; raises ``WeightLoadError`` naming every
    missing tensor, and the tensor with its expected and found shapes on a mismatch."""
    mapper = WeightMapper(model, ep_rank, ep_size)
    fp8 = model.cfg.fp8
    seen: set[str] = set()
    copies: list[tuple[str, str, torch.Tensor]] = []  # (MTP copy, main parameter, value): checked at the end
    with torch.no_grad():
        for name, tensor in _iter_checkpoint(Path(model_dir), fp8.block if fp8 else None):
            if main := mapper.shared_copy(name):
                if main in seen:
                    _check_copy(mapper.params[main], name, main, tensor.dequantized())
                else:  # its main tensor comes later
                    copies.append((name, main, tensor.dequantized()))
                continue
            target = mapper.target(name)
            if target is None:
                continue
            _fill(mapper.params, target, name, tensor, model.quant.block if model.quant else None)
            seen.add(name)
    missing = sorted(mapper.expected_names() - seen)
    if missing and all(n.startswith(mapper.mtp_layer) for n in missing):
        raise WeightLoadError(
            f"checkpoint {model_dir} lacks its MTP layer (config.json: num_nextn_predict_layers "
            f"{model.cfg.num_nextn_predict_layers}): {len(missing)} {mapper.mtp_layer}* tensors missing, e.g. "
            f"{missing[0]}; speculative decoding with MTP needs them"
        )
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise WeightLoadError(f"checkpoint {model_dir} lacks tensors: {shown}")
    for name, main, value in copies:
        _check_copy(mapper.params[main], name, main, value)


def _check_copy(param: torch.Tensor, name: str, main: str, value: torch.Tensor) -> None:
    """Raises unless the MTP layer's copy ``name`` (``value``) equals the loaded main parameter ``main``."""
    if tuple(value.shape) != tuple(param.shape) or not torch.equal(
        value.to(param.device, param.dtype), param
    ):
        raise WeightLoadError(
            f"the MTP layer's {name!r} differs from {main!r}: pd runs the MTP layer with the main model's "
            "embedding and output head (published checkpoints store equal copies)"
        )


def init_dummy_weights(model: DeepseekV3ForCausalLM, seed: int = 0) -> None:
    """Random weights of the right shapes for benchmarking: norms 1, the rest ``N(0, 1/sqrt(fan_in))``
    scaled down, a small random routing bias. Deterministic for a seed, generated on the model's device.
    Routed experts are drawn one global expert at a time, so every EP size and placement holds the same
    experts (a 2-rank deployment gives the tokens of a 1-rank one). FP8 parameters get the same draw,
    block-quantized, with their scales."""
    experts_of = {
        f"{name}.experts": m.global_expert_ids() for name, m in model.named_modules() if isinstance(m, MoE)
    }
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    def randn(shape: torch.Size, key: str, device: torch.device) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed + hash_name(key))
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * (
            0.5 / shape[-1] ** 0.5
        )

    def fill(name: str, dest: torch.Tensor, value: torch.Tensor, index: int | None = None) -> None:
        if dest.dtype != FP8_DTYPE:
            dest.copy_(value)
            return
        owner, _, attr = name.rpartition(".")
        parts = getattr(modules[owner], "parts", None) if attr in ("weight", "w13") else None
        assert model.quant is not None, "FP8 parameters belong to a model with a quantization block"
        q, scale = quantize(value, model.quant.block, parts)
        dest.copy_(q)
        scales = params[name + "_scale_inv"]
        (scales if index is None else scales[index]).copy_(scale)

    with torch.no_grad():
        for name, p in params.items():
            owner = name.rpartition(".")[0]
            if name.endswith("_scale_inv"):
                continue  # set with its weight
            if owner in experts_of:  # [E_local, ...]: slot i holds global expert experts_of[owner][i]
                for slot, expert in enumerate(experts_of[owner]):
                    fill(name, p[slot], randn(p.shape[1:], f"{name}[{expert}]", p.device), slot)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                gen = torch.Generator(device=p.device).manual_seed(seed + hash_name(name))
                p.copy_(torch.rand(p.shape, generator=gen, device=p.device, dtype=torch.float32) * 0.01)
            else:
                fill(name, p, randn(p.shape, name, p.device))


def hash_name(name: str) -> int:
    """A stable (not salted per process) small hash of a parameter name."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % (2**31 - 1)
    return h
