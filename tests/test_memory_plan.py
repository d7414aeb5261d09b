"""pd.bench.memory_plan: per-rank weights and KV pool of an EP-N instance, from config.json alone.

Oracles: pd's own model built on the meta device (parameter counts and bf16 bytes, group by group),
the tiny-model checkpoint writer (every tensor of a checkpoint, MTP layer included) with pd's FP8
loader accepting the scale shapes, ``pd.kv_cache.KVLayout`` for the pool, and the published totals.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from pd.bench.memory_plan import GB, GROUPS, main, plan
from pd.config import FP8Quant, ModelConfig
from pd.engine.runner import build_model
from pd.ep import EPConfig
from pd.kv_cache import KVLayout
from pd.model.quant import dequantize
from pd.tiny_model import PRESETS, model_config, tensor_specs

_FP8_128 = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}

# The public config.json of deepseek-ai/DeepSeek-V3, written out here from its published numbers.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": _FP8_128,
}

# moonshotai/Kimi-K2-Instruct: the DeepSeek-V3 architecture with 384 experts in one group, 64 heads, one
# dense layer, a 163,840-token vocabulary and no MTP layer.
KIMI_K2 = {
    **DEEPSEEK_V3,
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "num_nextn_predict_layers": 0,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_routed_experts": 384,
    "routed_scaling_factor": 2.827,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 131072,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "bos_token_id": 163584,
    "eos_token_id": 163585,
}

MODELS = {"DeepSeek-V3": DEEPSEEK_V3, "Kimi-K2": KIMI_K2}


def _within(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


def test_published_totals():
    # DeepSeek-V3: "685B on Hugging Face: 671B of main model weights and 14B of MTP module weights" (its
    # README). The main model alone is 671B (the MTP module is on top of it, not inside it).
    ds = plan(DEEPSEEK_V3, 1, 10_000)
    assert _within(ds.total_params, 671e9, 0.01), ds.total_params
    assert _within(ds.total_params + ds.mtp_params, 685e9, 0.01), ds.mtp_params
    assert 13e9 < ds.mtp_params < 14.5e9  # a MoE layer, eh_proj and copies of embedding and head
    # Kimi-K2: Hugging Face counts 1026.5B in the checkpoint (the model card rounds to "1T"; the tech report's
    # "1.04T" is 1.3% above what this architecture holds).
    k2 = plan(KIMI_K2, 1, 10_000)
    assert _within(k2.total_params, 1026.5e9, 0.01), k2.total_params
    assert k2.mtp_layers == 0 and k2.mtp_params == 0

    # The big terms by hand. An expert is gate + up + down: 3 x 7168 x 2048 = 44,040,192 parameters.
    expert = 3 * 7168 * 2048
    assert ds.group("routed_experts").params == 58 * 256 * expert  # 61 layers, 3 dense
    assert k2.group("routed_experts").params == 60 * 384 * expert  # 1 dense
    # MLA of DeepSeek-V3: q_a 1536x7168, q_b 128*192x1536, kv_a 576x7168, kv_b 128*256x512, o 7168x128*128,
    # plus the q_a and kv_a norms.
    mla = 1536 * 7168 + 128 * 192 * 1536 + 576 * 7168 + 128 * 256 * 512 + 7168 * 128 * 128 + 1536 + 512
    assert ds.group("attention").params == 61 * mla
    assert ds.group("dense_mlp").params == 3 * 3 * 7168 * 18432
    assert ds.group("embeddings").params == ds.group("lm_head").params == 129280 * 7168
    assert ds.group("router").params == 58 * (256 * 7168 + 256)


def _ep_stub(cfg: ModelConfig, ep: int) -> SimpleNamespace:
    """What the model's constructor reads of an EP backend: its config (rank 0 of ``ep``)."""
    return SimpleNamespace(
        config=EPConfig(cfg.n_routed_experts, cfg.hidden_size, 1, torch.bfloat16, 0, ep, device="meta")
    )


