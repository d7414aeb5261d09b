"""Expert-parallel dispatch/combine behind one interface (``EPBackend``; see ``pd.ep.base``).

Backends: ``local`` (EP = 1), ``torch`` (built in: NCCL / gloo), ``mooncake`` (Mooncake EP,
low-latency on GPUs), ``deepep`` (DeepEP, where installed). ``make_ep_backend`` builds one by
name; ``default_ep_backend`` picks one for a role and device.
"""

from __future__ import annotations

import torch.distributed as dist

from pd.ep.base import EPBackend, EPConfig, LLDispatch, NormalDispatch
from pd.ep.deepep import DeepEP, deepep_available
from pd.ep.fp8 import dequant_rows, ll_bytes_per_row, quant_rows
from pd.ep.local import LocalEP
from pd.ep.mooncake_ep import MooncakeEP, make_mooncake_buffer, mooncake_ep_available
from pd.ep.torch_ep import TorchEP

__all__ = [
    "BACKENDS",
    "ROLES",
    "EPBackend",
    "EPConfig",
    "LLDispatch",
    "NormalDispatch",
    "default_ep_backend",
    "dequant_rows",
    "ll_bytes_per_row",
    "make_ep_backend",
    "make_mooncake_buffer",
    "quant_rows",
]

BACKENDS: dict[str, type[EPBackend]] = {cls.name: cls for cls in (LocalEP, TorchEP, MooncakeEP, DeepEP)}
ROLES = ("prefill", "decode")


def make_ep_backend(
    name: str, config: EPConfig, group: dist.ProcessGroup | None = None, **options: object
) -> EPBackend:
    """Build the backend called ``name`` (a key of ``BACKENDS``). Collective for W > 1.

    ``options`` go to the backend's constructor (``mooncake``: ``buffer``, ``timeout_us``).
    Raises ValueError for an unknown name and RuntimeError when the backend's library is missing.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown EP backend {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name](config, group, **options)


def default_ep_backend(role: str, device_type: str, world_size: int) -> str:
    """The backend a role uses by default on a device type (``"cuda"`` or ``"cpu"``).

    - world_size 1: ``local`` (nothing to communicate).
    - CPU: ``torch`` (gloo).
    - GPU prefill (normal mode): ``deepep`` if it imports, else ``torch``.
    - GPU decode (low-latency mode): ``deepep`` if it imports, else ``mooncake`` if Mooncake EP
      imports, else ``torch``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1:
        return "local"
    if device_type != "cuda":
        return "torch"
    if deepep_available():
        return "deepep"
    if role == "decode" and mooncake_ep_available():
        return "mooncake"
    return "torch"
