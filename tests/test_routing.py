"""noaux_tc routing: ``pd.model.moe.route_ref`` against a per-token loop written from the definition (CPU),
the fused kernel's limits (``pd.kernels.routing``), and the fused kernel against ``route_ref`` on CUDA
(``-m gpu``): the same experts per row and their weights to float32 rounding."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch

from pd.config import ModelConfig
from pd.kernels import routing
from pd.model.moe import route_ref
from pd.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def shape_cfg() -> ModelConfig:
    """The DESIGN.md §8 router: 64 experts, one group, top-6, normalised."""
    path = make_tiny_model(Path(tempfile.mkdtemp()) / "shape", "moonlight-shape", config_only=True)
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def v3_router(cfg: ModelConfig) -> ModelConfig:
    """DeepSeek-V3's router: 256 experts in 8 groups, 4 groups kept, top-8."""
    return dataclasses.replace(cfg, n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8)


def route_loop(logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> list[dict[int, float]]:
    """Each row's chosen experts and weights, one token at a time from the definition."""
    rows = []
    per_group = cfg.n_routed_experts // cfg.n_group
    for row in logits.double():
        scores = [1 / (1 + torch.exp(-v).item()) for v in row]
        choice = [s + b for s, b in zip(scores, bias.double().tolist())]
        group_score = [
            sum(sorted(choice[g * per_group : (g + 1) * per_group], reverse=True)[:2])
            for g in range(cfg.n_group)
        ]
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        candidates = [e for e in range(cfg.n_routed_experts) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -choice[e])[: cfg.num_experts_per_tok]
        total = sum(scores[e] for e in chosen) if cfg.norm_topk_prob else 1.0
        rows.append({e: scores[e] / total * cfg.routed_scaling_factor for e in chosen})
    return rows


def as_rows(weights: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    return [dict(zip(i, w)) for i, w in zip(ids.tolist(), weights.tolist())]


def assert_same_routing(got: list[dict[int, float]], want: list[dict[int, float]]) -> None:
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"row {t}: experts {sorted(g)} != {sorted(w)}"
        for e in w:
            assert g[e] == pytest.approx(w[e], rel=1e-5, abs=1e-6), f"row {t}, expert {e}"


@pytest.mark.parametrize("router", ["shape", "v3", "v3-unnormalised"])
def test_route_ref_matches_the_definition(shape_cfg, router):
    cfg = shape_cfg if router == "shape" else v3_router(shape_cfg)
    if router == "v3-unnormalised":
        cfg = dataclasses.replace(cfg, norm_topk_prob=False)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, cfg.n_routed_experts, generator=g)
    bias = torch.randn(cfg.n_routed_experts, generator=g) * 0.1
    weights, ids = route_ref(logits, bias, cfg)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert_same_routing(as_rows(weights, ids), route_loop(logits, bias, cfg))


def test_fused_routing_limits(shape_cfg, monkeypatch):
    cuda = torch.device("cuda")
    assert routing.fused_routing_unusable(64, 1, 1, 6, True, torch.device("cpu")) == "not a CUDA device"
    monkeypatch.setattr(routing, "_flashinfer_routing", lambda: object())
    monkeypatch.setattr(routing, "_kernel_unbuildable", lambda: None)
    assert routing.fused_routing_unusable(64, 1, 1, 6, True, cuda) is None
    assert routing.fused_routing_unusable(256, 8, 4, 8, True, cuda) is None
    assert "norm_topk_prob" in routing.fused_routing_unusable(64, 1, 1, 6, False, cuda)
    assert "top-9" in routing.fused_routing_unusable(64, 1, 1, 9, True, cuda)
    assert "64 experts per group" in routing.fused_routing_unusable(512, 8, 2, 8, True, cuda)
    assert "no split" in routing.fused_routing_unusable(384, 1, 1, 8, True, cuda)  # Kimi-K2's router
    # Every group kept: the fewest groups, all kept, with n_group * topk_group >= topk and <= 32 per group.
    assert routing.groups(64, 1, 1, 6) == (4, 4)
    assert routing.groups(128, 8, 8, 8) == (4, 4)
    assert routing.groups(256, 8, 8, 8) is None  # 256 experts kept: over the kernel's 128
    assert routing.groups(256, 8, 4, 8) == (8, 4)
    assert routing.groups(64, 1, 1, 1) == (2, 2)
    assert routing.groups(7, 1, 1, 1) == (1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("router", ["shape", "v3", "v3-all-groups"])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_fused_routing_matches_route_ref_on_cuda(shape_cfg, router, tokens):
    cfg = shape_cfg if router == "shape" else v3_router(shape_cfg)
    if router == "v3-all-groups":
        cfg = dataclasses.replace(cfg, n_routed_experts=128, topk_group=8)
    why = routing.fused_routing_unusable(
        cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, True, torch.device("cuda")
    )
    if why is not None:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(tokens)
    logits = torch.randn(tokens, cfg.n_routed_experts, generator=g, device="cuda")
    bias = torch.randn(cfg.n_routed_experts, generator=g, device="cuda") * 0.1
    weights, ids = routing.fused_routing(
        logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.routed_scaling_factor
    )
    ref_weights, ref_ids = route_ref(logits, bias, cfg)
    assert ids.dtype == torch.int64
    assert_same_routing(as_rows(weights, ids), as_rows(ref_weights, ref_ids))
