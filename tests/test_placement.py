"""Expert placement: the maps, where weights land, and routing translation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pd.config import ModelConfig
from pd.engine.runner import build_model
from pd.ep import EPConfig
from pd.ep.placement import ExpertPlacement, PlacementMap
from pd.model.weights import load_weights


@pytest.mark.parametrize("kind", ["linear", "round_robin"])
@pytest.mark.parametrize("experts,world", [(8, 2), (64, 4), (256, 8), (6, 1)])
def test_maps_are_inverse_permutations(kind, experts, world):
    p = ExpertPlacement(kind, experts, world)
    g2p, p2g = p.global_to_physical(), p.physical_to_global()
    assert sorted(g2p) == list(range(experts))
    assert all(p2g[g2p[e]] == e for e in range(experts))
    slots = [e for r in range(world) for e in p.local_experts(r)]
    assert slots == p2g  # physical order = rank by rank, slot by slot
    for r in range(world):
        assert all(g2p[e] // p.num_local == r for e in p.local_experts(r))


def test_round_robin_spreads_neighbouring_experts():
    p = ExpertPlacement("round_robin", 64, 4)
    assert [p.physical(e) // 16 for e in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    linear = ExpertPlacement("linear", 64, 4)
    assert [linear.physical(e) // 16 for e in range(8)] == [0] * 8


def test_translation_keeps_minus_one_and_is_a_gather():
    m = PlacementMap(ExpertPlacement("round_robin", 8, 2), "cpu")
    idx = torch.tensor([[0, 1, -1], [7, 2, 5]])
    assert m.to_physical(idx).tolist() == [[0, 4, -1], [7, 1, 6]]
    with pytest.raises(ValueError, match="split evenly"):
        ExpertPlacement("round_robin", 10, 4)
    with pytest.raises(ValueError, match="placement"):
        ExpertPlacement("striped", 8, 2)


class _RankStub:
    """Just the EP config the model needs to size its expert slots (no communication: loading only)."""

    def __init__(self, config: EPConfig) -> None:
        self.config = config


@pytest.mark.parametrize("kind", ["linear", "round_robin"])
def test_weights_land_in_the_physical_slots(kind, tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir)
    raw = load_file(tiny_model_dir / "model.safetensors")
    placement = ExpertPlacement(kind, cfg.n_routed_experts, 2)
    for rank in range(2):
        ep = _RankStub(EPConfig(cfg.n_routed_experts, cfg.hidden_size, 8, torch.float32, rank, 2))
        pmap = PlacementMap(placement, "cpu")
        model = build_model(cfg, ep, 64, torch.device("cpu"), torch.float32, pmap)
        load_weights(model, tiny_model_dir, ep_rank=rank, ep_size=2)
        layer = cfg.first_k_dense_replace
        experts = model.model.layers[layer].mlp.experts
        for slot, e in enumerate(placement.local_experts(rank)):
            pre = f"model.layers.{layer}.mlp.experts.{e}"
            assert torch.equal(experts.w2[slot], raw[f"{pre}.down_proj.weight"]), (rank, slot, e)
            assert torch.equal(experts.w13[slot, : cfg.moe_intermediate_size], raw[f"{pre}.gate_proj.weight"])


@pytest.mark.parametrize("kind", ["linear", "round_robin"])
def test_dummy_weights_are_the_same_experts_at_every_ep_size(kind, tiny_model_dir):
    """`--load-format dummy` must draw the same model whatever the EP size and placement, or a 2-rank
    deployment could not be compared with a 1-rank one."""
    from pd.model.weights import init_dummy_weights

    cfg = ModelConfig.from_dir(tiny_model_dir)

    def model(rank: int, world: int):
        ep = _RankStub(EPConfig(cfg.n_routed_experts, cfg.hidden_size, 8, torch.float32, rank, world))
        m = build_model(
            cfg,
            ep,
            64,
            torch.device("cpu"),
            torch.float32,
            PlacementMap(ExpertPlacement(kind, cfg.n_routed_experts, world), "cpu"),
        )
        init_dummy_weights(m, seed=3)
        return m

    whole = dict(model(0, 1).named_parameters())
    layer = cfg.first_k_dense_replace
    placement = ExpertPlacement(kind, cfg.n_routed_experts, 2)
    for rank in range(2):
        part = dict(model(rank, 2).named_parameters())
        for name, p in part.items():
            if ".mlp.experts." in name:  # [E_local, ...] against the global experts this rank holds
                assert torch.equal(p, whole[name][placement.local_experts(rank)]), (rank, name)
            else:
                assert torch.equal(p, whole[name]), (rank, name)
        assert f"model.layers.{layer}.mlp.experts.w13" in part