def _group_of(name: str, dense: bool) -> str:
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        assert dense, name
        return "dense_mlp"
    if name.endswith("norm.weight"):
        return "norms"
    if "embed_tokens" in name:
        return "embeddings"
    assert name == "lm_head.weight", name
    return "lm_head"


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_matches_pd_model_on_meta(preset, dtype):
    """The plan's per-rank figures equal pd's own model, built the way the runner builds it
    (``build_model``: bf16 parameters, the routing bias float32, lm_head tied or not; with FP8 the
    projections float8_e4m3fn plus float32 scales per 128 x 128 block) on the meta device."""
    config = model_config(PRESETS[preset], bos_token_id=0, eos_token_id=1, dtype="bfloat16", with_mtp=True)
    cfg = ModelConfig.from_hf(config)
    quant = FP8Quant() if dtype == "fp8" else None
    for ep in (1, 2, 4, 8):
        if cfg.n_routed_experts % ep:
            continue
        model = build_model(cfg, _ep_stub(cfg, ep), 16, torch.device("meta"), torch.bfloat16, quant=quant)
        params = dict.fromkeys(GROUPS, 0)
        nbytes = dict.fromkeys(GROUPS, 0)
        for name, p in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
            m = re.match(r"model\.layers\.(\d+)\.", name)
            group = _group_of(name, dense=bool(m) and not cfg.is_moe_layer(int(m.group(1))))
            params[group] += 0 if name.endswith("_scale_inv") else p.numel()
            nbytes[group] += p.numel() * p.element_size()
        mp = plan(config, ep, 80, dtype=dtype)
        assert {g.name: g.params for g in mp.groups} == params, (preset, ep)
        assert {g.name: g.nbytes for g in mp.groups} == nbytes, (preset, ep)
        assert mp.experts_per_rank == cfg.n_routed_experts // ep
        if ep == 1:
            assert mp.total_params == sum(params.values())


