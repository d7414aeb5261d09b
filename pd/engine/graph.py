"""Capturing and replaying CUDA graphs of whole steps (``StepGraphs``), shared by the decode, extend and
verify graphs (``pd.engine.decode_graph``, ``extend_graph``, ``verify_graph``).

Lifetime: destroy (``close``) before the process group: a process that captured NCCL work hung at
exit in destroy_process_group otherwise (gpu/NOTES.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

from pd.attention.base import AttentionBackend

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]


def capture_graph(
    step: Callable[[], Outputs], pool: torch.cuda._POOL_HANDLE | None = None
) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """Captures ``step`` into a CUDA graph allocating from ``pool`` (None: a pool of its own), after two runs on
    a side stream (the allocator and lazily built kernels warm up outside the graph). Returns the graph and
    ``step``'s outputs, the tensors each replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class StepGraphs:
    """Steps on static buffers by key, each captured into a CUDA graph (all in one memory pool, in the order
    recorded); ``capture=False`` runs them as they are on the same buffers (CPU, tests). A step reads only
    buffers its owner fills before ``replay`` (inputs, an attention state planned by ``prepare_graph``) and
    returns its outputs, which every replay rewrites in place. ``attn`` must support graphs to capture.
    Lifetime: ``close`` before the process group is destroyed (a captured NCCL graph hung at exit)."""

    def __init__(self, attn: AttentionBackend, capture: bool = True) -> None:
        if capture and not attn.supports_graphs:
            raise ValueError(
                f"CUDA graphs need an attention backend with graph support, not {type(attn).__name__}"
            )
        self.capture = capture
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._steps: dict[Hashable, Callable[[], Outputs]] = {}
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.out: dict[Hashable, Outputs] = {}

    @torch.inference_mode()
    def record(self, key: Hashable, step: Callable[[], Outputs]) -> Outputs:
        """Captures (or runs once) ``step`` under ``key``; returns its outputs."""
        self._steps[key] = step
        if self._pool is None:
            self.out[key] = step()
        else:
            self._graphs[key], self.out[key] = capture_graph(step, self._pool)
        return self.out[key]

    @torch.inference_mode()
    def replay(self, key: Hashable) -> Outputs:
        """Runs ``key``'s step again; returns its outputs (the recorded tensors, rewritten)."""
        if self._pool is not None:
            self._graphs[key].replay()
        else:
            for mine, fresh in zip(self.out[key], self._steps[key]()):
                mine.copy_(fresh)
        return self.out[key]

    def close(self) -> None:
        self._graphs.clear()
        self._steps.clear()
        self.out.clear()
