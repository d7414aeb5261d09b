"""The MTP layer (pd.model.mtp) against a dense reference on the tiny checkpoint with ``--with-mtp``, in
float32: the formula written out here on the checkpoint's own tensors (its copies of the embedding and
head included), its decoder block run by transformers (the same weights as ``model.layers.{n}``, no paged
cache); and how loading refuses checkpoints without the layer."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from pd.attention.base import AttnInputs
from pd.config import EngineConfig, ModelConfig
from pd.engine.runner import ModelRunner
from pd.model.context import ForwardContext
from pd.model.mtp import DeepseekV3WithMTP
from pd.model.weights import WeightLoadError
from pd.speculative import SpeculativeConfig
from pd.types import BatchMode
from tests.support.checkpoints import copy_checkpoint
from tests.support.clients import random_prompt
from tests.support.oracle import rel_err

MAX_REL_ERR = 1e-4
PAGE_SIZE = 3  # odd on purpose: pages end mid-chunk
MTP = SpeculativeConfig("mtp", 2)


def mtp_runner(path, **kw) -> ModelRunner:
    cfg = EngineConfig(str(path), page_size=PAGE_SIZE, num_pages=64, speculative=MTP, **kw)
    return ModelRunner(cfg, ModelConfig.from_dir(path))


class Reference:
    """The MTP layer computed densely: ``h' = eh_proj([enorm(E[t_next]); hnorm(h)])``, transformers' decoder
    layer over the whole sequence (causal), then ``shared_head.norm`` and ``shared_head.head``."""

    def __init__(self, path) -> None:
        import transformers

        cfg = ModelConfig.from_dir(path)
        self.n, self.eps = cfg.num_hidden_layers, cfg.rms_norm_eps
        prefix = f"model.layers.{self.n}."
        self.t = {k.removeprefix(prefix): v.float() for k, v in load_file(path / "model.safetensors").items()}
        # One more layer than the model has: transformers loads the MTP layer's block as its last layer.
        self.hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, num_hidden_layers=self.n + 1
        ).eval()

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, H]`` at positions ``0..T-1``, ``next_ids [T]`` -> (logits ``[T, V]``, head input)."""
        t = self.t
        e = self.rms(t["embed_tokens.weight"][next_ids], t["enorm.weight"])
        h = self.rms(hidden.float(), t["hnorm.weight"])
        x = (torch.cat([e, h], dim=-1) @ t["eh_proj.weight"].T)[None]  # [1, T, H]
        n = x.shape[1]
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        block = self.hf.model.layers[self.n]
        pe = self.hf.model.rotary_emb(x, positions)
        out = block(x, attention_mask=mask, position_ids=positions, position_embeddings=pe)
        out = out[0] if isinstance(out, tuple) else out
        head_in = self.rms(out[0], t["shared_head.norm.weight"])
        return head_in @ t["shared_head.head.weight"].T, head_in


@pytest.fixture(scope="module")
def setup(tiny_model, hf_model):
    path = tiny_model("ci", with_mtp=True)
    return path, hf_model(path), Reference(path), mtp_runner(path)


def draft(runner: ModelRunner, mode: BatchMode, pages, hidden, next_ids, start: int, end: int):
    """``runner.model.draft`` over positions ``[start, end)`` of one sequence through the paged cache."""
    runner.attn.prepare(AttnInputs(mode, [start], [end], [pages]))
    ctx = ForwardContext(mode, runner.attn, torch.arange(end - start))
    model = runner.model
    assert isinstance(model, DeepseekV3WithMTP)
    with torch.inference_mode():
        return model.draft(hidden[start:end], next_ids[start:end], torch.arange(start, end), ctx)


