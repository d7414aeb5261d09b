"""Process groups of a multi-rank instance, and the per-step agreement that keeps ranks in lockstep.

EP collectives need every rank of the instance: a rank with no work still joins the MoE
collectives of any step another rank runs (``ModelRunner.run_idle``). Before each step the ranks
agree, with one small all-reduce on a gloo group, on whether anyone has work, whether anyone is
stopping and whether anyone stays (a draining rank stays while it holds a room; the instance stops
once none does), so they all step, or all wait, or all stop, together.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from pd.config import ParallelConfig

log = logging.getLogger(__name__)


def init_process_groups(par: ParallelConfig, device: str) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Joins the instance's ranks. Returns (EP group: NCCL on CUDA, gloo on CPU; control group: gloo)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=par.collective_timeout_s)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{par.dist_init_addr}",
        rank=par.rank,
        world_size=par.size,
        timeout=timeout,
    )
    world = dist.group.WORLD
    assert world is not None  # set by init_process_group
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else world
    log.info("rank %d/%d joined (%s, device %s)", par.rank, par.size, backend, device)
    return world, control


class Lockstep:
    """``agree(has_work, stopping, staying) -> (anyone_has_work, anyone_stopping, anyone_staying)``: one
    all-reduce (MAX) per call. A rank stays unless it was asked to finish and holds nothing."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._flags = torch.zeros(3, dtype=torch.int32)

    def agree(self, has_work: bool, stopping: bool, staying: bool) -> tuple[bool, bool, bool]:
        self._flags[0], self._flags[1], self._flags[2] = int(has_work), int(stopping), int(staying)
        dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(self._flags[0]), bool(self._flags[1]), bool(self._flags[2])


def destroy_process_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
