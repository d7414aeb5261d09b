"""Per-rank GPU memory of an EP-N instance, from a checkpoint's config.json alone (no weights, no device).

    python -m pd.bench.memory_plan CONFIG --ep N --gpu-gb G [--dtype bf16|fp8] [--kv-dtype bf16]
        [--gpu-memory-fraction 0.85] [--page-size 16]

CONFIG is a config.json or the model directory holding it. Each rank of an instance holds
``n_routed_experts / N`` routed experts of every MoE layer and a full copy of everything else
(attention, dense MLP layers, shared experts, router gates, norms, embeddings, lm_head; see
``pd.config.ParallelConfig``). What is left of the rank's share of the GPU
(``gpu_gb * gpu_memory_fraction``) after the weights is the KV pool: ``num_hidden_layers *
(kv_lora_rank + qk_rope_head_dim)`` values per token (``pd.kv_cache.KVLayout``), page 0 being the
dummy page. The plan counts weights only: activations, EP buffers, CUDA graphs, the rotary tables and the
CUDA context also come out of the share, so the KV figures are an upper bound.

``--dtype fp8`` counts DeepSeek's block-FP8 checkpoints as stored: float8_e4m3fn linear weights of the
attention projections, dense MLP, shared and routed experts (1 byte per element) plus one float32 scale per
``weight_block_size`` block (128 x 128 unless the config says otherwise; edge blocks partial); router
gates, norms, embeddings and lm_head stay bf16, the routing bias float32. pd itself dequantizes FP8
checkpoints to the model dtype on load (``pd.model.weights``), so today a pd rank needs the bf16 figures.

The MTP layer (``model.layers.{num_hidden_layers}``, ``num_nextn_predict_layers`` of them) is not served
and not counted; its size, with the checkpoint's own copies of the embedding and output head, is printed
on a line of its own. GB = 1e9 bytes, GiB = 2**30.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pd.config import ModelConfig

GB = 1e9
GIB = float(1 << 30)

WEIGHT_DTYPES = ("bf16", "fp8")
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
DEFAULT_FP8_BLOCK = (128, 128)

# The weight groups, in printing order; `routed_experts` is sharded over the EP ranks, the rest replicated.
GROUPS = (
    "routed_experts",
    "attention",
    "dense_mlp",
    "shared_experts",
    "router",
    "norms",
    "embeddings",
    "lm_head",
)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Tally:
    """Sums parameters and bytes per group for one weight dtype."""

    fp8_block: tuple[int, int] | None  # None: bf16 weights
    params: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    nbytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    scale_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))

    def linear(self, group: str, out: int, inp: int, count: int = 1, quantized: bool = True) -> None:
        """``count`` linear weights ``[out, inp]``; FP8 (with block scales) when ``quantized`` in fp8 mode."""
        n = out * inp
        self.params[group] += count * n
        if self.fp8_block is not None and quantized:
            bo, bi = self.fp8_block
            scales = 4 * _ceil_div(out, bo) * _ceil_div(inp, bi)
            self.nbytes[group] += count * (n + scales)
            self.scale_bytes[group] += count * scales
        else:
            self.nbytes[group] += count * 2 * n

    def vector(self, group: str, n: int, count: int = 1, itemsize: int = 2) -> None:
        self.params[group] += count * n
        self.nbytes[group] += count * itemsize * n

    def mlp(self, group: str, hidden: int, inter: int, count: int = 1) -> None:
        """A SiLU-gated MLP as checkpoints store it: gate_proj, up_proj ``[inter, hidden]``, down_proj."""
        self.linear(group, inter, hidden, 2 * count)
        self.linear(group, hidden, inter, count)

    def layer(self, cfg: ModelConfig, index: int, local_experts: int) -> None:
        """One decoder layer with ``local_experts`` routed experts (when it is a MoE layer)."""
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.linear("attention", heads * cfg.qk_head_dim, h)
        else:
            self.linear("attention", cfg.q_lora_rank, h)
            self.vector("attention", cfg.q_lora_rank)  # q_a_layernorm
            self.linear("attention", heads * cfg.qk_head_dim, cfg.q_lora_rank)
        self.linear("attention", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)  # kv_a_proj_with_mqa
        self.vector("attention", cfg.kv_lora_rank)  # kv_a_layernorm
        # kv_b_proj: pd holds it in bf16 even from an FP8 checkpoint (MLA decode absorbs it per head).
        kv_b = heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        self.linear("attention", kv_b, cfg.kv_lora_rank, quantized=False)
        self.linear("attention", h, heads * cfg.v_head_dim)  # o_proj
        self.vector("norms", h, 2)  # input_layernorm, post_attention_layernorm
        if not cfg.is_moe_layer(index):
            self.mlp("dense_mlp", h, cfg.intermediate_size)
            return
        e = cfg.n_routed_experts
        self.linear("router", e, h, quantized=False)  # mlp.gate.weight: bf16 in FP8 checkpoints too
        self.vector("router", e, itemsize=4)  # e_score_correction_bias: float32
        self.mlp("routed_experts", h, cfg.moe_intermediate_size, local_experts)
        if cfg.n_shared_experts:
            self.mlp("shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def mtp_extras(self, cfg: ModelConfig, group: str) -> None:
        """What an MTP module adds to its decoder layer, as published checkpoints store it: the
        ``eh_proj [H, 2H]`` (bf16), ``enorm``, ``hnorm``, ``shared_head.norm`` and its own copies of the
        embedding and the output head."""
        h = cfg.hidden_size
        self.linear(group, h, 2 * h, quantized=False)
        self.vector(group, h, 3)
        self.vector(group, cfg.vocab_size * h, 2)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


@dataclass(frozen=True)
class WeightGroup:
    """One group's weights on one rank: ``params`` elements (FP8 scales not counted) in ``nbytes`` bytes
    (FP8 scales included, ``scale_bytes`` of them)."""

    name: str
    params: int
    nbytes: int
    scale_bytes: int = 0

    @property
    def replicated(self) -> bool:
        return self.name != "routed_experts"


@dataclass(frozen=True)
class MemoryPlan:
    """One rank of an EP-``ep`` instance: its weights by group, and the KV pool left in its share."""

    model_type: str
    ep: int
    gpu_gb: float
    gpu_memory_fraction: float
    dtype: str  # bf16 | fp8 (weights)
    kv_dtype: str
    page_size: int
    fp8_block: tuple[int, int] | None
    num_layers: int
    moe_layers: int
    dense_layers: int
    n_routed_experts: int
    experts_per_rank: int
    groups: tuple[WeightGroup, ...]
    total_params: int  # the whole model, every expert, MTP excluded
    total_bytes: int  # the whole model in `dtype` (EP 1), MTP excluded
    mtp_layers: int  # num_nextn_predict_layers
    mtp_params: int  # all MTP modules, with their embedding and head copies
    mtp_bytes: int  # the same in `dtype`
    mtp_bytes_per_rank: int  # what one rank would hold if it served them at this EP size
    kv_bytes_per_token: int  # every layer
    page_nbytes: int  # one page of every layer
    num_pages: int  # the pool's pages, dummy page included; 0 when the weights leave no room

    def group(self, name: str) -> WeightGroup:
        return next(g for g in self.groups if g.name == name)

    @property
    def weight_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def weight_params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def replicated_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if g.replicated)

    @property
    def scale_bytes(self) -> int:
        return sum(g.scale_bytes for g in self.groups)

    @property
    def share_bytes(self) -> float:
        """This rank's share of the GPU: ``gpu_gb * gpu_memory_fraction`` (in bytes)."""
        return self.gpu_gb * GB * self.gpu_memory_fraction

    @property
    def kv_pool_bytes(self) -> int:
        return self.num_pages * self.page_nbytes

    @property
    def kv_tokens(self) -> int:
        """Tokens the pool holds: every page but the dummy page."""
        return max(self.num_pages - 1, 0) * self.page_size

    @property
    def needs_bytes(self) -> int:
        """Weights plus the smallest pool the runner accepts (2 pages: the dummy page and one more)."""
        return self.weight_bytes + 2 * self.page_nbytes

    @property
    def fits(self) -> bool:
        return self.num_pages >= 2

    def refusal(self) -> str:
        return f"does not fit: needs {self.needs_bytes / GB:.2f} GB, has {self.share_bytes / GB:.2f} GB"


