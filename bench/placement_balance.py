"""Per-rank load of routed experts under linear and round-robin placement (computed, no GPU).

    python -m pd.bench.placement_balance [--tokens 4096] [--out FILE]

Routes random hidden states through the real noaux_tc router (``pd.model.moe.select_experts``)
with random router weights, for the DESIGN.md §8 router (64 experts, top-6, one group) and a
DeepSeek-V3-like router (256 experts, 8 groups, top-4 groups, top-8), then counts for each
placement and EP size: (token, expert) pairs each rank receives (max / mean), and how many
distinct ranks a token's experts span (what low-latency dispatch sends to). Random routers have no
popular groups, so this shows the placement's effect on spread, not on a trained model's skew.
The same routers drive the GPU half (``python -m pd.bench.ep_latency --routing grouped``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from pd.config import ModelConfig, RopeConfig
from pd.ep.placement import ExpertPlacement
from pd.model.moe import select_experts


@dataclass(frozen=True)
class RouterShape:
    """A noaux_tc router to benchmark placements with; weights are random (see ``random_router``)."""

    name: str
    hidden: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int

    def config(self) -> ModelConfig:
        """A minimal ModelConfig carrying this router (``select_experts`` reads only the MoE fields)."""
        return ModelConfig(
            vocab_size=16, hidden_size=self.hidden, intermediate_size=16, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=16, tie_word_embeddings=False,
            rope=RopeConfig(), n_routed_experts=self.experts, num_experts_per_tok=self.top_k,
            n_group=self.n_group, topk_group=self.topk_group,
        )  # fmt: skip


ROUTERS = (
    RouterShape("§8 (64 experts, top-6, 1 group)", 2048, 64, 6, 1, 1),
    RouterShape("DeepSeek-V3-like (256 experts, 8 groups, top-4 groups, top-8)", 7168, 256, 8, 8, 4),
)
SMOKE_ROUTER = RouterShape("smoke (16 experts, 4 groups, top-2 groups, top-4)", 128, 16, 4, 4, 2)


def random_router(shape: RouterShape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weight ``[E, H]`` float32 (scaled so logits are O(1)) and correction bias ``[E]``;
    the same on every rank for the same generator state."""
    weight = torch.randn(shape.experts, shape.hidden, generator=generator) / shape.hidden**0.5
    bias = torch.rand(shape.experts, generator=generator) * 0.01
    return weight, bias


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
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
    for shape in ROUTERS:
        cfg = shape.config()
        x = torch.randn(args.tokens, shape.hidden, generator=g)
        weight, bias = random_router(shape, g)
        _, topk_idx = select_experts(x, weight, bias, cfg)  # [T, K] global ids
        for world in (2, 4, 8):
            for kind in ("linear", "round_robin"):
                pl = ExpertPlacement(kind, shape.experts, world)
                physical = torch.tensor(pl.global_to_physical())[topk_idx]  # [T, K]
                ranks = physical // pl.num_local  # [T, K]
                per_rank = torch.bincount(ranks.flatten(), minlength=world).float()
                span = torch.stack([(ranks == r).any(-1) for r in range(world)], -1).sum(-1).float()  # [T]
                lines.append(
                    f"| {shape.name} | {world} | {kind} | {(per_rank.max() / per_rank.mean()).item():.3f} | "
                    f"{span.mean().item():.2f} | {int(span.max().item())} |"
                )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
