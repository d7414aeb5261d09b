"""A rank's memory plan: weights by kind measured on the meta model, and the refusal of a model that does
not fit its share, before anything is allocated. Oracle: the materialised model's own tensors."""

from __future__ import annotations

import pytest
import torch

from pd.config import ModelConfig
from pd.engine.memory import WeightBytes, check_fits
from pd.engine.runner import materialize, meta_model
from pd.ep import EPConfig, make_ep_backend


def _meta(model_dir, ep_size: int = 1, rank: int = 0):
    cfg = ModelConfig.from_dir(model_dir)

    class _Shapes:  # an EP backend's config alone: the model only reads its sizes
        config = EPConfig(
            cfg.n_routed_experts, cfg.hidden_size, 8, torch.float32, rank, ep_size, torch.device("cpu")
        )

    ep = make_ep_backend("local", _Shapes.config) if ep_size == 1 else _Shapes()
    return meta_model(cfg, ep, 64, torch.float32)


@pytest.mark.parametrize("preset", ["ci", "tied"])
def test_weight_bytes_on_the_meta_model_equal_the_materialised_tensors(tiny_model, preset):
    model = _meta(tiny_model(preset))
    planned = WeightBytes.of(model)
    real = materialize(model, torch.device("cpu"))
    tensors = {id(t): t for t in [*real.parameters(), *real.buffers()]}  # a tied head counts once
    assert planned.total == sum(t.numel() * t.element_size() for t in tensors.values())
    named = [*real.named_parameters(), *real.named_buffers()]
    experts = sum(t.numel() * t.element_size() for n, t in named if ".experts." in n or "expert_tokens" in n)
    assert planned.routed == experts > 0
    emb = real.model.embed_tokens.weight
    per_table = emb.numel() * emb.element_size()
    assert planned.embeddings == per_table * (1 if preset == "tied" else 2)


def test_more_ep_ranks_hold_fewer_routed_bytes_and_the_same_replicated(tiny_model):
    one, two = WeightBytes.of(_meta(tiny_model("ci"))), WeightBytes.of(_meta(tiny_model("ci"), ep_size=2))
    assert two.routed * 2 == one.routed and two.replicated == one.replicated
    assert two.embeddings == one.embeddings


def test_a_model_that_does_not_fit_is_refused_with_the_bytes_named():
    weights = WeightBytes(routed=163_480_000_000, replicated=30_530_000_000, embeddings=3_710_000_000)
    check_fits(weights, share=200e9, total=150_000_000_000, fraction=0.85, device=torch.device("cuda", 0))
    with pytest.raises(MemoryError) as e:
        check_fits(
            weights, share=119.85e9, total=141_000_000_000, fraction=0.85, device=torch.device("cuda", 0)
        )
    message = str(e.value)
    assert (
        "weights 197.72 GB" in message
        and "routed experts 163.48" in message
        and "share is 119.85 GB" in message
    )
