"""pd-make-tiny-model: determinism, the files' format, and transformers' DeepseekV3ForCausalLM as the judge of
names, shapes and config fields."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pd.launch.make_tiny_model import main as make_tiny_model_main
from pd.tiny_model import PRESETS, get_preset, make_tiny_model, tensor_specs

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY_PRESETS = [name for name in PRESETS if name != "moonlight-shape"]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _load_hf(d: Path):
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        d, output_loading_info=True, dtype=torch.float32
    )
    return model.eval(), info


def test_same_arguments_give_identical_files_across_processes(tmp_path, tiny_model_dir):
    # A second process (fresh hash seeds in the Rust tokenizer trainer) through the console script's code.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pd.launch.make_tiny_model",
            str(tmp_path / "cli"),
            "--preset",
            "ci",
            "--seed",
            "0",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    first, second = _files(tiny_model_dir), _files(tmp_path / "cli")
    assert set(first) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert first == second


def test_other_seed_changes_weights_only(tmp_path, tiny_model_dir):
    other = _files(make_tiny_model(tmp_path / "seed1", "ci", seed=1))
    base = _files(tiny_model_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert other[name] == base[name], name
    a, b = (
        load_file(tiny_model_dir / "model.safetensors"),
        load_file(tmp_path / "seed1" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_transformers_loads_preset_without_missing_or_unexpected_keys(tmp_path, preset):
    d = make_tiny_model(tmp_path / preset, preset)
    model, info = _load_hf(d)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, error messages
    p = get_preset(preset)
    cfg = model.config
    assert (cfg.q_lora_rank, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (
        p.q_lora_rank,
        p.n_group,
        p.topk_group,
        p.num_experts_per_tok,
    )
    assert cfg.tie_word_embeddings == p.tie_word_embeddings
    if p.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if p.rope_scaling is None:
        assert cfg.rope_parameters["rope_type"] == "default"
    else:
        rope = cfg.rope_parameters
        assert rope["rope_type"] == "yarn"
        assert (rope["factor"], rope["mscale"], rope["mscale_all_dim"]) == (
            p.rope_scaling.factor,
            p.rope_scaling.mscale,
            p.rope_scaling.mscale_all_dim,
        )
        assert rope["original_max_position_embeddings"] == p.rope_scaling.original_max_position_embeddings

    # The weights transformers holds are the file's: per-expert tensors fused into gate_up_proj / down_proj.
    weights = load_file(d / "model.safetensors")
    layer = p.first_k_dense_replace
    experts = model.model.layers[layer].mlp.experts
    for e in (0, p.n_routed_experts - 1):
        pre = f"model.layers.{layer}.mlp.experts.{e}"
        gate_up = torch.cat([weights[f"{pre}.gate_proj.weight"], weights[f"{pre}.up_proj.weight"]])
        assert torch.equal(experts.gate_up_proj[e], gate_up)
        assert torch.equal(experts.down_proj[e], weights[f"{pre}.down_proj.weight"])
    bias = model.model.layers[layer].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, weights[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"])

    # A forward pass is finite with logits spread well beyond near-ties.
    ids = torch.arange(2, 42).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.shape == (40, p.vocab_size)
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std(dim=-1).mean() < 10.0
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.2


def test_routing_varies_by_token_and_depends_on_correction_bias(tiny_model_dir):
    model, _ = _load_hf(tiny_model_dir)
    p = get_preset("ci")
    gate = model.model.layers[p.first_k_dense_replace].mlp.gate
    inputs = []
    handle = gate.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(torch.arange(2, 102).unsqueeze(0))
    handle.remove()
    hidden = inputs[0]
    with torch.no_grad():
        _, _, chosen = gate(hidden)
        bias = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        _, _, chosen_without_bias = gate(hidden)
        gate.e_score_correction_bias.copy_(bias)
    sets = [frozenset(row.tolist()) for row in chosen]
    sets_without_bias = [frozenset(row.tolist()) for row in chosen_without_bias]
    assert len(set(sets)) >= 4  # routing varies by token
    assert sum(a != b for a, b in zip(sets, sets_without_bias)) >= 5  # the bias changes some choices
    assert bias.abs().min() > 0


def test_sharded_checkpoint_index_and_contents(tmp_path, tiny_model_dir):
    shard_size = 200_000
    d = make_tiny_model(tmp_path / "sharded", "ci", shard_size=shard_size)
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)

    whole = load_file(tiny_model_dir / "model.safetensors")
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    seen = set()
    for shard in shards:
        tensors = load_file(d / shard)
        assert all(index["weight_map"][name] == shard for name in tensors)
        assert not seen & tensors.keys()
        seen |= tensors.keys()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= shard_size or len(tensors) == 1
        for name, tensor in tensors.items():
            assert torch.equal(tensor, whole[name]), name
    assert seen == whole.keys()

    _, info = _load_hf(d)
    assert not any(info.values()), info

    # Rewriting the directory unsharded leaves no stale shards or index behind.
    make_tiny_model(d, "ci")
    assert sorted(p.name for p in d.glob("model*")) == ["model.safetensors"]


def test_safetensors_header_is_sorted_with_fixed_metadata(tiny_model_dir):
    raw = (tiny_model_dir / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"format": "pt"}
    names = list(header)
    assert names == sorted(names)
    offsets = [header[name]["data_offsets"] for name in names]
    assert offsets[0][0] == 0
    assert all(prev[1] == cur[0] for prev, cur in itertools.pairwise(offsets))
    assert offsets[-1][1] == len(raw) - 8 - header_len


def test_mtp_layer_is_extra_and_base_weights_unchanged(tmp_path, tiny_model_dir):
    d = make_tiny_model(tmp_path / "mtp", "ci", with_mtp=True)
    p = get_preset("ci")
    n = p.num_hidden_layers
    assert json.loads((d / "config.json").read_text())["num_nextn_predict_layers"] == 1
    _, info = _load_hf(d)
    assert not info["missing_keys"]
    assert info["unexpected_keys"]
    assert all(key.startswith(f"model.layers.{n}.") for key in info["unexpected_keys"])

    with_mtp, base = load_file(d / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    mtp_names = {name for name in with_mtp if name.startswith(f"model.layers.{n}.")}
    assert with_mtp.keys() - mtp_names == base.keys()
    assert all(torch.equal(with_mtp[k], base[k]) for k in base)
    for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{n}.{part}.weight" in mtp_names
    assert f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight" in mtp_names
    assert f"model.layers.{n}.mlp.experts.0.gate_proj.weight" in mtp_names
    assert with_mtp[f"model.layers.{n}.eh_proj.weight"].shape == (p.hidden_size, 2 * p.hidden_size)
    # As published: the MTP module's embedding and output head equal the main model's.
    assert torch.equal(with_mtp[f"model.layers.{n}.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(with_mtp[f"model.layers.{n}.shared_head.head.weight"], base["lm_head.weight"])


def test_bfloat16_weights_are_the_float32_weights_rounded(tmp_path, tiny_model_dir):
    d = make_tiny_model(tmp_path / "bf16", "ci", dtype="bfloat16")
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16, fp32 = load_file(d / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in bf16.items():
        if name.endswith("e_score_correction_bias"):
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, fp32[name])
        else:
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(2, 12).unsqueeze(0)).logits).all()


def test_config_follows_published_deepseek_v3_style(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    p = get_preset("ci")
    assert config["model_type"] == "deepseek_v3"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "rope_parameters" not in config and config["rope_scaling"] is None
    assert (config["topk_method"], config["scoring_func"], config["torch_dtype"]) == (
        "noaux_tc",
        "sigmoid",
        "float32",
    )
    assert config["num_nextn_predict_layers"] == 0
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert config["num_key_value_heads"] == config["num_attention_heads"] == p.num_attention_heads

    yarn = get_preset("yarn").rope_scaling.to_config()
    assert yarn["type"] == yarn["rope_type"] == "yarn"
    assert set(yarn) == {
        "type",
        "rope_type",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    }


def test_moonlight_shape_config_only(tmp_path):
    d = make_tiny_model(tmp_path / "moon", "moonlight-shape", config_only=True)
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((d / "config.json").read_text())
    expected = {  # DESIGN.md §8
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "first_k_dense_replace": 1,
        "intermediate_size": 11264,
        "n_routed_experts": 64,
        "moe_intermediate_size": 1408,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "num_attention_heads": 16,
        "vocab_size": 163840,
        "torch_dtype": "bfloat16",
    }
    assert {k: config[k] for k in expected} == expected

    # transformers builds the same architecture from this config (on the meta device: no memory).
    hf_config = transformers.AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf_config)
    hf_params = dict(model.named_parameters())
    specs = tensor_specs(get_preset("moonlight-shape"), "bfloat16")
    assert sum(math.prod(s.shape) for s in specs if "e_score" not in s.name) == sum(
        t.numel() for t in hf_params.values()
    )
    non_expert = {s.name: s.shape for s in specs if ".experts." not in s.name and "e_score" not in s.name}
    assert non_expert == {name: tuple(t.shape) for name, t in hf_params.items() if ".experts." not in name}
    total = sum(math.prod(s.shape) for s in specs)
    assert 15.9e9 < total < 16.0e9  # DESIGN.md §8: ~15.96B parameters


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    for argv in (["--preset", "nope"], ["--shard-size", "0"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            make_tiny_model_main([str(tmp_path / "x"), *argv])
    with pytest.raises(ValueError, match="unknown preset"):
        make_tiny_model(tmp_path / "y", "nope")


def test_safe_open_reads_every_specified_tensor(tiny_model_dir):
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == {s.name for s in tensor_specs(get_preset("ci"), "float32")}
