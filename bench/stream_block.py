"""Does a host call block behind a CUDA graph still running? (issue 17: the overlapped decode loop's host sat
~0.5 ms in a 2 KB pinned host-to-device copy until the step in flight had drained; ``loop_trace_h200.md``.)

    python -m pd.bench.stream_block

Replays a graph of ``nodes`` kernels (~10 ms of GPU work, made of many small kernels or a few large ones), then
times one host call issued right after the replay: a 2 KB pinned copy or a small kernel on the graph's stream,
the same copy on another stream, and a second replay. A call that returns in microseconds is asynchronous; one
that takes about the graph's time waited for it.
"""

from __future__ import annotations

import time

import torch


def build(nodes: int, elements: int, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    x = torch.ones(elements, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        x.mul_(1.0)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(nodes):
                x.mul_(1.0000001)
    graph.keep = x  # type: ignore[attr-defined]
    return graph


def main() -> None:
    main_stream, side = torch.cuda.Stream(), torch.cuda.Stream()
    host = torch.zeros(256, dtype=torch.int64, pin_memory=True)
    back = torch.zeros(256, dtype=torch.int64, pin_memory=True)
    dev = torch.zeros(256, dtype=torch.int64, device="cuda")
    event = torch.cuda.Event()

    def results_then_copy() -> None:  # as the decode launch: results copied back behind the replay, an event
        back.copy_(dev, non_blocking=True)
        event.record()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        timed.append((time.perf_counter() - t0) * 1e6)

    timed: list[float] = []
    print("| graph | graph ms | call after the replay | host us of the call |\n|---|---:|---|---:|")
    for nodes, elements in ((700, 1 << 22), (40, 1 << 26)):
        graph = build(nodes, elements, main_stream)
        calls = {
            "pinned copy, same stream": lambda: dev.copy_(host, non_blocking=True),
            "small kernel, same stream": lambda: dev.add_(1),
            "pinned copy, other stream": lambda: _on(side, lambda: dev.copy_(host, non_blocking=True)),
            "second replay": graph.replay,
            "copy back + event + pinned copy (the copy's us)": results_then_copy,
            "pageable copy, same stream": lambda: dev.copy_(
                torch.zeros(256, dtype=torch.int64), non_blocking=True
            ),
        }
        with torch.cuda.stream(main_stream):
            graph.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            graph_ms = (time.perf_counter() - t0) * 1e3
            for name, call in calls.items():
                times = []
                for _ in range(5):
                    graph.replay()
                    t0 = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t0) * 1e6)
                    torch.cuda.synchronize()
                if timed:
                    times, timed[:] = list(timed), []
                print(f"| {nodes} kernels | {graph_ms:.2f} | {name} | {sorted(times)[2]:.0f} |", flush=True)


def _on(stream: torch.cuda.Stream, fn) -> None:
    with torch.cuda.stream(stream):
        fn()


if __name__ == "__main__":
    main()
