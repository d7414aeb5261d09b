"""Decode step time and prefill throughput of the DESIGN.md §8 shape on one GPU (EP = 1, dummy
weights), each printed beside its floor, plus full-graph vs eager decode and a kernel profile.

    python -m pd.bench.decode_step [--batches 1,8,32,64,128] [--contexts 1024,4096] [--quantization fp8]
        [--out FILE]

Floors use ceilings measured at start: a device-to-device copy (bytes read + written) and a bf16
8192^3 matmul. Decode floor = (weight bytes the step touches + KV bytes read) / copy bandwidth, with
the experts a batch touches estimated for uniform routing, E * (1 - (1 - K/E)^B) per MoE layer.
Prefill floor = FLOPs / matmul peak (weights: 2 FLOPs per active parameter per token; attention:
causal QK^T and PV). With ``--quantization fp8`` (block-FP8 weights, W8A8) the weight bytes are the FP8
ones (with their scales) and the prefill peak is the block-scaled FP8 GEMM's, measured at 8192^3 with
``pd.kernels.fp8.block_fp8_linear``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pd.attention import ATTENTION_BACKENDS
from pd.bench.kernel_classes import breakdown, format_breakdown
from pd.bench.moe_kernels import measure_ceilings
from pd.config import EngineConfig, ModelConfig
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.types import Batch, BatchMode, Req, Sampled, SamplingParams


def measure_fp8_peak() -> float:
    """FLOP/s of the block-scaled FP8 GEMM (1x128 activations, 128x128 weights) at 8192^3."""
    from pd.bench.moe_kernels import bench_us
    from pd.kernels.fp8 import block_fp8_linear
    from pd.model.quant import quantize

    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w, s = quantize(torch.randn(n, n, device="cuda"), (128, 128))
    return 2 * n**3 / (bench_us(lambda: block_fp8_linear(x, w, s)) * 1e-6)


def write_profile(path: str, step, steps: int) -> None:
    """A CUDA kernel profile of ``steps`` runs of ``step`` (after one unprofiled run), written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    Path(path).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


def kernel_times(step, steps: int) -> list[tuple[str, float]]:
    """(kernel name, device microseconds per step) of every GPU kernel and copy of ``steps`` runs of ``step``
    (after one unprofiled run); kernels replayed from a CUDA graph count like launched ones."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    return [
        (e.name, e.time_range.elapsed_us() / steps) for e in prof.events() if e.device_type == DeviceType.CUDA
    ]


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall(fn, iters: int, warmup: int = 3) -> float:
    """Median wall seconds of ``fn`` (which synchronizes: the runner reads its tokens back)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parameter_bytes(runner: ModelRunner) -> dict[str, float]:
    """Bytes of the target model's weights by kind: dense (everything always read), per-expert, embedding row; and
    of its MTP layer's dense weights (``mtp_dense``, 0 without one) and of ``lm_head`` (``head``, in dense too)."""
    cfg = runner.model_cfg
    dense = expert = mtp_dense = 0
    for name, p in runner.model.named_parameters():
        n = p.numel() * p.element_size()
        if name.startswith("mtp."):
            mtp_dense += 0 if ".experts." in name else n
        elif ".experts." in name:  # w13, w2 and (FP8) their scales
            expert += n
        elif name != "model.embed_tokens.weight":
            dense += n
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = expert / (moe_layers * cfg.n_routed_experts)
    head = runner.model.lm_head.weight
    return {"dense": dense, "per_expert": per_expert, "moe_layers": moe_layers, "row": cfg.hidden_size * 2,
            "mtp_dense": mtp_dense, "head": head.numel() * head.element_size()}  # fmt: skip


def kv_bytes_per_token(runner: ModelRunner) -> int:
    """Cache bytes a token holds over the target's layers."""
    cfg = runner.model_cfg
    return cfg.num_hidden_layers * cfg.latent_dim * runner.pool.layout.dtype.itemsize


