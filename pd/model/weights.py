"""Loads Hugging Face DeepSeek-V3 safetensors checkpoints (or dummy weights) into the model.

Checkpoint names map onto parameters one to one, except:
- ``gate_proj`` / ``up_proj`` (dense MLP, shared experts) fill the two halves of ``gate_up_proj``;
- routed experts ``mlp.experts.{e}.{gate,up,down}_proj`` fill rows of the stacked ``w13`` / ``w2``
  when expert ``e`` lives on this EP rank (``e // E_local == rank``), and are skipped otherwise;
- the MTP layer ``model.layers.{num_hidden_layers}.*`` is skipped (serving does not use it);
- FP8 block-quantized weights (with ``weight_scale_inv``) are dequantized on load.
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
from pd.model.moe import MoE

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_GATE_UP = re.compile(r"^(.*)\.(gate|up)_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class WeightLoadError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensors."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: ``param[index]`` (``index`` None = the whole parameter)."""

    param: str
    index: tuple | None = None


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
        self.ep_rank = ep_rank
        self.num_local = cfg.n_routed_experts // ep_size
        # Global expert e lives in physical slot placement.physical(e): rank p // E_local, slot p % E_local.
        placement = placement_of(model.placement, cfg.n_routed_experts, ep_size)
        self.physical = placement.physical
        self.local_experts = placement.local_experts(ep_rank)

    def target(self, name: str) -> Target | None:
        """The parameter slot for ``name``; None for tensors serving skips. Raises on unknown names."""
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= self.cfg.num_hidden_layers:
            return None  # MTP layer
        if _IGNORED.search(name) or (self.cfg.tie_word_embeddings and name == "lm_head.weight"):
            return None
        if m := _EXPERT.match(name):
            expert, kind = int(m.group(2)), m.group(3)
            physical = self.physical(expert)
            if physical // self.num_local != self.ep_rank:
                return None  # lives on another EP rank
            local = physical % self.num_local
            inter = self.cfg.moe_intermediate_size
            if kind == "down":
                return Target(f"{m.group(1)}.w2", (local,))
            half = slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)
            return Target(f"{m.group(1)}.w13", (local, half))
        if m := _GATE_UP.match(name):
            param = f"{m.group(1)}.gate_up_proj.weight"
            if param in self.params:
                inter = self.params[param].shape[0] // 2
                half = slice(0, inter) if m.group(2) == "gate" else slice(inter, 2 * inter)
                return Target(param, (half,))
        if name in self.params:
            return Target(name)
        raise WeightLoadError(f"unexpected tensor {name!r} in checkpoint: no such parameter in DeepSeek-V3")

    def expected_names(self) -> set[str]:
        """Every checkpoint tensor this rank needs."""
        cfg = self.cfg
        names: set[str] = set()
        for pname in self.params:
            if pname == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if pname.endswith("gate_up_proj.weight"):
                base = pname.removesuffix(".gate_up_proj.weight")
                names |= {f"{base}.gate_proj.weight", f"{base}.up_proj.weight"}
            elif pname.endswith(".experts.w13") or pname.endswith(".experts.w2"):
                base = pname.rsplit(".", 1)[0]
                kinds = ("gate", "up") if pname.endswith("w13") else ("down",)
                for e in self.local_experts:
                    names |= {f"{base}.{e}.{k}_proj.weight" for k in kinds}
            else:
                names.add(pname)
        return names


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight [O, I]`` float8_e4m3fn times per-block ``scale_inv [ceil(O/bo), ceil(I/bi)]`` -> float32."""
    bo, bi = block
    o, i = weight.shape
    expected = (-(-o // bo), -(-i // bi))
    if tuple(scale_inv.shape) != expected:
        raise WeightLoadError(
            f"fp8 scale shape {tuple(scale_inv.shape)} does not fit weight {(o, i)}: expected {expected}"
        )
    scale = scale_inv.float().repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]
    return weight.float() * scale


def _iter_checkpoint(
    model_dir: Path, fp8_block: tuple[int, int] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(model_dir)
    handles = {f: safe_open(str(f), framework="pt") for f in files}
    where = {name: f for f, h in handles.items() for name in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    total = sum(1 for n in where if not n.endswith("weight_scale_inv"))
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for name, f in where.items():
            if name.endswith("weight_scale_inv"):
                continue
            tensor = handles[f].get_tensor(name)
            if tensor.dtype == torch.float8_e4m3fn:
                scale_name = name + "_scale_inv"
                if fp8_block is None or scale_name not in where:
                    raise WeightLoadError(
                        f"fp8 tensor {name!r} without quantization_config or {scale_name!r}"
                    )
                tensor = dequantize_fp8(tensor, handles[where[scale_name]].get_tensor(scale_name), fp8_block)
            bar.update()
            yield name, tensor


def load_weights(
    model: DeepseekV3ForCausalLM, model_dir: str | Path, ep_rank: int = 0, ep_size: int = 1
) -> None:
    """Fills ``model`` from the checkpoint in ``model_dir``; raises ``WeightLoadError`` naming every
    missing tensor, and the tensor with its expected and found shapes on a mismatch."""
    mapper = WeightMapper(model, ep_rank, ep_size)
    fp8 = model.cfg.fp8
    seen: set[str] = set()
    with torch.no_grad():
        for name, tensor in _iter_checkpoint(Path(model_dir), (fp8.block_out, fp8.block_in) if fp8 else None):
            target = mapper.target(name)
            if target is None:
                continue
            param = mapper.params[target.param]
            dest = param if target.index is None else param[target.index]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise WeightLoadError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} "
                    f"(parameter {target.param})"
                )
            dest.copy_(tensor)
            seen.add(name)
    missing = sorted(mapper.expected_names() - seen)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise WeightLoadError(f"checkpoint {model_dir} lacks tensors: {shown}")


def init_dummy_weights(model: DeepseekV3ForCausalLM, seed: int = 0) -> None:
    """Random weights of the right shapes for benchmarking: norms 1, the rest ``N(0, 1/sqrt(fan_in))``
    scaled down, a small random routing bias. Deterministic for a seed, generated on the model's device.
    Routed experts are drawn one global expert at a time, so every EP size and placement holds the same
    experts (a 2-rank deployment gives the tokens of a 1-rank one)."""
    experts_of = {
        f"{name}.experts": m.global_expert_ids() for name, m in model.named_modules() if isinstance(m, MoE)
    }

    def randn(shape: torch.Size, key: str, device: torch.device) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed + hash_name(key))
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * (
            0.5 / shape[-1] ** 0.5
        )

    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in experts_of:  # [E_local, ...]: slot i holds global expert experts_of[owner][i]
                for slot, expert in enumerate(experts_of[owner]):
                    p[slot].copy_(randn(p.shape[1:], f"{name}[{expert}]", p.device))
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                gen = torch.Generator(device=p.device).manual_seed(seed + hash_name(name))
                p.copy_(torch.rand(p.shape, generator=gen, device=p.device, dtype=torch.float32) * 0.01)
            else:
                p.copy_(randn(p.shape, name, p.device))


def hash_name(name: str) -> int:
    """A stable (not salted per process) small hash of a parameter name."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % (2**31 - 1)
    return h
