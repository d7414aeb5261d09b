"""Block-FP8 weights kept FP8 (``--quantization``): quantization with row parts, the loader quantizing an
unquantized checkpoint, dummy FP8 weights, and prefill/decode instances of different weight precision
serving together (the KV layout does not depend on it)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pd.config import EngineConfig, FP8Quant, ModelConfig
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.model.quant import FP8_DTYPE, Fp8Linear, dequantize, quantize, w8a8_capable
from pd.types import SamplingParams
from tests.support.clients import random_prompt
from tests.support.oracle import hf_greedy


def test_quantize_blocks_each_row_part_apart():
    w = torch.randn(2 * 40, 50)
    q, s = quantize(w, (16, 32), parts=(40, 40))
    assert q.dtype == FP8_DTYPE and s.shape == (2 * 3, 2)  # ceil(40/16) row blocks per part
    for i, part in enumerate((w[:40], w[40:])):
        pq, ps = quantize(part, (16, 32))
        assert torch.equal(q[40 * i : 40 * (i + 1)].view(torch.uint8), pq.view(torch.uint8))
        assert torch.equal(s[3 * i : 3 * (i + 1)], ps)
    back = dequantize(q, s, (16, 32), parts=(40, 40))
    # e4m3 keeps 3 mantissa bits: each value within half a step (1/16 relative) of its block's grid.
    assert ((back - w).abs() <= w.abs() / 15 + s.max() * 2**-9).all()
    # Each block's largest magnitude lands on +-448 exactly.
    assert q.float().abs().amax() == 448
    with pytest.raises(ValueError, match="do not fit weight"):
        dequantize(q, s, (16, 32))  # one part's blocks would straddle the halves


def test_w8a8_needs_cuda_and_128_blocks():
    cuda, cpu, q = torch.device("cuda", 0), torch.device("cpu"), FP8Quant()
    assert w8a8_capable(q, cuda, 7168, (576,))  # a partial last row block is padded at prepare
    assert w8a8_capable(q, cuda, 7168, (2048, 2048))
    assert not w8a8_capable(q, cuda, 7168, (1400, 1400))  # a half ending mid-block
    assert w8a8_capable(q, cuda, 7168, (1536, 576))  # q_kv_a_proj: only the last part ends mid-block
    assert not w8a8_capable(q, cuda, 7168, (576, 1536))
    assert not w8a8_capable(q, cuda, 100, (256,))
    assert not w8a8_capable(FP8Quant(64, 64), cuda, 7168, (256,))
    assert not w8a8_capable(q, cpu, 7168, (256,))


def _runner(path, **kw) -> ModelRunner:
    return ModelRunner(EngineConfig(str(path), num_pages=64, **kw), ModelConfig.from_dir(path))


def test_fp8_on_an_unquantized_checkpoint_quantizes_on_load(tiny_model):
    src = tiny_model("ci")
    plain = dict(_runner(src).model.named_parameters())
    fp8 = dict(_runner(src, quantization="fp8").model.named_parameters())
    gate_up = "model.layers.0.mlp.gate_up_proj.weight"  # dense layer 0: intermediate 128 = one block per half
    w13 = "model.layers.1.mlp.experts.w13"  # 32-row halves: one partial block each
    for name, parts in (
        (gate_up, (128, 128)),
        (w13, (32, 32)),
        ("model.layers.0.self_attn.o_proj.weight", None),
    ):
        q, s = quantize(plain[name], (128, 128), parts)
        assert fp8[name].dtype == FP8_DTYPE
        assert torch.equal(fp8[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(fp8[name + "_scale_inv"], s), name
    assert fp8["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float32
    assert torch.equal(fp8["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])


def test_dummy_fp8_weights_are_the_dummy_draw_quantized(tiny_model):
    """--load-format dummy --quantization fp8: the same draw as the unquantized dummy model, block-quantized;
    greedy decoding on it equals the unquantized model holding the dequantized weights (the CPU path is
    weight-only, so exactly)."""
    src = tiny_model("ci")
    prompts = [random_prompt(random.Random(3), n, 1000) for n in (5, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fp8 = Engine(EngineConfig(str(src), load_format="dummy", quantization="fp8", page_size=16, chunk_size=32))
    plain = Engine(EngineConfig(str(src), load_format="dummy", page_size=16, chunk_size=32))
    fp8_params = dict(fp8.runner.model.named_parameters())
    modules = dict(fp8.runner.model.named_modules())
    with torch.no_grad():
        for name, p in plain.runner.model.named_parameters():
            if fp8_params[name].dtype != FP8_DTYPE:
                assert torch.equal(p, fp8_params[name]), name
                continue
            owner = modules[name.rpartition(".")[0]]
            parts = owner.parts if name.endswith((".weight", ".w13")) else None
            q, s = quantize(p, (128, 128), parts)
            assert torch.equal(q.view(torch.uint8), fp8_params[name].view(torch.uint8)), name
            assert torch.equal(s, fp8_params[name + "_scale_inv"]), name
            p.copy_(dequantize(q, s, (128, 128), parts))
    assert any(isinstance(m, Fp8Linear) for m in modules.values())
    got, want = fp8.generate(prompts, params), plain.generate(prompts, params)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]


def test_fp8_prefill_serves_a_decode_instance_without_fp8(tmp_path, tiny_model, hf_model):
    """Weight precision is not part of the P/D compatibility check: the KV layout (page size, KV dtype,
    layers, latent width; bootstrap.compat.KV_FIELDS) and the architecture fingerprint do not depend on it.
    A prefill instance holding the checkpoint in FP8 and a decode instance holding it dequantized register
    together and give transformers' tokens on the dequantized copy."""
    pytest.importorskip("openai")
    from tests.support.clients import async_openai_client, greedy_request
    from tests.support.cluster import Cluster

    model = tiny_model("ci", fp8=True, fp8_block=(16, 16))
    hf = hf_model(model / "dequantized")
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.choice([4, 30]), 1000) for _ in range(4)]

    async def run(url: str) -> list[list[int]]:
        c = async_openai_client(url)
        outs = await asyncio.gather(*(c.completions.create(**greedy_request(p, 10)) for p in prompts))
        await c.close()
        return [o.choices[0].model_extra["token_ids"] for o in outs]

    cluster = Cluster(model, tmp_path, worker_args=("--chunk-size", "16"))
    cluster.cmds["prefill0"] += ["--quantization", "fp8"]
    cluster.cmds["decode0"] += ["--quantization", "none"]
    with cluster:
        got = asyncio.run(run(cluster.url))
    assert got == [hf_greedy(hf, p, 10) for p in prompts]
