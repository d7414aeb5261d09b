"""Capturing and replaying CUDA graphs of whole steps (``StepGraphs``), shared by the decode, extend and
verify graphs (``pd.engine.decode_graph``, ``extend_graph``, ``verify_graph``).

A step written as a cut forward (``pd.model.moe.Pieces``: it yields each MoE layer's routed experts) is
captured whole, or with ``piecewise`` as one graph per piece with the routed experts run eagerly between them
(``PiecewiseGraph``): what normal-mode EP dispatch needs, which synchronises with the host (multi-rank prompt
steps, and decode steps where low-latency dispatch is not used).

Lifetime: destroy (``close``) before the process group: a process that captured NCCL work hung at
exit in destroy_process_group otherwise (gpu/NOTES.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

from pd.attention.base import AttentionBackend
from pd.model.moe import Pieces, RoutedCall, run_pieces

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]


def _warm(run: Callable[[], object]) -> None:
    """Two runs on a side stream: the allocator and lazily built kernels warm up outside any graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)


def capture_graph(
    step: Callable[[], Outputs], pool: torch.cuda._POOL_HANDLE | None = None
) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """Captures ``step`` into a CUDA graph allocating from ``pool`` (None: a pool of its own), after two runs on
    a side stream (the allocator and lazily built kernels warm up outside the graph). Returns the graph and
    ``step``'s outputs, the tensors each replay rewrites."""
    _warm(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class PiecewiseGraph:
    """A cut step captured as one CUDA graph per piece, in ``pool``: piece ``i`` ends where the step yields its
    ``i``-th ``RoutedCall``, whose tensors are that graph's outputs. ``replay`` replays piece ``i``, runs the call
    eagerly (any shapes, host synchronisation allowed) and copies its result into ``inputs[i]``, the tensor the
    step was sent at capture, which piece ``i + 1`` reads. ``out``: the step's outputs, rewritten by each replay.
    Lifetime: that of the pool's other graphs."""

    def __init__(self, step: Callable[[], Pieces[Outputs]], pool: torch.cuda._POOL_HANDLE) -> None:
        _warm(lambda: run_pieces(step()))
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[RoutedCall] = []
        self.inputs: list[torch.Tensor] = []  # [T, H] each, the routed experts' output a piece reads
        pieces, sent, call = step(), None, None
        while True:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                try:
                    call = pieces.send(sent)  # type: ignore[arg-type]  # None starts the generator
                except StopIteration as stop:
                    call, self.out = None, stop.value
            self.graphs.append(graph)
            if call is None:
                return
            self.calls.append(call)
            sent = torch.empty_like(call.x)
            self.inputs.append(sent)

    def replay(self) -> Outputs:
        for graph, call, into in zip(self.graphs, self.calls, self.inputs):
            graph.replay()
            into.copy_(call.run())
        self.graphs[-1].replay()
        return self.out


class StepGraphs:
    """Steps on static buffers by key, each captured into a CUDA graph (all in one memory pool, in the order
    recorded); ``capture=False`` runs them as they are on the same buffers (CPU, tests). A step reads only
    buffers its owner fills before ``replay`` (inputs, an attention state planned by ``prepare_graph``) and
    returns its outputs, which every replay rewrites in place. ``attn`` must support graphs to capture.
    ``piecewise``: cut steps (``record_pieces``) are captured piece by piece (``PiecewiseGraph``), else whole.
    Lifetime: ``close`` before the process group is destroyed (a captured NCCL graph hung at exit)."""

    def __init__(self, attn: AttentionBackend, capture: bool = True, piecewise: bool = False) -> None:
        if capture and not attn.supports_graphs:
            raise ValueError(
                f"CUDA graphs need an attention backend with graph support, not {type(attn).__name__}"
            )
        self.capture, self.piecewise = capture, piecewise
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._steps: dict[Hashable, Callable[[], Outputs]] = {}
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph | PiecewiseGraph] = {}
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
    def record_pieces(self, key: Hashable, step: Callable[[], Pieces[Outputs]]) -> Outputs:
        """Captures (or runs once) the cut step ``step`` under ``key``, piecewise or whole; returns its outputs."""
        if self._pool is None or not self.piecewise:
            return self.record(key, lambda: run_pieces(step()))
        graph = self._graphs[key] = PiecewiseGraph(step, self._pool)
        self.out[key] = graph.out
        return graph.out

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
