"""Checkpoint loading: sharded files, MTP skipped, fp8 dequantization, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pd.config import EngineConfig, ModelConfig
from pd.engine.runner import ModelRunner
from pd.model.quant import dequantize
from pd.model.weights import WeightLoadError
from tests.support.checkpoints import copy_checkpoint


def runner_for(path: Path, **kw) -> ModelRunner:
    return ModelRunner(EngineConfig(str(path), num_pages=8, **kw), ModelConfig.from_dir(path))


def params_of(runner: ModelRunner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in runner.model.named_parameters()}


def test_sharded_and_mtp_checkpoints_load_the_same_weights(tiny_model):
    base = params_of(runner_for(tiny_model("ci")))
    sharded = params_of(runner_for(tiny_model("ci", shard_size=200_000)))
    with_mtp = params_of(runner_for(tiny_model("ci", with_mtp=True)))
    for name, t in base.items():
        assert torch.equal(t, sharded[name]), name
        assert torch.equal(t, with_mtp[name]), name


def test_expert_and_merged_weights_land_in_their_slots(tiny_model):
    path = tiny_model("ci")
    raw = load_file(path / "model.safetensors")
    model = runner_for(path).model
    cfg = model.cfg
    layer = cfg.first_k_dense_replace
    experts = model.model.layers[layer].mlp.experts
    inter = cfg.moe_intermediate_size
    for e in (0, cfg.n_routed_experts - 1):
        pre = f"model.layers.{layer}.mlp.experts.{e}"
        assert torch.equal(experts.w13[e, :inter], raw[f"{pre}.gate_proj.weight"])
        assert torch.equal(experts.w13[e, inter:], raw[f"{pre}.up_proj.weight"])
        assert torch.equal(experts.w2[e], raw[f"{pre}.down_proj.weight"])
    dense = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(dense[: cfg.intermediate_size], raw["model.layers.0.mlp.gate_proj.weight"])


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_model, tmp_path):
    src = tiny_model("ci")
    name = "model.layers.1.self_attn.kv_b_proj.weight"

    missing = copy_checkpoint(src, tmp_path / "missing", tensors=lambda t: t.pop(name))
    with pytest.raises(WeightLoadError, match=r"lacks tensors: .*kv_b_proj"):
        runner_for(missing)

    extra = copy_checkpoint(
        src, tmp_path / "extra", tensors=lambda t: t.update({"model.layers.0.bogus.weight": torch.zeros(2)})
    )
    with pytest.raises(WeightLoadError, match=r"unexpected tensor 'model\.layers\.0\.bogus\.weight'"):
        runner_for(extra)

    def shrink(t):
        t[name] = t[name][:-1].contiguous()

    bad_shape = copy_checkpoint(src, tmp_path / "shape", tensors=shrink)
    with pytest.raises(
        WeightLoadError, match=r"kv_b_proj.weight' has shape \(\d+, \d+\), expected \(\d+, \d+\)"
    ):
        runner_for(bad_shape)


def test_unsupported_architectures_are_refused(tiny_model, tmp_path):
    src = tiny_model("ci")
    llama = copy_checkpoint(
        src,
        tmp_path / "llama",
        config=lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]),
    )
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dir(llama)
    softmax = copy_checkpoint(src, tmp_path / "softmax", config=lambda c: c.update(scoring_func="softmax"))
    with pytest.raises(ValueError, match="scoring_func"):
        ModelConfig.from_dir(softmax)
    int4 = copy_checkpoint(
        src, tmp_path / "int4", config=lambda c: c.update(quantization_config={"quant_method": "awq"})
    )
    with pytest.raises(ValueError, match="quantization_config"):
        ModelConfig.from_dir(int4)


def test_rope_parameters_spelling_is_accepted(tiny_model, tmp_path):
    """transformers 5 writes rope_parameters instead of rope_scaling + rope_theta."""
    src = tiny_model("yarn")

    def respell(c):
        scaling = dict(c.pop("rope_scaling"))
        scaling["rope_type"] = scaling.pop("type", "yarn")
        scaling["rope_theta"] = c.pop("rope_theta")
        c["rope_parameters"] = scaling

    new = copy_checkpoint(src, tmp_path / "respelled", config=respell)
    assert ModelConfig.from_dir(new).rope == ModelConfig.from_dir(src).rope


def test_dequantize_fp8_blocks():
    w = torch.randn(5, 7)
    scale = torch.tensor([[2.0, 0.5], [4.0, 1.0]])  # blocks of 4 x 4
    q = (w / scale.repeat_interleave(4, 0)[:5].repeat_interleave(4, 1)[:, :7]).to(torch.float8_e4m3fn)
    back = dequantize(q, scale, (4, 4))
    assert back.shape == (5, 7)
    assert torch.allclose(back, w, rtol=0.07, atol=0.02)  # within e4m3 rounding
    with pytest.raises(ValueError, match="do not fit weight"):
        dequantize(q, scale[:1], (4, 4))


def test_fp8_checkpoint_is_dequantized_or_kept(tiny_model, tmp_path):
    src = tiny_model("ci")
    block = 16
    reference = {}

    def quantize(tensors):
        for name in [n for n in tensors if n.endswith("proj.weight") and tensors[n].dim() == 2]:
            w = tensors[name].float()
            o, i = w.shape
            scale = torch.rand(-(-o // block), -(-i // block)) + 0.5
            full = scale.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
            q = (w / full).to(torch.float8_e4m3fn)
            tensors[name] = q
            tensors[name + "_scale_inv"] = scale
            reference[name] = q.float() * full

    fp8 = copy_checkpoint(
        src,
        tmp_path / "fp8",
        tensors=quantize,
        config=lambda c: c.update(
            quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
        ),
    )
    model = runner_for(fp8, quantization="none").model
    w = dict(model.named_parameters())
    o_proj, up = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight"
    assert torch.equal(w[o_proj], reference[o_proj])
    inter = model.cfg.moe_intermediate_size
    assert torch.equal(w["model.layers.1.mlp.experts.w13"][2, inter:], reference[up])
    # --quantization auto keeps them FP8: the dequantized views are the same numbers.
    kept = runner_for(fp8).model
    mods = dict(kept.named_modules())
    assert torch.equal(mods["model.layers.1.self_attn.o_proj"].dequantized(torch.float32), reference[o_proj])
    w13, _ = mods["model.layers.1.mlp.experts"].weights(torch.float32)
    assert torch.equal(w13[2, inter:], reference[up])


def test_dummy_weights_are_deterministic_and_shaped(tiny_model):
    path = tiny_model("ci", config_only=True)
    a = params_of(runner_for(path, load_format="dummy", seed=3))
    b = params_of(runner_for(path, load_format="dummy", seed=3))
    c = params_of(runner_for(path, load_format="dummy", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(t).all() for t in a.values())
