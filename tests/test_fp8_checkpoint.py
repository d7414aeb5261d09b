"""pd-make-tiny-model --fp8: a block-FP8 checkpoint laid out like DeepSeek-V3/R1's plus its dequantized copy;
pd's loader and engine on it against the dequantized copy and transformers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pd.config import EngineConfig, ModelConfig
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.launch.make_tiny_model import main as make_tiny_model_main
from pd.tiny_model import get_preset, make_tiny_model, tensor_specs
from pd.types import SamplingParams
from tests.support.clients import random_prompt
from tests.support.oracle import hf_greedy

# The ci preset's projection dims are 32, 40, 64, 96 and 128: with [24, 48] blocks most weights end in
# partial blocks on both axes (and 32 < 48 is one partial block); with [16, 16] only kv_a_proj_with_mqa's
# 40 output rows end in a partial block.
BLOCK = (24, 48)
PROJECTIONS = (
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def _projection(name: str) -> bool:
    return name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in PROJECTIONS


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def _hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fp8_ci(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fp8") / "ci", "ci", seed=0, fp8=True, fp8_block=BLOCK)


@pytest.mark.parametrize("block", [BLOCK, (16, 16), (128, 128)])
def test_deepseek_names_dtypes_and_partial_block_scales(tmp_path, tiny_model, block):
    out = make_tiny_model(tmp_path / "m", "ci", seed=0, with_mtp=True, fp8=True, fp8_block=block)
    n = get_preset("ci").num_hidden_layers
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    assert ModelConfig.from_dir(out).fp8 is not None
    deq_config = json.loads((out / "dequantized" / "config.json").read_text())
    assert deq_config == {k: v for k, v in config.items() if k != "quantization_config"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (out / "dequantized" / name).read_bytes()

    fp8, deq = _tensors(out), _tensors(out / "dequantized")
    plain = _tensors(tiny_model("ci", with_mtp=True))  # the same model, not quantized
    specs = {s.name: s for s in tensor_specs(get_preset("ci"), "float32", with_mtp=True)}
    assert set(deq) == set(specs) == set(plain)
    quantized = {name for name in specs if _projection(name)}
    assert f"model.layers.{n}.eh_proj.weight" not in quantized
    assert {
        f"model.layers.{n}.self_attn.o_proj.weight",
        f"model.layers.{n}.mlp.experts.0.up_proj.weight",
    } <= quantized
    assert set(fp8) == set(specs) | {name + "_scale_inv" for name in quantized}

    partial_rows = partial_cols = False
    for name, spec in specs.items():
        assert deq[name].dtype == spec.dtype and tuple(deq[name].shape) == spec.shape, name
        if name not in quantized:
            # Router gates, the routing bias, norms, embeddings, lm_head and eh_proj: kept as written.
            assert torch.equal(fp8[name], plain[name]) and fp8[name].dtype == plain[name].dtype, name
            assert torch.equal(deq[name], plain[name]), name
            continue
        w, s = fp8[name], fp8[name + "_scale_inv"]
        o, i = spec.shape
        bo, bi = block
        assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (o, i), name
        assert s.dtype == torch.float32 and tuple(s.shape) == (-(-o // bo), -(-i // bi)), name
        partial_rows |= o % bo != 0
        partial_cols |= i % bi != 0
        # Per block: scale = amax / 448, so each block's largest |value| quantizes to ±448, and the dequantized
        # copy is exactly fp8 * scale_inv, close to the unquantized weight.
        ref = plain[name]
        for r in range(s.shape[0]):
            for c in range(s.shape[1]):
                blk = (slice(r * bo, (r + 1) * bo), slice(c * bi, (c + 1) * bi))
                amax = ref[blk].abs().max()
                assert s[r, c] == amax / 448, (name, r, c)
                assert w[blk].float().abs().max() == 448, (name, r, c)
                assert torch.equal(deq[name][blk], w[blk].float() * s[r, c]), (name, r, c)
        assert (deq[name] - ref).abs().max() <= 0.07 * ref.abs().max(), name  # e4m3: 3 mantissa bits
    assert partial_rows and (partial_cols or block == (16, 16))


def test_same_seed_gives_identical_files_and_the_cli_writes_the_same(tmp_path):
    first = make_tiny_model(tmp_path / "a", "ci", seed=3, with_mtp=True, fp8=True, fp8_block=BLOCK)
    second = make_tiny_model(tmp_path / "b", "ci", seed=3, with_mtp=True, fp8=True, fp8_block=BLOCK)
    make_tiny_model_main(
        [
            str(tmp_path / "cli"),
            "--preset",
            "ci",
            "--seed",
            "3",
            "--with-mtp",
            "--fp8",
            "--fp8-block",
            "24",
            "48",
        ]
    )
    hashes = _hashes(first)
    assert {
        "model.safetensors",
        "config.json",
        "dequantized/model.safetensors",
        "dequantized/config.json",
    } <= set(hashes)
    assert hashes == _hashes(second) == _hashes(tmp_path / "cli")
    other_seed = make_tiny_model(tmp_path / "c", "ci", seed=4, with_mtp=True, fp8=True, fp8_block=BLOCK)
    assert _hashes(other_seed)["model.safetensors"] != hashes["model.safetensors"]


def test_sharded_fp8_checkpoint_holds_the_same_tensors(tmp_path, fp8_ci):
    sharded = make_tiny_model(tmp_path / "s", "ci", seed=0, fp8=True, fp8_block=BLOCK, shard_size=20_000)
    for d in (sharded, sharded / "dequantized"):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    merged = {}
    for f in sorted(sharded.glob("model-*.safetensors")):
        merged.update(load_file(f))
    one = _tensors(fp8_ci)
    assert set(merged) == set(one)
    assert all(torch.equal(merged[k].view(torch.uint8), one[k].view(torch.uint8)) for k in one)


def test_bfloat16_dequantized_copy_keeps_the_dtype(tmp_path):
    out = make_tiny_model(tmp_path / "bf", "ci", seed=0, dtype="bfloat16", fp8=True, fp8_block=BLOCK)
    fp8, deq = _tensors(out), _tensors(out / "dequantized")
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert fp8["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert fp8["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert fp8[name].dtype == torch.float8_e4m3fn and deq[name].dtype == torch.bfloat16
    from pd.model.quant import dequantize

    assert torch.equal(deq[name], dequantize(fp8[name], fp8[name + "_scale_inv"], BLOCK).to(torch.bfloat16))


def _params(path: Path, quantization: str = "auto") -> dict[str, torch.Tensor]:
    engine = EngineConfig(str(path), num_pages=8, quantization=quantization)
    runner = ModelRunner(engine, ModelConfig.from_dir(path))
    return {k: v.detach().clone() for k, v in runner.model.named_parameters()}


def test_pd_loader_dequantizing_fp8_equals_the_dequantized_copy(fp8_ci):
    from_fp8, from_copy = _params(fp8_ci, "none"), _params(fp8_ci / "dequantized")
    assert from_fp8.keys() == from_copy.keys()
    for name, t in from_fp8.items():
        assert torch.equal(t, from_copy[name]), name


def test_pd_loader_keeps_fp8_as_the_checkpoint_stores_it(fp8_ci):
    # --quantization auto on an FP8 checkpoint: every quantized projection stays float8_e4m3fn with the
    # checkpoint's own scales; kv_b_proj (absorbed by MLA decode), norms, router, embeddings stay float32.
    kept, ckpt = _params(fp8_ci), _tensors(fp8_ci)
    fp8_names = {k for k, v in kept.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8_names and all(re.search(r"(\.w13|\.w2|_proj(_with_mqa)?\.weight)$", n) for n in fp8_names)
    assert not any("kv_b_proj" in n or "gate.weight" in n for n in fp8_names)
    for name in fp8_names:
        assert kept[name + "_scale_inv"].dtype == torch.float32
    # The merged first query projection and kv_a_proj_with_mqa (40 rows: a partial last block): the checkpoint's
    # two tensors' rows, then their scales, each blocked on its own.
    a = "model.layers.0.self_attn."
    first = next(a + n + ".weight" for n in ("q_a_proj", "q_proj") if a + n + ".weight" in ckpt)
    q, kv = ckpt[first], ckpt[a + "kv_a_proj_with_mqa.weight"]
    merged = kept[a + "q_kv_a_proj.weight"]
    assert torch.equal(merged.view(torch.uint8), torch.cat([q, kv]).view(torch.uint8))
    qs, kvs = ckpt[first + "_scale_inv"], ckpt[a + "kv_a_proj_with_mqa.weight_scale_inv"]
    assert torch.equal(kept[a + "q_kv_a_proj.weight_scale_inv"], torch.cat([qs, kvs]))
    # The merged gate/up of expert 3 in layer 1: gate rows then up rows, each with its own blocks.
    e = "model.layers.1.mlp.experts.3."
    w13, s13 = kept["model.layers.1.mlp.experts.w13"][3], kept["model.layers.1.mlp.experts.w13_scale_inv"][3]
    gate, up = ckpt[e + "gate_proj.weight"], ckpt[e + "up_proj.weight"]
    assert torch.equal(w13.view(torch.uint8), torch.cat([gate, up]).view(torch.uint8))
    gs, us = ckpt[e + "gate_proj.weight_scale_inv"], ckpt[e + "up_proj.weight_scale_inv"]
    assert torch.equal(s13, torch.cat([gs, us]))


def test_greedy_on_fp8_equals_transformers_on_the_dequantized_copy(fp8_ci, hf_model):
    hf = hf_model(fp8_ci / "dequantized")
    engine = Engine(EngineConfig(model_path=str(fp8_ci), page_size=16, chunk_size=32))
    rng = random.Random(8)
    prompts = [random_prompt(rng, rng.randint(3, 60), engine.model_cfg.vocab_size) for _ in range(4)]
    got = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [c.output_ids for c in got] == [hf_greedy(hf, p, 16) for p in prompts]


def test_two_rank_ep_deployment_on_fp8_gives_transformers_tokens(fp8_ci, hf_model, tmp_path):
    # pd-serve with DP attention + EP MoE over 2 ranks (gloo on CPU): each rank dequantizes only its experts.
    pytest.importorskip("openai")
    from tests.support.clients import async_openai_client, greedy_request
    from tests.support.cluster import pd_serve

    hf = hf_model(fp8_ci / "dequantized")
    rng = random.Random(9)
    prompts = [random_prompt(rng, rng.choice([3, 20, 45]), 1000) for _ in range(6)]

    async def run(url: str) -> list[list[int]]:
        c = async_openai_client(url)
        outs = await asyncio.gather(*(c.completions.create(**greedy_request(p, 12)) for p in prompts))
        await c.close()
        return [o.choices[0].model_extra["token_ids"] for o in outs]

    flags = ["--dp", "2", "--ep", "2", "--chunk-size", "16", "--model-name", "tiny-ci"]
    with pd_serve(fp8_ci, tmp_path / "pd-serve.log", *flags) as url:
        got = asyncio.run(run(url))
    assert got == [hf_greedy(hf, p, 12) for p in prompts]
