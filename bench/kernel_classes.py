"""Where a decode step's GPU time goes, by kernel class (issue 17 item 5): the kernels of a profiled step
grouped by what they do, and the gap (wall time minus the sum of kernel time: launch overhead, host work,
idle GPU).

``classify(name)`` maps a CUDA kernel's name to one class by the first pattern it contains (lower case);
``breakdown(kernels, wall_us)`` sums the kernels' microseconds per class and adds the gap.
"""

from __future__ import annotations

from collections.abc import Iterable

# First match wins: specific names before generic ones.
CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # pd's routed-expert kernels (kernels/moe_triton.py, fp8_triton.py) by their names, then others' by theirs.
    ("routed experts", ("gate_up_", "_down_", "_align_", "sum_topk", "silu_and_mul", "moe", "expert")),
    ("routing", ("noaux", "topk", "top_k", "sort", "router", "gate", "group_limited")),
    ("attention", ("mla", "attention", "batchdecode", "batchprefill", "fmha")),
    ("ep dispatch/combine", ("dispatch", "combine", "nccl", "all_to_all", "alltoall")),
    ("norm", ("rmsnorm", "rms_norm", "layer_norm", "norm")),
    ("rope", ("rope", "rotary")),
    ("sampling", ("sampl", "softmax", "argmax", "gumbel", "multinomial")),
    ("quantization", ("quant", "fp8", "scale")),
    ("gemm", ("gemm", "gemv", "matmul", "cutlass", "sm90", "nvjet", "ampere", "xmma")),
    ("elementwise/copies", ("elementwise", "copy", "memcpy", "memset", "cat", "index", "fill", "reduce")),
)
OTHER = "other"


def classify(name: str) -> str:
    """The class of the kernel called ``name``."""
    lower = name.lower()
    for cls, patterns in CLASSES:
        if any(p in lower for p in patterns):
            return cls
    return OTHER


def breakdown(kernels: Iterable[tuple[str, float]], wall_us: float) -> dict[str, float]:
    """Microseconds per class of ``(kernel name, device microseconds)`` pairs of one step, plus ``"gap"``:
    ``wall_us`` minus their sum (never negative: overlapping kernels can sum past the wall)."""
    out: dict[str, float] = {}
    for name, us in kernels:
        cls = classify(name)
        out[cls] = out.get(cls, 0.0) + us
    out["gap"] = max(0.0, wall_us - sum(out.values()))
    return out


def format_breakdown(rows: dict[str, float], wall_us: float) -> str:
    """A markdown table of ``breakdown``'s result, largest first, with each class's share of the wall time."""
    lines = ["| class | us | share of wall |", "|---|---:|---:|"]
    for cls, us in sorted(rows.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cls} | {us:.1f} | {us / wall_us:.1%} |")
    return "\n".join(lines)