def experts_hit(cfg: ModelConfig, tokens: int) -> float:
    """Routed experts a layer that ``tokens`` tokens hit on average under uniformly random routing."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** tokens)


def decode_floor_bytes(
    pb: dict, cfg: ModelConfig, batch: int, context: int, kv_bytes_per_token: int
) -> float:
    return (
        pb["dense"]
        + pb["moe_layers"] * experts_hit(cfg, batch) * pb["per_expert"]
        + batch * pb["row"]
        + batch * context * kv_bytes_per_token
    )


def prefill_flops(runner: ModelRunner, tokens: int, seq_len: int) -> float:
    cfg = runner.model_cfg
    pb = parameter_bytes(runner)
    active_params = (pb["dense"] + pb["moe_layers"] * cfg.num_experts_per_tok * pb["per_expert"]) / 2
    # Causal attention per layer and sequence: QK^T over qk_head_dim and PV over v_head_dim, half the square.
    seqs = tokens // seq_len
    attn = (
        cfg.num_hidden_layers
        * seqs
        * cfg.num_attention_heads
        * seq_len**2
        * (cfg.qk_head_dim + cfg.v_head_dim)
    )
    return 2 * tokens * active_params + attn


def graph_breakdown(runner: ModelRunner, batch: Batch, iters: int) -> tuple[float, float]:
    """Host time of loading a bucket (inputs + attention planning) and GPU time of its replay, in ms."""
    g = runner.graphs
    bs = g.bucket(len(batch.reqs))
    ids = [r.all_ids[s] for r, s in zip(batch.reqs, batch.starts)]
    pages = [r.pages for r in batch.reqs]

    def load() -> None:
        g._load(bs, ids, list(batch.starts), list(batch.ends), pages)
        torch.cuda.synchronize()

    return wall(load, iters) * 1e3, timed(lambda: g.graphs.replay(bs), iters) * 1e3


# Steps the engine-loop figures average over: the overlapped loop's first step after the timer starts has nothing
# in flight, so the GPU idles for its host work once (~1-4 ms); over 20 steps that added 0.05-0.2 ms a step.
LOOP_STEPS = 50  # within the page and context headroom main() gives each request (64 tokens)


def decoding_requests(engine: Engine, batch: int, context: int, max_tokens: int) -> list[Req]:
    """``batch`` greedy requests of ``context`` prompt tokens added to ``engine`` as prefilled (their pages
    allocated, their prompt KV whatever the pool holds), each to decode ``max_tokens`` tokens."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = []
    for i in range(batch):
        req = engine.make_request([(7 * i + j) % 1000 + 3 for j in range(context)], sp)
        req.pages = engine.allocator.alloc(engine.runner.pool.layout.pages_for(context + 1)) or []
        engine.add_prefilled(req, Sampled(5, 0.0))
        reqs.append(req)
    return reqs


def finish_requests(engine: Engine, reqs: list[Req]) -> None:
    """Aborts ``reqs`` and lands whatever is still in flight, so the pool is free for the next measurement."""
    for req in reqs:
        engine.abort(req)
    while engine.has_work():
        engine.step()


def engine_loop(
    runner: ModelRunner, batch: int, context: int, iters: int, cfg: EngineConfig | None = None
) -> dict[str, float]:
    """Mean ms per step of the engine's decode loop (``Engine.step``: schedule, run, postprocess; no tokenizer,
    so no detokenizing) over ``batch`` requests at ``context`` tokens, one step at a time (``serial_ms``) and
    overlapped (``overlapped_ms``: plain steps launched before the host reads the one before; with MTP, verify
    steps launched before the host postprocesses the one before). The requests' prompt KV is whatever the pool
    holds. ``cfg``: the engine's (default the runner's); with MTP under the oracle a step emits K + 1 tokens,
    and each request decodes enough for ``iters`` steps and the warm-up. ``tokens_per_step``: tokens a request
    emitted a step in the overlapped loop's timed steps. With MTP, also the host's ms a step in the pipelined
    loop's three parts of a verify step (``launch_ms``, ``read_ms``: the wait for the GPU included, ``emit_ms``);
    the rest of a step is scheduling."""
    engine = Engine(cfg or runner.cfg, runner=runner)
    spec = engine.spec
    per_step = spec.k + 1 if spec is not None and spec.oracle else 1
    parts: dict[str, float] = {}
    if spec is None:
        engine.scheduler.lookahead = 1  # as an overlapping engine reserves, in both modes
    else:  # the bench's own timers around the speculator's three parts
        for name in ("launch", "read", "emit"):
            setattr(spec, name, _timed_part(getattr(spec, name), parts, f"{name}_ms"))
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    out = {}
    for overlap in (False, True):
        if spec is None:
            engine.overlap = overlap
        else:
            engine.pipelined = overlap
        reqs = decoding_requests(engine, batch, context, (iters + 8) * per_step)
        for _ in range(3):
            engine.step()
        sync()
        parts.clear()
        t0 = time.perf_counter()
        emitted = sum(len(o.token_ids) for _ in range(iters) for o in engine.step())
        sync()
        out["overlapped_ms" if overlap else "serial_ms"] = (time.perf_counter() - t0) / iters * 1e3
        out["tokens_per_step"] = emitted / iters / batch
        finish_requests(engine, reqs)
    out.update({name: total / iters * 1e3 for name, total in parts.items()})  # the pipelined loop's
    return out