def plan(
    config: dict[str, Any],
    ep: int,
    gpu_gb: float,
    *,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    gpu_memory_fraction: float = 0.85,
    page_size: int = 16,
) -> MemoryPlan:
    """The memory plan of one rank for ``config`` (a parsed config.json). Pure arithmetic."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPE_BYTES)}, got {kv_dtype!r}")
    if not 0 < gpu_memory_fraction < 1:
        raise ValueError(f"gpu_memory_fraction must be in (0, 1), got {gpu_memory_fraction}")
    if gpu_gb <= 0 or page_size < 1:
        raise ValueError(f"gpu_gb ({gpu_gb}) and page_size ({page_size}) must be positive")
    cfg = ModelConfig.from_hf(config)
    e = cfg.n_routed_experts
    if ep < 1 or (e and e % ep):
        raise ValueError(f"EP size {ep} must be >= 1 and divide n_routed_experts {e}")
    local = e // ep if e else 0
    block = None
    if dtype == "fp8":
        block = (cfg.fp8.block_out, cfg.fp8.block_in) if cfg.fp8 else DEFAULT_FP8_BLOCK

    def model_tally(experts: int) -> _Tally:
        t = _Tally(block)
        h = cfg.hidden_size
        t.vector("embeddings", cfg.vocab_size * h)
        for i in range(cfg.num_hidden_layers):
            t.layer(cfg, i, experts)
        t.vector("norms", h)  # model.norm
        if not cfg.tie_word_embeddings:
            t.vector("lm_head", cfg.vocab_size * h)
        return t

    rank, whole = model_tally(local), model_tally(e)
    mtp_layers = int(config.get("num_nextn_predict_layers") or 0)
    mtp_whole, mtp_rank = _Tally(block), _Tally(block)
    for k in range(mtp_layers):
        for t, experts in ((mtp_whole, e), (mtp_rank, local)):
            t.layer(cfg, cfg.num_hidden_layers + k, experts)
            t.mtp_extras(cfg, "embeddings")

    latent = cfg.latent_dim
    kv_token = cfg.num_hidden_layers * latent * KV_DTYPE_BYTES[kv_dtype]
    page_nbytes = page_size * kv_token
    room = gpu_gb * GB * gpu_memory_fraction - rank.total_bytes
    num_pages = int(room // page_nbytes) if room > 0 else 0
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return MemoryPlan(
        model_type=str(config.get("model_type")),
        ep=ep,
        gpu_gb=gpu_gb,
        gpu_memory_fraction=gpu_memory_fraction,
        dtype=dtype,
        kv_dtype=kv_dtype,
        page_size=page_size,
        fp8_block=block,
        num_layers=cfg.num_hidden_layers,
        moe_layers=moe_layers,
        dense_layers=cfg.num_hidden_layers - moe_layers,
        n_routed_experts=e,
        experts_per_rank=local,
        groups=tuple(WeightGroup(g, rank.params[g], rank.nbytes[g], rank.scale_bytes[g]) for g in GROUPS),
        total_params=whole.total_params,
        total_bytes=whole.total_bytes,
        mtp_layers=mtp_layers,
        mtp_params=mtp_whole.total_params,
        mtp_bytes=mtp_whole.total_bytes,
        mtp_bytes_per_rank=mtp_rank.total_bytes,
        kv_bytes_per_token=kv_token,
        page_nbytes=page_nbytes,
        num_pages=num_pages,
    )


def _params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def format_plan(p: MemoryPlan, name: str = "") -> str:
    """The plan as a readable table (GB = 1e9 bytes, GiB = 2**30)."""
    weights = (
        p.dtype
        if p.fp8_block is None
        else f"fp8 e4m3, fp32 scales per {p.fp8_block[0]}x{p.fp8_block[1]} block"
    )
    head = [
        f"{name or p.model_type}: {p.num_layers} layers ({p.dense_layers} dense, {p.moe_layers} MoE), "
        f"{p.n_routed_experts} routed experts; whole model {_params(p.total_params)} parameters "
        f"({p.total_bytes / GB:.1f} GB in {p.dtype}), MTP excluded",
        f"one rank of EP {p.ep}: {p.experts_per_rank} routed experts per MoE layer; weights {weights}; "
        f"KV {p.kv_dtype}, page {p.page_size} tokens",
        f"share: {p.gpu_gb:g} GB x {p.gpu_memory_fraction:g} = {p.share_bytes / GB:.2f} GB "
        f"({p.share_bytes / GIB:.2f} GiB)",
        "",
    ]
    labels = {
        "routed_experts": f"routed experts ({p.experts_per_rank} x {p.moe_layers} layers)",
        "attention": f"attention (MLA, {p.num_layers} layers)",
        "dense_mlp": f"dense MLP ({p.dense_layers} layer{'' if p.dense_layers == 1 else 's'})",
        "shared_experts": "shared experts",
        "router": "router gates + bias (fp32)",
        "norms": "norms",
        "embeddings": "embeddings",
        "lm_head": "lm_head" + (" (tied: in embeddings)" if not p.group("lm_head").params else ""),
    }
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, params: str, nbytes: float) -> None:
        rows.append((label, params, f"{nbytes / GB:.2f}", f"{nbytes / GIB:.2f}"))

    for g in p.groups:
        row(labels[g.name], _params(g.params), g.nbytes)
    rows.append(("", "", "", ""))
    row("replicated (all but routed experts)", _params(p.weight_params - p.group("routed_experts").params),
        p.replicated_bytes)  # fmt: skip
    if p.fp8_block is not None:
        row("of the weights: fp8 scales", "", p.scale_bytes)
    row("weights on this rank", _params(p.weight_params), p.weight_bytes)
    pool = (
        f"KV pool: {p.num_pages:,} pages = {p.kv_tokens:,} tokens"
        if p.fits
        else "KV pool: no room (needs 2 pages)"
    )
    row(pool, "", p.kv_pool_bytes)
    row("share", "", p.share_bytes)
    widths = [max(len(r[i]) for r in [*rows, ("", "params", "GB", "GiB")]) for i in range(4)]
    lines = [
        f"{'':<{widths[0]}}  {'params':>{widths[1]}}  {'GB':>{widths[2]}}  {'GiB':>{widths[3]}}",
        *(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"
            if r[0]
            else ""
            for r in rows
        ),
    ]
    tail = [
        "",
        f"KV per token: {p.kv_bytes_per_token / 1e3:.1f} KB ({p.num_layers} layers x latent "
        f"{p.kv_bytes_per_token // p.num_layers // KV_DTYPE_BYTES[p.kv_dtype]} x {KV_DTYPE_BYTES[p.kv_dtype]} B)",
    ]
    if p.mtp_layers:
        tail.append(
            f"MTP ({p.mtp_layers} layer{'s' if p.mtp_layers > 1 else ''} from layer {p.num_layers}; skipped, "
            f"not counted above): {_params(p.mtp_params)} parameters, {p.mtp_bytes / GB:.2f} GB in {p.dtype} "
            f"with its embedding and head copies; {p.mtp_bytes_per_rank / GB:.2f} GB per rank at EP {p.ep}"
        )
    else:
        tail.append("MTP: none in this config (num_nextn_predict_layers 0)")
    tail.append(
        "Not counted: activations, EP buffers, CUDA graphs, rotary tables, the CUDA context (the KV figures "
        "are an upper bound)."
    )
    if p.dtype == "fp8":
        tail.append(
            "pd dequantizes FP8 checkpoints on load (pd.model.weights): a pd rank today needs --dtype bf16."
        )
    return "\n".join(head + lines + tail)


def read_config(path: str | Path) -> dict[str, Any]:
    """A config.json, given as the file or the directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    with open(p) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="config.json, or the model directory holding it")
    ap.add_argument("--ep", type=int, required=True, help="EP size N: ranks of one instance")
    ap.add_argument(
        "--gpu-gb",
        type=float,
        required=True,
        help="GPU memory in GB (1e9 bytes); an H200 has 143,771 MiB = 150.8 GB (sold as 141 GB)",
    )
    ap.add_argument(
        "--dtype", choices=WEIGHT_DTYPES, default="bf16", help="weights: bf16, or DeepSeek block-FP8"
    )
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPE_BYTES), default="bf16")
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.85, help="this rank's share of the GPU")
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        result = plan(
            read_config(args.config),
            args.ep,
            args.gpu_gb,
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            gpu_memory_fraction=args.gpu_memory_fraction,
            page_size=args.page_size,
        )
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(result, str(args.config)))
    if not result.fits:
        print(result.refusal(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
