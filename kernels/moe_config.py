"""Block configs of the MoE kernels: tuned tables per device (``configs/moe_<device>.json``, written
by ``python -m pd.bench.tune_moe``) with a shape-based default where a table has no entry.

Table format::

    {"device": "NVIDIA H200",
     "fused":  {"E=64,H=2048,I=1408,K=6": {"1": CONFIG, "2": CONFIG, ...}},   # key: token count T
     "masked": {"E=32,H=2048,I=1408":     {"1": CONFIG, ...}}}                 # key: rows per expert
    CONFIG = {"block_m": 16, "gate_up": GEMM, "down": GEMM}
    GEMM   = {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4, "tma": false}

A lookup takes the smallest tuned key at or above the request (the largest key past the end).
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


def config_file(device_name: str) -> Path:
    """``NVIDIA H100 80GB HBM3`` -> ``configs/moe_NVIDIA_H100_80GB_HBM3.json``."""
    return CONFIG_DIR / f"moe_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


@functools.cache
def load_table(device_name: str) -> dict[str, Any]:
    path = config_file(device_name)
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
