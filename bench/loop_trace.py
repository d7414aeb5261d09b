"""Where the overlapped decode loop's time goes beyond the graph replay (issue 17): a CPU + CUDA profile of
``Engine.step`` at each batch, the GPU's idle gaps between kernels and what the host was doing in each, and the
kernel inventory of one replay (name, launches a step, microseconds a step).

    python -m pd.bench.loop_trace [--batches 1,64] [--context 1024] [--steps 8] --out DIR

DESIGN.md §8 shape, dummy weights, one GPU. Writes ``DIR/trace_b{B}.json`` (Chrome trace) and prints, per
batch: the unprofiled loop's phases (``phases``), then from the profile the steps' wall, GPU busy time, the idle
total, the largest gaps with the host calls overlapping them (CUPTI inflates graph launches: read these with
the unprofiled phases), and the replay's kernels by time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pd.bench.decode_step import decoding_requests, finish_requests, kernel_times, make_batch
from pd.config import EngineConfig, ModelConfig
from pd.engine.decode_graph import Launched
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.types import Req


def overlapped_engine(
    runner: ModelRunner, batch: int, context: int, max_tokens: int
) -> tuple[Engine, list[Req]]:
    """An engine on ``runner`` whose decode loop overlaps, with ``batch`` prefilled requests decoding."""
    engine = Engine(runner.cfg, runner=runner)
    engine.scheduler.lookahead = 1
    engine.overlap = True
    return engine, decoding_requests(engine, batch, context, max_tokens)


def idle_gaps(kernels: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    """``(start, end)`` of the intervals longer than ``min_us`` in which no kernel of ``kernels`` ran."""
    gaps, busy_until = [], None
    for start, end in sorted(kernels):
        if busy_until is not None and start - busy_until > min_us:
            gaps.append((busy_until, start))
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def trace_loop(runner: ModelRunner, batch: int, context: int, steps: int, out: Path) -> None:
    engine, reqs = overlapped_engine(runner, batch, context, steps + 16)
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    prof.export_chrome_trace(str(out / f"trace_b{batch}.json"))
    events = prof.events()
    gpu = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    busy = sum(b - a for a, b in gpu)
    gaps = idle_gaps(gpu, 5.0)
    first, last = min(a for a, _ in gpu), max(b for _, b in gpu)
    print(f"\n## batch {batch}: {steps} overlapped steps, {wall_us / steps:.0f} us a step (profiled); GPU span "
          f"{(last - first) / steps:.0f} us a step, kernels {busy / steps:.0f} us a step, idle gaps > 5 us: "
          f"{len(gaps) / steps:.1f} a step, {sum(b - a for a, b in gaps) / steps:.0f} us a step")  # fmt: skip
    print("| gap us | host calls overlapping it (longest first) |\n|---:|---|")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        over = [e for e in cpu if e.time_range.start < b and e.time_range.end > a]
        over.sort(key=lambda e: -(min(e.time_range.end, b) - max(e.time_range.start, a)))
        names = []
        for e in over:
            if e.name not in names:
                names.append(e.name)
        print(f"| {b - a:.0f} | {', '.join(names[:8])} |")
    finish_requests(engine, reqs)


def phases(runner: ModelRunner, batch: int, context: int, steps: int) -> None:
    """The overlapped loop without a profiler (CUPTI tracing makes each graph launch cost ~1 ms of host time):
    CUDA events around each replay give its GPU time and the GPU time from one replay's end to the next one's
    start (input copies, planning copies, results copied back, idle); at each replay's launch the host notes
    whether the replay before had already ended (the GPU then waits for the host); host clocks time the inputs'
    load and planning (``_load``) and the wait for a step's results."""
    graphs = runner.graphs
    assert graphs is not None
    engine, reqs = overlapped_engine(runner, batch, context, steps + 16)
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event, bool]] = []
    load_s: list[float] = []
    wait_s: list[float] = []
    replay, load = graphs.graphs.replay, graphs._load

    def timed_replay(key):
        late = bool(marks) and marks[-1][1].query()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay(key)
        end.record()
        marks.append((start, end, late))
        return out

    def timed_load(*args, **kwargs):
        t0 = time.perf_counter()
        load(*args, **kwargs)
        load_s.append(time.perf_counter() - t0)

    result = Launched.result

    def timed_result(self):
        t0 = time.perf_counter()
        if self.out.event is not None:
            self.out.event.synchronize()
        wait_s.append(time.perf_counter() - t0)
        return result(self)

    graphs.graphs.replay, graphs._load = timed_replay, timed_load  # type: ignore[method-assign]
    Launched.result = timed_result  # type: ignore[method-assign]
    try:
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
        marks.clear()
        load_s.clear()
        wait_s.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    finally:
        graphs.graphs.replay, graphs._load = replay, load  # type: ignore[method-assign]
        Launched.result = result  # type: ignore[method-assign]
    run = [a.elapsed_time(b) for a, b, _ in marks]
    between = [marks[i][1].elapsed_time(marks[i + 1][0]) for i in range(len(marks) - 1)]
    late = sum(m[2] for m in marks[1:]) / max(1, len(marks) - 1)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    print(f"\n## batch {batch}, unprofiled: {wall * 1e3:.2f} ms a step; replay {mean(run):.2f} ms; GPU from one "
          f"replay's end to the next's start {mean(between):.3f} ms (max {max(between, default=0):.3f}); replays "
          f"launched after the one before had ended: {late:.0%}; host load + plan {mean(load_s) * 1e3:.3f} ms, "
          f"host wait for results {mean(wait_s) * 1e3:.3f} ms")  # fmt: skip
    finish_requests(engine, reqs)


def inventory(runner: ModelRunner, batch: int, context: int) -> None:
    b = make_batch(runner, batch, context)
    assert runner.graphs is not None
    bs = runner.graphs.bucket(batch)
    ids = [r.all_ids[s] for r, s in zip(b.reqs, b.starts)]
    runner.graphs._load(bs, ids, list(b.starts), list(b.ends), [r.pages for r in b.reqs])
    kernels = kernel_times(lambda: runner.graphs.graphs.replay(bs), 3)
    by: dict[str, list[float]] = {}
    for name, us in kernels:
        by.setdefault(name, [0.0, 0.0])
        by[name][0] += 1 / 3
        by[name][1] += us
    total = sum(v[1] for v in by.values())
    print(
        f"\n## replay kernels, batch {batch}: {sum(v[0] for v in by.values()):.0f} launches, {total:.0f} us a step"
    )
    print("| kernel | a step | us a step |\n|---|---:|---:|")
    for name, (n, us) in sorted(by.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"| {name[:110]} | {n:.0f} | {us:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from pd.tiny_model import make_tiny_model

    model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "m", "moonlight-shape", config_only=True))
    batches = [int(b) for b in args.batches.split(",")]
    page_size, max_b = 64, max(batches)
    cfg = EngineConfig(
        model, device="cuda", dtype="bfloat16", load_format="dummy", page_size=page_size,
        num_pages=2 * max_b * (-(-(args.context + 1) // page_size) + 1) + 2, max_running=max_b,
        max_context_len=args.context + 64 + args.steps + 16,
    )  # fmt: skip
    runner = ModelRunner(cfg, ModelConfig.from_dir(model))
    runner.pool.buffer.normal_()
    for b in batches:
        phases(runner, b, args.context, max(args.steps, 20))
        inventory(runner, b, args.context)
        trace_loop(runner, b, args.context, args.steps, args.out)
    runner.close()


if __name__ == "__main__":
    main()