@pytest.mark.parametrize("preset", ["ci", "nolora-groups", "tied", "gpu-tiny"])
def test_fp8_and_mtp_match_the_checkpoint(preset):
    """Whole-model and MTP figures equal a sum over every tensor the tiny-model writer puts in a checkpoint
    (MTP layer included), in bf16 and in block-FP8 with 16 x 16 blocks (partial edge blocks: e.g.
    kv_a_proj_with_mqa is 40 x 64); pd's FP8 loader accepts each scale shape counted."""
    p = PRESETS[preset]
    block = 16
    config = model_config(p, bos_token_id=0, eos_token_id=1, dtype="bfloat16", with_mtp=True)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [block, block],
    }
    main_t = {"params": 0, "bf16": 0, "fp8": 0}
    mtp_t = {"params": 0, "bf16": 0, "fp8": 0}
    for spec in tensor_specs(p, "bfloat16", with_mtp=True):
        m = re.match(r"model\.layers\.(\d+)\.", spec.name)
        tally = mtp_t if m and int(m.group(1)) >= p.num_hidden_layers else main_t
        n = math.prod(spec.shape)
        # DeepSeek's FP8 checkpoints quantize the projections of attention and the MLPs (dense, shared,
        # routed); not the router gate, the MTP's eh_proj, norms, embeddings or the output head. pd holds
        # kv_b_proj dequantized (MLA decode absorbs it), and the plan counts what pd holds.
        quantized = (
            re.search(r"_proj(_with_mqa)?\.weight$", spec.name)
            and "eh_proj" not in spec.name
            and "kv_b_proj" not in spec.name
        )
        if quantized:
            scale = torch.ones(-(-spec.shape[0] // block), -(-spec.shape[1] // block))
            dequantize(torch.zeros(spec.shape, dtype=torch.float8_e4m3fn), scale, (block, block))
        tally["params"] += n
        tally["bf16"] += n * spec.dtype.itemsize
        tally["fp8"] += n + 4 * scale.numel() if quantized else n * spec.dtype.itemsize
    for dtype in ("bf16", "fp8"):
        mp = plan(config, 1, 80, dtype=dtype)
        assert mp.total_params == mp.weight_params == main_t["params"]
        assert mp.total_bytes == mp.weight_bytes == main_t[dtype], dtype
        assert mp.mtp_params == mtp_t["params"]
        assert mp.mtp_bytes == mp.mtp_bytes_per_rank == mtp_t[dtype], dtype
        assert (mp.scale_bytes > 0) == (dtype == "fp8")


def test_kv_pool_matches_kv_layout():
    mp = plan(DEEPSEEK_V3, 8, 141, dtype="fp8")
    assert mp.kv_bytes_per_token == 61 * (512 + 64) * 2
    layout = KVLayout(61, mp.num_pages, 16, 512 + 64, torch.bfloat16)
    assert layout.nbytes == mp.kv_pool_bytes
    room = mp.share_bytes - mp.weight_bytes
    assert room - mp.page_nbytes < mp.kv_pool_bytes <= room
    assert mp.kv_tokens == layout.usable_pages * 16
    fp8_kv = plan(DEEPSEEK_V3, 8, 141, dtype="fp8", kv_dtype="fp8", page_size=64)
    assert fp8_kv.kv_bytes_per_token == mp.kv_bytes_per_token // 2
    assert abs(fp8_kv.kv_tokens - 2 * mp.kv_tokens) <= 2 * 64


def test_deepseek_v3_ep8_on_141gb():
    bf16 = plan(DEEPSEEK_V3, 8, 141)
    assert not bf16.fits and bf16.num_pages == 0 and bf16.kv_tokens == 0
    assert 196e9 < bf16.weight_bytes < 200e9  # ~198 GB: 32 experts x 58 layers alone are 163.5 GB
    assert bf16.refusal() == f"does not fit: needs {bf16.needs_bytes / GB:.2f} GB, has 119.85 GB"
    fp8 = plan(DEEPSEEK_V3, 8, 141, dtype="fp8")
    assert fp8.fits and 99e9 < fp8.weight_bytes < 103e9  # ~101 GB
    assert fp8.kv_tokens > 200_000
    # FP8 halves the linear weights; bf16 embeddings, lm_head and router gates stay as they are.
    for name in ("embeddings", "lm_head", "router", "norms"):
        assert fp8.group(name).nbytes == bf16.group(name).nbytes
    experts = fp8.group("routed_experts")
    assert experts.nbytes == experts.params + experts.scale_bytes
    # Every [2048, 7168] or [7168, 2048] weight has 16 x 56 blocks.
    assert experts.scale_bytes == 32 * 58 * 3 * 16 * 56 * 4


@pytest.mark.parametrize("model", sorted(MODELS))
def test_grid_is_consistent_and_monotone(model):
    config = MODELS[model]
    eps, gpus = (8, 16, 32), (80, 141)
    grid = {
        (ep, gb, dt): plan(config, ep, gb, dtype=dt) for ep in eps for gb in gpus for dt in ("bf16", "fp8")
    }
    for (ep, gb, dt), mp in grid.items():
        assert mp.experts_per_rank * ep == mp.n_routed_experts
        assert mp.weight_bytes == mp.replicated_bytes + mp.group("routed_experts").nbytes
        assert mp.fits == (mp.needs_bytes <= mp.share_bytes)
        if mp.fits:
            assert mp.weight_bytes + mp.kv_pool_bytes <= mp.share_bytes
        if dt == "bf16":
            assert grid[ep, gb, "fp8"].weight_bytes < mp.weight_bytes
            assert grid[ep, gb, "fp8"].num_pages >= mp.num_pages
    for gb in gpus:
        for dt in ("bf16", "fp8"):
            row = [grid[ep, gb, dt] for ep in eps]
            assert len({mp.replicated_bytes for mp in row}) == 1  # replicated: the same on every rank
            # Routed experts: split N ways.
            assert len({mp.group("routed_experts").nbytes * mp.ep for mp in row}) == 1
            for small, big in itertools.pairwise(row):  # more EP -> fewer bytes per rank, more KV
                assert big.weight_bytes < small.weight_bytes
                assert big.num_pages >= small.num_pages
                assert big.fits or not small.fits
    for ep in eps:
        for dt in ("bf16", "fp8"):
            assert grid[ep, 141, dt].num_pages >= grid[ep, 80, dt].num_pages
            assert grid[ep, 141, dt].fits or not grid[ep, 80, dt].fits


def test_refuses_an_ep_size_that_does_not_divide_the_experts():
    with pytest.raises(ValueError, match="divide n_routed_experts 256"):
        plan(DEEPSEEK_V3, 6, 141)
    with pytest.raises(ValueError, match="dtype"):
        plan(DEEPSEEK_V3, 8, 141, dtype="int4")


def test_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    assert main([str(tmp_path), "--ep", "8", "--gpu-gb", "141"]) == 1
    out, err = capsys.readouterr()
    assert "routed experts (32 x 58 layers)" in out and "MTP (1 layer from layer 61" in out
    assert err.strip() == plan(DEEPSEEK_V3, 8, 141).refusal()
    assert err.startswith("does not fit: needs 197.") and err.strip().endswith("has 119.85 GB")
    assert main([str(tmp_path / "config.json"), "--ep", "8", "--gpu-gb", "141", "--dtype", "fp8"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "fp8 scales" in out and "KV pool:" in out and "tokens" in out
    assert main([str(tmp_path), "--ep", "7", "--gpu-gb", "141"]) == 2
    assert "divide" in capsys.readouterr().err