def test_draft_matches_the_dense_reference_in_extend_decode_and_a_chain(setup):
    _, hf, ref, runner = setup
    assert runner.pool.layout.num_layers == runner.model_cfg.num_hidden_layers + 1  # the MTP layer's cache
    rng = random.Random(0)
    ids = random_prompt(rng, 41, runner.model_cfg.vocab_size)
    with torch.no_grad():
        hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]  # final-normed, what lm_head reads
    # The MTP layer pairs the hidden state of position i with the token at i + 1.
    hidden, next_ids = hidden[:-1], torch.tensor(ids[1:])
    n = len(next_ids)
    pages = rng.sample(range(1, 64), -(-(n + 1) // PAGE_SIZE))  # scattered pages, room for one chained draft
    want_logits, want_hidden = ref(hidden, next_ids)

    logits, head_in = draft(runner, BatchMode.EXTEND, pages, hidden, next_ids, 0, n)
    assert rel_err(logits, want_logits) < MAX_REL_ERR
    assert rel_err(head_in, want_hidden) < MAX_REL_ERR

    # A chunk, then absorbed one-token decode steps over the MTP layer's paged cache.
    cut = n - 5
    parts = [draft(runner, BatchMode.EXTEND, pages, hidden, next_ids, 0, cut)]
    parts += [draft(runner, BatchMode.DECODE, pages, hidden, next_ids, p, p + 1) for p in range(cut, n)]
    assert rel_err(torch.cat([p[0] for p in parts]), want_logits) < MAX_REL_ERR
    assert rel_err(torch.cat([p[1] for p in parts]), want_hidden) < MAX_REL_ERR

    # A chained draft (K = 2): the last row's head input and its argmax token, at the next position.
    token = logits[-1:].argmax(-1)
    chain_hidden = torch.cat([hidden, head_in[-1:]])
    chain_ids = torch.cat([next_ids, token])
    second, _ = draft(runner, BatchMode.DECODE, pages, chain_hidden, chain_ids, n, n + 1)
    want_second, _ = ref(chain_hidden, chain_ids)
    assert rel_err(second, want_second[-1:]) < MAX_REL_ERR


def test_the_main_model_hands_the_mtp_layer_its_final_normed_hidden_state(setup):
    """``hidden()`` (what an engine passes to ``draft``) is transformers' last_hidden_state."""
    _, hf, _, runner = setup
    ids = random_prompt(random.Random(1), 20, runner.model_cfg.vocab_size)
    runner.attn.prepare(AttnInputs(BatchMode.EXTEND, [0], [len(ids)], [[1, 2, 3, 4, 5, 6, 7]]))
    ctx = ForwardContext(BatchMode.EXTEND, runner.attn, torch.arange(len(ids)))
    with torch.inference_mode():
        mine = runner.model.hidden(torch.tensor(ids), torch.arange(len(ids)), ctx, torch.arange(len(ids)))
        want = hf.model(torch.tensor([ids])).last_hidden_state[0]
    assert rel_err(mine, want) < MAX_REL_ERR


def test_mtp_layer_weights_are_the_checkpoints(setup):
    path, _, _, runner = setup
    raw = load_file(path / "model.safetensors")
    n = runner.model_cfg.num_hidden_layers
    mtp = runner.model.mtp
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        assert torch.equal(mtp.get_parameter(name), raw[f"model.layers.{n}.{name}"]), name
    assert torch.equal(mtp.self_attn.kv_b_proj.weight, raw[f"model.layers.{n}.self_attn.kv_b_proj.weight"])
    inter = runner.model_cfg.moe_intermediate_size
    assert torch.equal(mtp.mlp.experts.w13[1, inter:], raw[f"model.layers.{n}.mlp.experts.1.up_proj.weight"])


def test_a_checkpoint_without_the_mtp_layer_is_refused(tiny_model, tmp_path):
    no_layer = tiny_model("ci")  # num_nextn_predict_layers 0
    with pytest.raises(ValueError, match="num_nextn_predict_layers 0"):
        mtp_runner(no_layer)

    def claim_one(config):
        config["num_nextn_predict_layers"] = 1

    claims = copy_checkpoint(no_layer, tmp_path / "claims", config=claim_one)  # says 1, has none
    with pytest.raises(WeightLoadError, match=r"lacks its MTP layer .*num_nextn_predict_layers 1"):
        mtp_runner(claims)
    mtp_runner(claims, load_format="dummy")  # random weights need no tensors


def test_mtp_copies_of_embedding_and_head_must_equal_the_main_ones(tiny_model, tmp_path):
    src = tiny_model("ci", with_mtp=True)
    n = ModelConfig.from_dir(src).num_hidden_layers
    name = f"model.layers.{n}.shared_head.head.weight"

    def perturb(t):
        t[name] = t[name].clone()
        t[name][3, 5] += 1.0

    bad = copy_checkpoint(src, tmp_path / "bad", tensors=perturb)
    with pytest.raises(WeightLoadError, match=r"shared_head\.head\.weight' differs from 'lm_head\.weight'"):
        mtp_runner(bad)
    # Serving without speculative decoding ignores the MTP layer altogether.
    ModelRunner(EngineConfig(str(bad), num_pages=8), ModelConfig.from_dir(bad))


def test_an_fp8_checkpoints_mtp_layer_drafts_as_its_dequantized_copy(tiny_model):
    """Block-FP8 projections in the MTP layer too (weight-only on CPU: exactly the dequantized model's)."""
    from pd.model.quant import FP8_DTYPE
    from pd.tiny_model.checkpoint import DEQUANTIZED_DIR

    path = tiny_model("ci", with_mtp=True, fp8=True, fp8_block=(16, 16))
    fp8, plain = mtp_runner(path), mtp_runner(path / DEQUANTIZED_DIR)
    assert fp8.model.mtp.self_attn.o_proj.weight.dtype == FP8_DTYPE
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, fp8.model_cfg.hidden_size, generator=gen)
    ids = torch.randint(0, fp8.model_cfg.vocab_size, (10,), generator=gen)
    want, _ = draft(plain, BatchMode.EXTEND, [1, 2, 3, 4], hidden, ids, 0, 10)
    got, _ = draft(fp8, BatchMode.EXTEND, [1, 2, 3, 4], hidden, ids, 0, 10)
    assert torch.equal(got, want)