def _timed_part(fn: Callable, totals: dict[str, float], name: str) -> Callable:
    """``fn``, adding the seconds each call takes to ``totals[name]``."""

    def timed_fn(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    return timed_fn


def make_batch(runner: ModelRunner, batch: int, context: int, page_base: int = 1) -> Batch:
    ps = runner.pool.layout.page_size
    pages_per = -(-(context + 1) // ps)
    reqs = []
    for i in range(batch):
        r = Req(
            i,
            [(7 * i + j) % 1000 + 3 for j in range(context)],
            SamplingParams(temperature=0, max_tokens=16),
            i,
            context + 64,
        )
        r.pages = list(range(page_base + i * pages_per, page_base + (i + 1) * pages_per))
        r.num_computed = context - 1
        reqs.append(r)
    return Batch(BatchMode.DECODE, reqs, [context - 1] * batch, [context] * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        help="config directory (default: pd-make-tiny-model --preset moonlight-shape --config-only)",
    )
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--prefill-seq-len", type=int, default=2048, help="prompt length inside the prefill chunk")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--quantization", default="none", choices=["none", "fp8"], help="weights: bf16 or block-FP8"
    )
    p.add_argument(
        "--profile", help="write a kernel profile of the graph step (--profile-batch, first context) here"
    )
    p.add_argument("--profile-batch", type=int, default=64, help="the batch --profile profiles")
    p.add_argument("--profile-prefill", help="write a kernel profile of the prefill chunk here")
    p.add_argument(
        "--breakdown",
        default="",
        help="batches (e.g. 1,64; first context) whose graph step is split into kernel classes and the gap",
    )
    p.add_argument(
        "--attention-backend", default="auto", choices=ATTENTION_BACKENDS, help="as the launchers' flag"
    )
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.model is None:
        from pd.tiny_model import make_tiny_model

        args.model = str(
            make_tiny_model(Path(tempfile.mkdtemp()) / "moonlight-shape", "moonlight-shape", config_only=True)
        )
    bw, peak = measure_ceilings()
    if args.quantization == "fp8":
        peak = measure_fp8_peak()
    print(
        f"ceilings: copy {bw / 1e12:.2f} TB/s (read + write), {args.quantization} matmul {peak / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    max_b, max_ctx = max(batches), max(contexts)
    page_size = 64
    pages = max_b * (-(-(max_ctx + 1) // page_size) + 1) + 2  # a page more each: the engine loop's growth
    cfg = EngineConfig(
        args.model, device="cuda", dtype="bfloat16", load_format="dummy", quantization=args.quantization,
        page_size=page_size, num_pages=pages, attention_backend=args.attention_backend,
        max_running=max_b, chunk_size=args.prefill_tokens, max_context_len=max(max_ctx + 64, args.prefill_seq_len + 64),
    )  # fmt: skip
    t0 = time.perf_counter()
    runner = ModelRunner(cfg, ModelConfig.from_dir(args.model))
    print(f"model + KV pool + graphs ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if runner.graphs is None:
        raise SystemExit(
            "decode_step: no CUDA graphs were captured (see the attention backend warning above)"
        )
    runner.pool.buffer.normal_()  # never time on zeros
    mc = runner.model_cfg
    pb = parameter_bytes(runner)
    kv_per_token = kv_bytes_per_token(runner)
    rows, graphs = [], runner.graphs
    for ctx in contexts:
        for b in batches:
            batch = make_batch(runner, b, ctx)
            t_graph = wall(lambda batch=batch: runner.run(batch), args.iters)
            runner.graphs = None
            t_eager = wall(lambda batch=batch: runner.run(batch), max(5, args.iters // 4))
            runner.graphs = graphs
            floor = decode_floor_bytes(pb, mc, b, ctx, kv_per_token) / bw
            prepare_ms, replay_ms = graph_breakdown(runner, batch, args.iters)
            loop = engine_loop(runner, b, ctx, max(LOOP_STEPS, args.iters))
            rows.append(
                {
                    **loop,
                    "prepare_ms": prepare_ms,
                    "replay_gpu_ms": replay_ms,
                    "context": ctx,
                    "batch": b,
                    "graph_ms": t_graph * 1e3,
                    "eager_ms": t_eager * 1e3,
                    "floor_ms": floor * 1e3,
                    "graph_over_floor": t_graph / floor,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    # Prefill: one chunk of prefill_tokens tokens, prompts of prefill_seq_len tokens each.
    n_seq = args.prefill_tokens // args.prefill_seq_len
    ps = runner.pool.layout.page_size
    per = -(-args.prefill_seq_len // ps)
    reqs = []
    for i in range(n_seq):
        r = Req(
            i,
            [(3 * i + j) % 1000 + 3 for j in range(args.prefill_seq_len)],
            SamplingParams(temperature=0),
            i,
            10**6,
        )
        r.pages = list(range(1 + i * per, 1 + (i + 1) * per))
        reqs.append(r)
    prefill_batch = Batch(BatchMode.EXTEND, reqs, [0] * n_seq, [args.prefill_seq_len] * n_seq)
    t_prefill = wall(lambda: runner.run(prefill_batch), 5, warmup=2)
    flops = prefill_flops(runner, args.prefill_tokens, args.prefill_seq_len)
    prefill = {
        "tokens": args.prefill_tokens, "seq_len": args.prefill_seq_len, "ms": t_prefill * 1e3,
        "tokens_per_s": args.prefill_tokens / t_prefill, "floor_ms": flops / peak * 1e3,
        "fraction_of_peak": flops / peak / t_prefill, "tflops": flops / t_prefill / 1e12,
    }  # fmt: skip
    print(json.dumps(prefill), flush=True)
    if args.profile_prefill:
        write_profile(args.profile_prefill, lambda: runner.run(prefill_batch), 1)
    if args.profile:
        batch = make_batch(runner, args.profile_batch, contexts[0])
        write_profile(args.profile, lambda: runner.run(batch), 3)
    print_table(rows, prefill, bw, peak)
    for b in [int(x) for x in args.breakdown.split(",") if x]:
        batch = make_batch(runner, b, contexts[0])
        wall_us = wall(lambda batch=batch: runner.run(batch), args.iters) * 1e6
        classes = breakdown(kernel_times(lambda batch=batch: runner.run(batch), 3), wall_us)
        print(f"\nDecode step by kernel class, batch {b}, context {contexts[0]}: wall {wall_us:.0f} us\n")
        print(format_breakdown(classes, wall_us))
    if args.out:
        env = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": _commit(),
               "copy_tb_s": bw / 1e12, "matmul_tflops": peak / 1e12, "quantization": args.quantization}  # fmt: skip
        Path(args.out).write_text(
            json.dumps({"environment": env, "decode": rows, "prefill": prefill}, indent=2) + "\n"
        )
    runner.close()


def print_table(rows: list[dict], prefill: dict, bw: float, peak: float) -> None:
    print(
        f"\nDecode step (ms, median; host + GPU), DESIGN.md §8 shape, EP=1; floor = bytes / {bw / 1e12:.2f} TB/s\n"
    )
    print(
        "| context | batch | graph ms | of which: prepare (host) | replay (GPU) | eager ms | floor ms | graph / floor | replay / floor | eager / graph |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['graph_ms']:.2f} | {r['prepare_ms']:.2f} | {r['replay_gpu_ms']:.2f} | "
              f"{r['eager_ms']:.2f} | {r['floor_ms']:.2f} | {r['graph_over_floor']:.2f} | "
              f"{r['replay_gpu_ms'] / r['floor_ms']:.2f} | {r['eager_ms'] / r['graph_ms']:.2f} |")  # fmt: skip
    print("\nThe engine's decode loop (ms per step, mean; Engine.step without a tokenizer): one step at a time "
          "and overlapped (step N + 1 launched before step N is read)\n")  # fmt: skip
    print("| context | batch | serial ms | overlapped ms | overlapped / floor | serial / overlapped |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['serial_ms']:.2f} | {r['overlapped_ms']:.2f} | "
              f"{r['overlapped_ms'] / r['floor_ms']:.2f} | {r['serial_ms'] / r['overlapped_ms']:.2f} |")  # fmt: skip
    print(f"\nPrefill {prefill['tokens']} tokens ({prefill['seq_len']}-token prompts): {prefill['ms']:.1f} ms, "
          f"{prefill['tokens_per_s']:.0f} tok/s, {prefill['tflops']:.0f} TFLOP/s = {prefill['fraction_of_peak']:.0%} "
          f"of the measured {peak / 1e12:.0f} TFLOP/s (floor {prefill['floor_ms']:.1f} ms)")  # fmt: skip


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
