"""Block configs of the MoE kernels: tuned tables per device (``configs/moe_<device>.json``, written
by ``python -m pd.bench.tune_moe``) with a shape-based default where a table has no entry.

Table format::

    {"device": "NVIDIA H200",
     "fused":  {"E=64,H=2048,I=1408,K=6": {"1": CONFIG, "2": CONFIG, ...}},   # key: token count T
     "masked": {"E=32,H=2048,I=1408":     {"1": CONFIG, ...}}}                 # key: rows per expert
    CONFIG = {"block_m": 16, "gate_up": GEMM, "down": GEMM}
    GEMM   = {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4, "tma": false}

A lookup takes the smallest tuned key at or above the request (the largest key past the end).

The block-FP8 kernels (kernels/fp8_triton.py) read ``configs/moe_fp8_<device>.json`` in the same format
(``fused_fp8_config`` / ``masked_fp8_config``; default ``fp8_default_config``); their ``block_k`` is
always 128 (one activation scale group per step).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM: BLOCK_N output columns (per half for gate/up), BLOCK_K reduction;
    ``tma``: weight tiles through the tensor-memory accelerator (Hopper) instead of per-thread loads."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False


@dataclass(frozen=True)
class MoeConfig:
    """``block_m`` rows per tile (the padding unit of each expert's rows), shared by both GEMMs."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> MoeConfig:
        return MoeConfig(d["block_m"], GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]))


def fused_key(num_experts: int, hidden: int, inter: int, top_k: int) -> str:
    return f"E={num_experts},H={hidden},I={inter},K={top_k}"


def masked_key(num_experts: int, hidden: int, inter: int) -> str:
    return f"E={num_experts},H={hidden},I={inter}"


def config_file(device_name: str, kind: str = "moe") -> Path:
    """``NVIDIA H100 80GB HBM3`` -> ``configs/moe_NVIDIA_H100_80GB_HBM3.json`` (``kind`` "moe_fp8":
    ``configs/moe_fp8_NVIDIA_H100_80GB_HBM3.json``)."""
    return CONFIG_DIR / f"{kind}_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


@functools.cache
def load_table(device_name: str, kind: str = "moe") -> dict[str, Any]:
    path = config_file(device_name, kind)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def default_config(rows_per_expert: float, itemsize: int) -> MoeConfig:
    """Shape-based config: small row tiles streaming wide weight tiles while the experts see few rows
    each (decode: memory-bound), large square-ish tiles once they see many (prefill: compute-bound)."""
    if itemsize > 2:  # float32 (tests): half the bytes per stage of the bf16 configs
        return MoeConfig(
            16 if rows_per_expert <= 16 else 64, GemmConfig(64, 32, 4, 2), GemmConfig(64, 32, 4, 2)
        )
    if rows_per_expert <= 16:
        return MoeConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4))
    if rows_per_expert <= 64:
        return MoeConfig(64, GemmConfig(64, 64, 4, 4), GemmConfig(128, 64, 4, 4))
    return MoeConfig(128, GemmConfig(64, 64, 8, 4), GemmConfig(128, 64, 8, 4))


def _lookup(entries: dict[str, Any], n: int) -> MoeConfig | None:
    if not entries:
        return None
    keys = sorted(int(k) for k in entries)
    at_or_above = [k for k in keys if k >= n]
    return MoeConfig.from_json(entries[str(at_or_above[0] if at_or_above else keys[-1])])


@functools.lru_cache(maxsize=4096)
def fused_config(
    device_name: str, num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int, itemsize: int
) -> MoeConfig:
    """Config for the sorted layout with ``num_tokens`` tokens (T, not pairs)."""
    tuned = (
        _lookup(
            load_table(device_name).get("fused", {}).get(fused_key(num_experts, hidden, inter, top_k)),
            num_tokens,
        )
        if itemsize == 2
        else None
    )
    return tuned or default_config(num_tokens * top_k / num_experts, itemsize)


@functools.lru_cache(maxsize=4096)
def masked_config(
    device_name: str, num_experts: int, hidden: int, inter: int, rows_per_expert: int, itemsize: int
) -> MoeConfig:
    """Config for the masked layout where experts see about ``rows_per_expert`` rows each."""
    tuned = (
        _lookup(
            load_table(device_name).get("masked", {}).get(masked_key(num_experts, hidden, inter)),
            rows_per_expert,
        )
        if itemsize == 2
        else None
    )
    return tuned or default_config(rows_per_expert, itemsize)


# ---------------------------------------------------------------------------------------------
# Block-FP8 grouped GEMMs (kernels/fp8_triton.py)
# ---------------------------------------------------------------------------------------------


def fp8_default_config(rows_per_expert: float) -> MoeConfig:
    """Untuned SM90 defaults of the block-FP8 kernels, picked from offline sm_90 compiles (no spills).
    ``block_k`` is 128 (one scale group per step) and the gate/up ``block_n`` 128, which lets its
    epilogue re-quantize h per 1x128 group in place. Up to 32 rows per expert: 16/32-row tiles that
    run transposed on wgmma (weights on the MMA's M side, see ``fp8_triton.swaps_ab``) streaming
    128x128 weight tiles; more: 64-row tiles. Gate/up runs on two warpgroups from 32 rows on: it holds
    four float32 tiles (per GEMM the running sum and the current group's product) and spills on one."""
    if rows_per_expert <= 16:
        return MoeConfig(16, GemmConfig(128, 128, 4, 4), GemmConfig(128, 128, 4, 4))
    if rows_per_expert <= 32:
        return MoeConfig(32, GemmConfig(128, 128, 8, 3), GemmConfig(128, 128, 4, 4))
    return MoeConfig(64, GemmConfig(128, 128, 8, 3), GemmConfig(128, 128, 4, 4))


@functools.lru_cache(maxsize=4096)
def fused_fp8_config(
    device_name: str, num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int
) -> MoeConfig:
    """Block-FP8 config for the sorted layout with ``num_tokens`` tokens."""
    entries = (
        load_table(device_name, "moe_fp8").get("fused", {}).get(fused_key(num_experts, hidden, inter, top_k))
    )
    return _lookup(entries, num_tokens) or fp8_default_config(num_tokens * top_k / num_experts)


@functools.lru_cache(maxsize=4096)
def masked_fp8_config(
    device_name: str, num_experts: int, hidden: int, inter: int, rows_per_expert: int
) -> MoeConfig:
    """Block-FP8 config for the masked layout where experts see about ``rows_per_expert`` rows each."""
    entries = load_table(device_name, "moe_fp8").get("masked", {}).get(masked_key(num_experts, hidden, inter))
    return _lookup(entries, rows_per_expert) or fp8_default_config(rows_per_expert)
