"""EP backends on one host: correctness against a dense reference, low-latency dispatch+combine
latency (eager and replayed in a CUDA graph), normal-mode dispatch+combine throughput.

    python -m pd.bench.ep_latency                          # 2 GPUs, backends torch and mooncake
    python -m pd.bench.ep_latency --out bench/results/ep_latency.json
    python -m pd.bench.ep_latency --device cpu --smoke     # gloo, tiny shapes (CI smoke test)
    python -m pd.bench.ep_latency --routing grouped --placements linear,round_robin
    python -m pd.bench.ep_latency --fp8                    # FP8 low-latency dispatch (EPConfig.ll_fp8)

No torchrun: the parent starts one worker process per rank for each backend, bounds each
launch with --timeout-s and kills only its own workers by pid, so a hung collective costs at
most that long; the other backends still run. Workers append results as JSON lines the moment
they have them, so a timed-out run still reports what it finished. NVLink SHARP / multicast is
switched off for every library before anything initialises (gpu/NOTES.md).

What is measured (per rank; the table shows the slowest rank):
- low latency: ``ll_dispatch`` + ``ll_combine`` of T tokens per rank, M = max T, with the
  dispatched rows fed straight back as expert output (no expert compute); median of per-call
  times (CUDA events), eager and as one CUDA graph replay.
- normal: ``dispatch`` + ``combine`` of 4096 tokens per rank, eager; GB/s = bytes this rank sends
  (dispatched rows, self included, + combined rows, times H * 2) / time.
Routing is uniform random top-k; every rank has T tokens.

``--fp8``: low-latency dispatch sends e4m3 rows plus per-128 float32 scales (``EPConfig.ll_fp8``;
combine stays bf16). The timed round trip then sends a constant all-ones bf16 expert output back
(feeding the rows back would add a dequantization pass over the whole ``[E_local, M * W, H]``
buffer to the time), so its check is ``sum_k w`` per token; a separate eager check dequantizes the
received rows and compares the combined result with the sender's ``quant_rows`` rows
(``fp8_rows_rel_err``). Every low-latency record carries ``bytes_per_row`` (``ll_bytes_per_row``:
dispatch and combine payload per (token, top-k slot), bf16 vs FP8) and ``wire_bytes_per_rank``
(T * K rows each way, one copy per (token, expert) as DeepEP/Mooncake send; the torch backend sends
one copy per (token, rank), so fewer).

``--routing grouped`` (the expert-placement study) instead routes random hidden states through the
real noaux_tc router with random weights shared by all ranks (the routers of
``pd.bench.placement_balance``: the §8 shape and a DeepSeek-V3-like 256-expert / 8-group / top-8
one), translates the global ids with each ``--placements`` map, and adds per-rank received
(token, expert) rows (max / mean over ranks) and the mean number of ranks a token's experts span.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# NVLink SHARP / multicast off before torch, NCCL, NVSHMEM or Mooncake initialise (gpu/NOTES.md).
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class Sweep:
    """The shapes one run covers."""

    hidden: tuple[int, ...]
    experts_topk: tuple[tuple[int, int], ...]
    ll_tokens: tuple[int, ...]  # T per rank; M = max
    normal_tokens: int
    check_shape: tuple[int, int, int, int]  # (hidden, experts, top_k, tokens) of the dense-reference check
    check_intermediate: int
    iters: int
    warmup: int


GPU_SWEEP = Sweep(
    hidden=(2048, 7168),
    experts_topk=((64, 6), (256, 8)),
    ll_tokens=(1, 16, 64, 128),
    normal_tokens=4096,
    check_shape=(2048, 64, 6, 64),
    check_intermediate=64,
    iters=50,
    warmup=5,
)
SMOKE_SWEEP = Sweep(
    hidden=(128,),
    experts_topk=((8, 2),),
    ll_tokens=(1, 4),
    normal_tokens=64,
    check_shape=(128, 8, 2, 4),
    check_intermediate=16,
    iters=3,
    warmup=1,
)


def _routers(smoke: bool) -> list:
    """The grouped routers of the placement study (``pd.bench.placement_balance``)."""
    from pd.bench.placement_balance import ROUTERS, SMOKE_ROUTER

    return [SMOKE_ROUTER] if smoke else list(ROUTERS)


# ---------------------------------------------------------------- worker (one rank)


class _Recorder:
    """Appends one JSON object per line (rank 0 only) and flushes, so partial runs survive."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self._file = open(path, "a") if enabled else None  # noqa: SIM115 (closed in close())

    def add(self, kind: str, **fields: object) -> None:
        if self._file:
            self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
            self._file.flush()
            print(kind, fields, flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pd.ep import (
        EPConfig,
        dequant_rows,
        ll_bytes_per_row,
        make_ep_backend,
        make_mooncake_buffer,
        quant_rows,
    )
    from pd.ep.layout import token_ranks
    from pd.ep.reference import ReferenceExperts, random_routing

    rank, world = args.rank, args.world_size
    sweep = SMOKE_SWEEP if args.smoke else GPU_SWEEP
    routers = _routers(args.smoke)
    if args.routing == "grouped":
        sweep = dataclasses.replace(
            sweep, hidden=tuple(dict.fromkeys(r.hidden for r in routers)),
            experts_topk=tuple(dict.fromkeys((r.experts, r.top_k) for r in routers)),
        )  # fmt: skip
    if args.group:  # one (hidden, experts, top_k) group per launch: Mooncake keeps one buffer per process
        h, e, k = (int(v) for v in args.group.split(":"))
        sweep = dataclasses.replace(sweep, hidden=(h,), experts_topk=((e, k),))
        routers = [r for r in routers if (r.hidden, r.experts, r.top_k) == (h, e, k)]
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
            device_id=device,
        )
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
    group = dist.group.WORLD
    rec = _Recorder(args.result_file, rank == 0)
    dtype = torch.bfloat16
    max_tokens = max(sweep.ll_tokens)
    gen = torch.Generator().manual_seed(1234 + rank)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def slowest(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    def all_ok(ok: bool) -> bool:
        t = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item()) == 0

    def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.float() - want).norm() / want.norm().clamp_min(1e-12)) if want.numel() else 0.0

    def timed(fn, iters: int) -> float:
        """Median microseconds per call of fn (which launches work on the current stream)."""
        times = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                times.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        sync()
        us = [s.elapsed_time(e) * 1e3 for s, e in times] if cuda else [t * 1e6 for t in times]
        return statistics.median(us)

    def ll_timings(round_trip, want: torch.Tensor) -> tuple[float, float, float | None, float | None]:
        """(identity rel err, eager us, graph us, max |graph - eager|), each the slowest rank's."""
        eager_out = round_trip()
        err = slowest(rel_err(eager_out, want))
        for _ in range(sweep.warmup):
            round_trip()
        dist.barrier(group=group)
        eager_us = slowest(timed(round_trip, sweep.iters))
        graph_us = graph_diff = None
        if cuda:
            graph_us, graph_diff = _graph_timing(round_trip, eager_out, sweep, timed, group)
            graph_us, graph_diff = slowest(graph_us), slowest(graph_diff)
        return err, eager_us, graph_us, graph_diff

    def ll_round_trip(backend, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        """(round_trip, want) of one low-latency dispatch + combine with stand-in experts.

        bf16: the dispatched rows go straight back (identity experts): want = x * sum_k w.
        FP8: a constant all-ones expert output goes back: want = sum_k w in every column.
        """
        cfg = backend.config
        if not cfg.ll_fp8:

            def round_trip():
                d = backend.ll_dispatch(x, idx)
                return backend.ll_combine(d.recv_x, idx, w, d.handle)

            return round_trip, x.float() * w.sum(dim=1, keepdim=True)
        ones = torch.ones(
            cfg.num_local_experts, cfg.ll_rows_per_expert, cfg.hidden, dtype=cfg.dtype, device=device
        )

        def fp8_round_trip():
            d = backend.ll_dispatch(x, idx)
            return backend.ll_combine(ones, idx, w, d.handle)

        return fp8_round_trip, w.sum(dim=1, keepdim=True).expand(-1, cfg.hidden)

    def fp8_rows_err(backend, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> float | None:
        """FP8 only (else None): dispatch, dequantize every received row and send it back (identity
        experts, eager); relative error against the sender's quantized rows times sum_k w."""
        if not backend.config.ll_fp8:
            return None
        d = backend.ll_dispatch(x, idx)
        y = dequant_rows(d.recv_x, d.recv_scale).to(dtype)  # rows past recv_count may be NaN: ignored
        out = backend.ll_combine(y, idx, w, d.handle)
        return slowest(rel_err(out, dequant_rows(*quant_rows(x)) * w.sum(dim=1, keepdim=True)))

    def wire_fields(backend, tokens: int, top_k: int) -> dict:
        per_row = ll_bytes_per_row(backend.config)
        rows = tokens * top_k
        return {"fp8": backend.config.ll_fp8, "bytes_per_row": per_row,
                "wire_bytes_per_rank": {"dispatch": rows * per_row["dispatch"], "combine": rows * per_row["combine"]}}  # fmt: skip

    def placement_sweep(backend, router) -> None:
        """Low-latency round trips of grouped-router traffic under each placement."""
        from pd.bench.placement_balance import random_router
        from pd.ep.placement import ExpertPlacement, PlacementMap
        from pd.model.moe import select_experts

        cfg = router.config()
        weight, bias = random_router(router, torch.Generator().manual_seed(77))  # same on every rank
        weight, bias = weight.to(device), bias.to(device)
        for kind in args.placements.split(","):
            pmap = PlacementMap(ExpertPlacement(kind, router.experts, world), device)
            for tokens in sweep.ll_tokens:
                x = torch.randn(tokens, router.hidden, generator=gen).to(device, dtype)
                w, global_idx = select_experts(x, weight, bias, cfg)  # [T, K] f32, [T, K] global ids
                idx = pmap.to_physical(global_idx)  # [T, K] physical ids
                round_trip, want = ll_round_trip(backend, x, idx, w)
                err, eager_us, graph_us, graph_diff = ll_timings(round_trip, want)
                fp8_err = fp8_rows_err(backend, x, idx, w)
                # Rows each rank received: one per (token, expert) naming one of its experts.
                recv = backend.ll_dispatch(x, idx).recv_count.sum().to(torch.float64).reshape(1)
                per_rank = [torch.zeros_like(recv) for _ in range(world)]
                dist.all_gather(per_rank, recv, group=group)
                per_rank = torch.cat(per_rank)  # [W]
                ranks = idx // (router.experts // world)  # [T, K] destination rank per slot
                spans = sum((ranks == r).any(-1) for r in range(world)).to(torch.float64).sum().reshape(1)
                dist.all_reduce(spans, group=group)
                rec.add("placement", backend=args.backend, router=router.name, hidden=router.hidden,
                        experts=router.experts, top_k=router.top_k, placement=kind, tokens=tokens,
                        max_tokens=max_tokens, eager_us=eager_us, graph_us=graph_us,
                        recv_rows_per_rank=per_rank.tolist(),
                        recv_max_over_mean=float(per_rank.max() / per_rank.mean().clamp_min(1e-9)),
                        mean_ranks_spanned=float(spans) / (tokens * world), identity_rel_err=err,
                        fp8_rows_rel_err=fp8_err, **wire_fields(backend, tokens, router.top_k),
                        ok=all_ok(err < 2e-2 and (graph_diff is None or graph_diff == 0.0)
                                  and (fp8_err is None or fp8_err < 2e-2)))  # fmt: skip

    mooncake_buffer = None
    if args.backend == "mooncake":
        # One Mooncake Buffer per process, sized for the largest shape of the sweep.
        mooncake_buffer = make_mooncake_buffer(
            group, max_tokens, max(sweep.hidden), max(e for e, _ in sweep.experts_topk)
        )

    def build(hidden: int, experts: int, tokens: int):
        cfg = EPConfig(experts, hidden, tokens, dtype, rank, world, device, ll_fp8=args.fp8)
        options = {"buffer": mooncake_buffer} if mooncake_buffer is not None else {}
        return make_ep_backend(args.backend, cfg, group, **options)

    # ---- correctness against the dense reference (in the launch whose group holds the check shape) ----
    hidden, experts, top_k, tokens = sweep.check_shape
    run_check = hidden in sweep.hidden and (experts, top_k) in sweep.experts_topk
    backend = build(hidden, experts, max_tokens) if run_check else None
    if getattr(backend, "uses_fallback", False):
        rec.add(
            "note", backend=args.backend, text="Mooncake runs its Python fallback (no NVLink IPC / IBGDA)"
        )
    ref = (
        None
        if backend is None
        else ReferenceExperts(experts, hidden, sweep.check_intermediate, seed=99, device=device)
    )
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    idx, w = random_routing(tokens, experts, top_k, gen, device)
    idx[0, -1] = -1  # an inert slot, and a padding row with no expert at all
    idx[1, :] = -1
    want = ref.dense(x, idx, w) if ref is not None else None
    # With FP8 low-latency dispatch the experts see the quantized rows: so does the reference.
    ll_want = ref.dense(dequant_rows(*quant_rows(x)), idx, w) if ref is not None and args.fp8 else want
    first = backend.config.first_local_expert if backend is not None else 0
    modes = [] if backend is None else ["low_latency"] + (["normal"] if args.backend == "torch" else [])
    for mode in modes:
        if mode == "normal":
            d = backend.dispatch(x, idx, w)
            out = backend.combine(ref.normal_outputs(d, first), d.handle)
        else:
            d = backend.ll_dispatch(x, idx)
            out = backend.ll_combine(ref.ll_outputs(d, first, dtype=dtype), idx, w, d.handle)
        err = slowest(rel_err(out, want if mode == "normal" else ll_want))
        rec.add("correctness", backend=args.backend, mode=mode, check="dense reference MoE", rel_err=err,
                fp8=args.fp8 and mode == "low_latency", ok=all_ok(err < 2e-2))  # fmt: skip
    del backend
    gc.collect()

    if args.routing == "grouped":
        for router in routers:
            backend = build(router.hidden, router.experts, max_tokens)
            placement_sweep(backend, router)
            del backend
            gc.collect()
        hidden_sizes = ()  # the uniform sweeps below are skipped
    else:
        hidden_sizes = sweep.hidden

    # ---- low-latency latency sweep ----
    for hidden in hidden_sizes:
        for experts, top_k in sweep.experts_topk:
            backend = build(hidden, experts, max_tokens)
            for tokens in sweep.ll_tokens:
                x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
                idx, w = random_routing(tokens, experts, top_k, gen, device)
                round_trip, want = ll_round_trip(backend, x, idx, w)
                err, eager_us, graph_us, graph_diff = ll_timings(round_trip, want)
                fp8_err = fp8_rows_err(backend, x, idx, w)
                rec.add("low_latency", backend=args.backend, hidden=hidden, experts=experts, top_k=top_k,
                        tokens=tokens, max_tokens=max_tokens, eager_us=eager_us, graph_us=graph_us,
                        identity_rel_err=err, graph_vs_eager_max_abs=graph_diff, fp8_rows_rel_err=fp8_err,
                        **wire_fields(backend, tokens, top_k),
                        ok=all_ok(err < 2e-2 and (graph_diff is None or graph_diff == 0.0)
                                  and (fp8_err is None or fp8_err < 2e-2)))  # fmt: skip
            del backend
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    # ---- normal-mode throughput (torch; mooncake's normal mode is the same torch code) ----
    if args.backend == "torch" and args.routing == "uniform":
        tokens = sweep.normal_tokens
        for hidden in sweep.hidden:
            for experts, top_k in sweep.experts_topk:
                backend = build(hidden, experts, max_tokens)
                x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
                idx, w = random_routing(tokens, experts, top_k, gen, device)
                sent_rows = int(token_ranks(idx, experts // world, world).sum())

                def round_trip(x=x, idx=idx, w=w, backend=backend):
                    d = backend.dispatch(x, idx, w)
                    return backend.combine(d.recv_x, d.handle), d.recv_x.shape[0]

                out, recv_rows = round_trip()
                # Identity experts, unweighted: each token comes back once per rank it went to.
                want = x.float() * token_ranks(idx, experts // world, world).sum(dim=1, keepdim=True)
                err = slowest(rel_err(out, want))
                for _ in range(sweep.warmup):
                    round_trip()
                dist.barrier(group=group)
                us = timed(round_trip, max(sweep.iters // 5, 3))
                gbps = (sent_rows + recv_rows) * hidden * dtype.itemsize / (us * 1e-6) / 1e9
                rec.add("normal", backend=args.backend, hidden=hidden, experts=experts, top_k=top_k,
                        tokens=tokens, rows_dispatched=sent_rows, rows_combined=recv_rows,
                        time_us=slowest(us), gbps_rank0=gbps, identity_rel_err=err, ok=all_ok(err < 2e-2))  # fmt: skip
                del backend
                gc.collect()

    rec.close()
    sync()
    mooncake_buffer = None
    gc.collect()
    dist.destroy_process_group()


def _graph_timing(round_trip, eager_out, sweep: Sweep, timed, group) -> tuple[float, float]:
    """Capture one round trip in a CUDA graph; return (median replay us, max |graph - eager|).
    The graph is destroyed before returning (a captured NCCL graph alive at process-group
    teardown hangs, gpu/NOTES.md)."""
    import torch
    import torch.distributed as dist

    from pd.engine.graph import capture_graph

    graph, (graph_out,) = capture_graph(lambda: (round_trip(),))
    graph.replay()
    torch.cuda.synchronize()
    diff = float((graph_out.float() - eager_out.float()).abs().max()) if graph_out.numel() else 0.0
    for _ in range(sweep.warmup):
        graph.replay()
    dist.barrier(group=group)
    us = timed(graph.replay, sweep.iters)
    torch.cuda.synchronize()
    del graph_out
    graph.reset()
    del graph
    return us, diff


# ---------------------------------------------------------------- parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, backend: str, workdir: Path, group: str = "") -> tuple[str, list[dict]]:
    """Run one backend's workers (on one shape group if given); return (status, records) whatever happened."""
    tag = f"{backend}{'.' + group.replace(':', '_') if group else ''}"
    result_file = workdir / f"{tag}.jsonl"
    env = {**os.environ, **NO_MULTICAST_ENV}
    if args.device == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    procs = []
    for rank in range(args.world_size):
        log = open(workdir / f"{tag}.rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "pd.bench.ep_latency", "--worker", "--rank", str(rank),
               "--world-size", str(args.world_size), "--port", str(port), "--backend", backend,
               "--device", args.device, "--result-file", str(result_file), "--group", group,
               "--routing", args.routing, "--placements", args.placements] + (["--smoke"] if args.smoke else [])  # fmt: skip
        cmd += ["--fp8"] if args.fp8 else []
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + args.timeout_s
    status = "ok"
    try:
        # Poll: a rank that dies leaves its peers blocked in a collective, so stop them at once.
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break
            if time.monotonic() > deadline:
                status = f"timed out after {args.timeout_s} s"
                break
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if status == "ok" and any(p.returncode != 0 for p, _ in procs):  # includes peers killed after a failure
        status = "failed (rc " + ", ".join(str(p.returncode) for p, _ in procs) + ")"
    if status != "ok":
        for rank in range(args.world_size):
            tail = (workdir / f"{tag}.rank{rank}.log").read_text()[-3000:]
            print(f"--- {tag} rank {rank} log tail ---\n{tail}", file=sys.stderr)
    records = []
    if result_file.exists():
        records = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    return status, records


def _environment(device: str) -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": sys.version.split()[0]}  # fmt: skip
    try:
        repo = Path(__file__).resolve().parents[1]
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    if device == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        env["device"] = "cpu"
    return env


def _fmt(value: object, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _tables(result: dict) -> str:
    lines = ["| backend | mode | check | rel err | ok |", "|---|---|---|---|---|"]
    lines += [f"| {c['backend']} | {c['mode']} | {c['check']} | {c['rel_err']:.1e} | {c['ok']} |"
              for c in result["correctness"]]  # fmt: skip
    lines += ["", "Low-latency dispatch + combine, us per round trip (slowest rank, median); bytes per (token, "
              "top-k slot) dispatched / combined:", "",
              "| backend | fp8 | hidden | experts/top-k | T | B/row out+back | eager us | graph us | ok |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['backend']} | {r['fp8']} | {r['hidden']} | {r['experts']}/{r['top_k']} | {r['tokens']} | "
              f"{r['bytes_per_row']['dispatch']}+{r['bytes_per_row']['combine']} | "
              f"{_fmt(r['eager_us'])} | {_fmt(r['graph_us'])} | {r['ok']} |" for r in result["low_latency"]]  # fmt: skip
    lines += ["", "Normal dispatch + combine (eager):", "",
              "| backend | hidden | experts/top-k | T | rows out+back | us | GB/s (rank 0) | ok |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['backend']} | {r['hidden']} | {r['experts']}/{r['top_k']} | {r['tokens']} | "
              f"{r['rows_dispatched']}+{r['rows_combined']} | {r['time_us']:.0f} | {r['gbps_rank0']:.1f} | {r['ok']} |"
              for r in result["normal"]]  # fmt: skip
    if result["placement"]:
        lines += ["", "Expert placement, grouped routers, low-latency dispatch + combine (slowest rank, median):", "",
                  "| backend | router | placement | T | eager us | graph us | recv rows max/mean | ranks/token | ok |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['backend']} | {r['router']} | {r['placement']} | {r['tokens']} | {_fmt(r['eager_us'])} | "
                  f"{_fmt(r['graph_us'])} | {r['recv_max_over_mean']:.3f} | {r['mean_ranks_spanned']:.2f} | {r['ok']} |"
                  for r in result["placement"]]  # fmt: skip
    lines += ["", "| backend | status |", "|---|---|"] + [
        f"| {r['backend']} | {r['status']} |" for r in result["runs"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument(
        "--backends", default=None, help="comma-separated (default: torch,mooncake on cuda; torch on cpu)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations")
    p.add_argument("--timeout-s", type=float, default=300.0, help="limit per backend launch")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--routing", choices=("uniform", "grouped"), default="uniform",
                   help="uniform random top-k, or the grouped noaux_tc routers of the placement study")  # fmt: skip
    p.add_argument("--placements", default="linear",
                   help="with --routing grouped: comma-separated expert placements to compare")  # fmt: skip
    p.add_argument("--fp8", action="store_true",
                   help="FP8 low-latency dispatch (EPConfig.ll_fp8; needs hidden % 128 == 0, combine stays bf16)")  # fmt: skip
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--group", default="", help=argparse.SUPPRESS)  # "hidden:experts:top_k"
    args = p.parse_args(argv)

    os.environ.update(NO_MULTICAST_ENV)
    if args.worker:
        _worker(args)
        return 0

    backends = (args.backends or ("torch,mooncake" if args.device == "cuda" else "torch")).split(",")
    result: dict = {"environment": _environment(args.device), "args": {"device": args.device,
                    "world_size": args.world_size, "smoke": args.smoke, "backends": backends,
                    "routing": args.routing, "placements": args.placements.split(","), "fp8": args.fp8},
                    "correctness": [], "low_latency": [], "normal": [], "placement": [], "notes": [], "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ep_latency_") as tmp:
        sweep = SMOKE_SWEEP if args.smoke else GPU_SWEEP
        for backend in backends:
            # Mooncake keeps one EP buffer per process and did not survive a change of expert count
            # within one (seen on 2 H200s): one launch per shape group.
            groups = [""]
            if backend == "mooncake" and args.routing == "grouped":
                groups = [f"{r.hidden}:{r.experts}:{r.top_k}" for r in _routers(args.smoke)]
            elif backend == "mooncake":
                groups = [f"{h}:{e}:{k}" for h in sweep.hidden for e, k in sweep.experts_topk]
            for group in groups:
                status, records = _launch(args, backend, Path(tmp), group)
                result["runs"].append({"backend": backend + (f" {group}" if group else ""), "status": status})
                for r in records:
                    result["notes" if r["kind"] == "note" else r["kind"]].append(r)
    print(_tables(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    bad = [r for k in ("correctness", "low_latency", "normal", "placement") for r in result[k] if not r["ok"]]
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
