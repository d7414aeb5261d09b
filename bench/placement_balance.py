"""Per-rank load of routed experts under linear and round-robin placement (computed, no GPU).

    python -m pd.bench.placement_balance [--tokens 4096] [--out FILE]

Routes random hidden states through the real noaux_tc router (``pd.model.moe.select_experts``)
with random router weights, for the DESIGN.md §8 router (64 experts, top-6, one group) and a
DeepSeek-V3-like router (256 experts, 8 groups, top-4 groups, top-8), then counts for each
placement and EP size: (token, expert) pairs each rank receives (max / mean), and how many
distinct ranks a token's experts span (what low-latency dispatch sends to). Random routers have no
popular groups, so this shows the placement's effect on spread, not on a trained model's skew.
"""

from __future__ import annotations

import argparse

import torch

from pd.config import ModelConfig, RopeConfig
from pd.ep.placement import ExpertPlacement
from pd.model.moe import select_experts

ROUTERS = {
    "§8 (64 experts, top-6, 1 group)": dict(
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1
    ),
    "DeepSeek-V3-like (256 experts, 8 groups, top-4 groups, top-8)": dict(
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4
    ),
}


def router_config(hidden: int, **kw) -> ModelConfig:
    base = dict(
        vocab_size=16, hidden_size=hidden, intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=16, tie_word_embeddings=False,
        rope=RopeConfig(),
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    lines = [
        f"{args.tokens} tokens, random hidden states and router weights (seed {args.seed}).",
        "",
        "| router | EP size | placement | max/mean (token, expert) pairs per rank | mean ranks a token spans | max |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, kw in ROUTERS.items():
        cfg = router_config(args.hidden, **kw)
        x = torch.randn(args.tokens, args.hidden, generator=g)
        w = torch.randn(cfg.n_routed_experts, args.hidden, generator=g) / args.hidden**0.5
        bias = torch.rand(cfg.n_routed_experts, generator=g) * 0.01
        _, topk_idx = select_experts(x, w, bias, cfg)  # [T, K] global ids
        for world in (2, 4, 8):
            for kind in ("linear", "round_robin"):
                pl = ExpertPlacement(kind, cfg.n_routed_experts, world)
                physical = torch.tensor(pl.global_to_physical())[topk_idx]  # [T, K]
                ranks = physical // pl.num_local  # [T, K]
                per_rank = torch.bincount(ranks.flatten(), minlength=world).float()
                span = torch.stack([(ranks == r).any(-1) for r in range(world)], -1).sum(-1).float()  # [T]
                lines.append(
                    f"| {name} | {world} | {kind} | {(per_rank.max() / per_rank.mean()).item():.3f} | "
                    f"{span.mean().item():.2f} | {int(span.max().item())} |"
                )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
