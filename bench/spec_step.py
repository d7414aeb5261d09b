"""Speculative decoding with MTP, step by step (issue 20's figures): the draft + verify step for K = 1..3 at each
batch size against the plain decode step, on one GPU at the DESIGN.md §8 shape with an MTP layer (dummy weights).

    python -m pd.bench.spec_step [--batches 1,8,32,64] [--ks 1,2,3] [--context 1024] [--iters 20] [--out FILE]

Plain: ``ModelRunner.run`` of a decode batch (the decode CUDA graph). Speculative: ``MTPSpeculator.decode``
(the verify and draft graphs, acceptance between them, the chained drafts for K > 1, emission) under the
oracle (``--speculative-oracle``: every draft accepted, so each step emits K + 1 tokens and pays the accepted
path's full cost: random weights would accept nothing). Median wall ms, host work included; each iteration
rewinds the batch to the same context. Effective TPOT at acceptance ``a`` (each draft kept with probability
``a`` once the ones before it were): step ms / (1 + a + ... + a^K). The plain step's floor is
``pd.bench.decode_step``'s. Then the engine's loops (``pd.bench.decode_step.engine_loop``): the plain overlapped
loop users run without MTP, and the speculative loop serial and pipelined (``Engine.pipelined``: each verify step
launched before the host postprocesses the one before). Target: at a = 0.8 and K = 1, TPOT <= 0.65x the plain
TPOT at batch 1-32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from pd.attention import ATTENTION_BACKENDS
from pd.attention.triton_mla import TritonMLABackend
from pd.bench.decode_step import (
    LOOP_STEPS,
    decode_floor_bytes,
    engine_loop,
    experts_hit,
    kernel_times,
    kv_bytes_per_token,
    measure_ceilings,
    parameter_bytes,
    timed,
    wall,
)
from pd.bench.kernel_classes import breakdown, format_breakdown
from pd.config import EngineConfig
from pd.engine.decode_graph import DecodeGraphs, default_buckets
from pd.engine.engine import Engine
from pd.engine.speculative import MTPSpeculator, lookahead
from pd.engine.verify_graph import VerifyGraphs
from pd.model.mtp import DeepseekV3WithMTP
from pd.speculative import SpeculativeConfig
from pd.types import Batch, BatchMode, Req, SamplingParams, StepResult

ACCEPTANCE = (0.6, 0.7, 0.8, 0.9)


def make_reqs(engine: Engine, batch: int, context: int, k: int) -> list[Req]:
    """``batch`` requests of ``context`` computed tokens on their own pages, room for a step's drafts."""
    layout = engine.runner.pool.layout
    per = layout.pages_for(context + 2 * k + 1)
    reqs = []
    for i in range(batch):
        r = Req(i, [(7 * i + j) % 1000 + 3 for j in range(context)], SamplingParams(temperature=0, max_tokens=1 << 20),
                i, context + 64)  # fmt: skip
        r.pages = list(range(1 + i * per, 1 + (i + 1) * per))
        r.num_computed = context - 1
        reqs.append(r)
    return reqs


def spec_step(spec: MTPSpeculator, reqs: list[Req], context: int) -> int:
    """One speculative step over ``reqs`` rewound to ``context`` tokens; returns the tokens it emitted."""
    emitted = 0

    def postprocess(step: Batch, result: StepResult) -> list:
        nonlocal emitted
        for r, t in zip(step.reqs, result.tokens):
            assert t is not None
            r.output_ids.append(t)
            r.num_computed = r.seq_len - 1
            emitted += 1
        return []

    for r in reqs:
        del r.output_ids[:]
        r.num_computed = context - 1
        spec.drafter.drafts.setdefault(r, [3] * spec.k)
    spec.decode(Batch(BatchMode.DECODE, reqs, [context - 1] * len(reqs), [context] * len(reqs)), postprocess)
    return emitted


def step_floors(pb: dict, cfg, batch: int, k: int, context: int, kv_per_token: int) -> tuple[float, float]:
    """Bytes that a plain decode step and a K-draft greedy speculative step (verify of ``K + 1`` tokens a row, the
    MTP layer over them, ``K - 1`` chained drafts) read at least (``pd.bench.decode_step``'s floor: routed experts
    hit as the dummy weights' uniform routing hits them; ``pb``: its ``parameter_bytes``). Each sequence's KV is
    read once a layer; verify rows of one sequence hit more distinct experts than one row does, so at small batches
    the speculative step's floor grows nearly with its tokens."""
    plain = decode_floor_bytes(pb, cfg, batch, context, kv_per_token)
    kv = batch * context * kv_per_token
    rows = batch * (k + 1)

    def mtp_layer(tokens: int) -> float:  # its dense weights, the experts hit, lm_head, its own KV layer
        return (
            pb["mtp_dense"]
            + experts_hit(cfg, tokens) * pb["per_expert"]
            + pb["head"]
            + kv / cfg.num_hidden_layers
        )

    verify = decode_floor_bytes(pb, cfg, rows, 0, 0) + kv
    return plain, verify + mtp_layer(rows) + (k - 1) * mtp_layer(batch)


def tokens_per_step(acceptance: float, k: int) -> float:
    """Tokens a step emits when each draft is kept with probability ``acceptance`` once the ones before it were."""
    return sum(acceptance**i for i in range(k + 1))


def spec_replay_ms(graphs: VerifyGraphs, batch: int, k: int, iters: int) -> float:
    """GPU ms of a greedy speculative step's replays alone (the step graph, then its K - 1 chain graphs), on the
    inputs the last step loaded: what a step costs once no host work stands between replays."""
    bs = graphs.bucket(batch)

    def replays() -> None:
        graphs.graphs.replay((bs, "greedy"))
        for j in range(1, k):
            graphs.graphs.replay((bs, f"chain{j}"))

    return timed(replays, iters) * 1e3


def print_tables(rows: list[dict], context: int) -> None:
    """The speculative rows against their batch's plain row: serial steps, floors and replays alone, and (on a
    GPU) against the overlapped plain loop."""
    plain = {r["batch"]: r for r in rows if r["k"] == 0}
    spec = [r for r in rows if r["k"]]
    print(f"\nMTP draft + verify step (ms, median wall), context {context}; TPOT ratio = TPOT / plain step\n")
    head = " | ".join(f"TPOT at {a} (ratio)" for a in ACCEPTANCE)
    print(f"| batch | K | step ms | plain ms | oracle tokens/step | oracle TPOT ms | {head} |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(ACCEPTANCE))
    for r in spec:
        base = plain[r["batch"]]["step_ms"]
        cells = " | ".join(f"{r[f'tpot_at_{a}']:.2f} ({r[f'tpot_at_{a}'] / base:.2f}x)" for a in ACCEPTANCE)
        print(f"| {r['batch']} | {r['k']} | {r['step_ms']:.2f} | {base:.2f} | {r['tokens_per_step']:.2f} | "
              f"{r['oracle_tpot_ms']:.2f} | {cells} |")  # fmt: skip
    print(
        "\nFloors (bytes / copy bandwidth; routed experts hit as uniform routing hits them) and, on a GPU, the "
        "replays alone (no host work between steps: the bound of a loop that overlaps it), ms; TPOT ratio at 0.8 = "
        "spec / tokens a step at 0.8 / plain\n"
    )
    print("| batch | K | spec floor | plain floor | floor TPOT ratio at 0.8 | spec replay | plain replay | "
          "replay TPOT ratio at 0.8 |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in spec:
        per = tokens_per_step(0.8, r["k"])
        cells = [f"{r['floor_ms']:.2f}", f"{r['plain_floor_ms']:.2f}",
                 f"{r['floor_ms'] / per / r['plain_floor_ms']:.2f}x"]  # fmt: skip
        if "replay_ms" in r:
            base = plain[r["batch"]]["replay_ms"]
            cells += [f"{r['replay_ms']:.2f}", f"{base:.2f}", f"{r['replay_ms'] / per / base:.2f}x"]
        else:
            cells += ["-"] * 3
        print(f"| {r['batch']} | {r['k']} | {' | '.join(cells)} |")
    if not all("loop_ms" in plain[r["batch"]] for r in spec):
        return
    print(
        "\nThe engine's loops (Engine.step: schedule, run, postprocess; the oracle: K + 1 tokens a step), ms a "
        "step: the speculative loop serial and pipelined (each verify step launched before the host postprocesses "
        "the one before); TPOT ratio = pipelined loop / tokens a step at each acceptance / the plain overlapped "
        "loop (the plain decode users run)\n"
    )
    print(f"| batch | K | plain loop ms | spec serial ms | spec pipelined ms | pipelined host: launch / read "
          f"(wait incl.) / emit ms | {' | '.join(f'at {a}' for a in ACCEPTANCE)} |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---|" + "---:|" * len(ACCEPTANCE))
    for r in spec:
        base = plain[r["batch"]]["loop_ms"]
        cells = " | ".join(f"{r['loop_ms'] / tokens_per_step(a, r['k']) / base:.2f}x" for a in ACCEPTANCE)
        host = " / ".join(f"{r[f'loop_{part}_ms']:.2f}" for part in ("launch", "read", "emit"))
        print(f"| {r['batch']} | {r['k']} | {base:.2f} | {r['loop_serial_ms']:.2f} | {r['loop_ms']:.2f} | {host} | "
              f"{cells} |")  # fmt: skip


def print_classes(what: str, step, iters: int) -> None:
    """``step``'s wall time split into kernel classes and the gap (``pd.bench.kernel_classes``)."""
    wall_us = wall(step, iters) * 1e6
    print(f"\n{what}, by kernel class: wall {wall_us:.0f} us\n")
    print(format_breakdown(breakdown(kernel_times(step, 3), wall_us), wall_us), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--ks", default="1,2,3")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--breakdown",
        default="",
        help="batches (e.g. 1,32) whose plain and K = 1 steps are split into kernel classes and the gap",
    )
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the same steps (graphs uncaptured)")
    p.add_argument(
        "--preset", default="moonlight-shape", help="pd-make-tiny-model preset (ci: a CPU smoke run)"
    )
    p.add_argument(
        "--attention-backend", default="auto", choices=ATTENTION_BACKENDS, help="as the launchers' flag"
    )
    p.add_argument(
        "--split-sequences",
        type=int,
        help="triton backend: the most sequences a speculative step runs on pd's split kernel (a bucket size; "
        "default the backend's); the plain rows keep the default",
    )
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    from pd.tiny_model import make_tiny_model

    model = make_tiny_model(
        Path(tempfile.mkdtemp()) / args.preset, args.preset, config_only=True, with_mtp=True
    )
    gpu = args.device != "cpu"
    batches, ks = [int(b) for b in args.batches.split(",")], [int(k) for k in args.ks.split(",")]
    page_size, max_k = 64, max(ks)
    # The engine loops' requests decode LOOP_STEPS steps and a warm-up, K + 1 tokens a step, pages reserved ahead.
    headroom = (LOOP_STEPS + 8) * (max_k + 1) + lookahead(SpeculativeConfig("mtp", max_k), pipelined=True)
    per = -(-(args.context + headroom) // page_size)
    cfg = EngineConfig(
        str(model), device=args.device, dtype="bfloat16" if gpu else "float32", load_format="dummy", page_size=page_size,
        num_pages=max(batches) * per + 2, max_running=max(batches), max_context_len=args.context + headroom,
        speculative=SpeculativeConfig("mtp", max_k, oracle=True), attention_backend=args.attention_backend,
    )  # fmt: skip
    engine = Engine(cfg)
    runner = engine.runner
    bw = measure_ceilings()[0] if gpu else 4.25e12  # CPU smoke runs: an H200's copy bandwidth
    assert isinstance(runner.model, DeepseekV3WithMTP)
    if gpu and runner.verify_graphs is None:
        raise SystemExit("spec_step: no CUDA graphs were captured (see the attention backend warning above)")
    runner.close()  # the engine's verify graphs (K = max): each K gets its own below
    runner.pool.buffer.normal_()  # never time on zeros
    buckets = default_buckets(max(batches))
    rows = []
    if gpu:
        runner.graphs = DecodeGraphs(runner.model, runner.attn, runner.pool, buckets, runner.context_len)
    pb, kv_per_token = parameter_bytes(runner), kv_bytes_per_token(runner)
    plain_cfg = dataclasses.replace(cfg, speculative=SpeculativeConfig())  # what a user runs without MTP
    for b in batches:
        reqs = make_reqs(engine, b, args.context, 0)
        batch = Batch(BatchMode.DECODE, reqs, [args.context - 1] * b, [args.context] * b)
        ms = wall(lambda batch=batch: runner.run(batch), args.iters) * 1e3
        rows.append({"batch": b, "k": 0, "step_ms": ms, "tokens_per_step": 1.0})
        if gpu:  # the last step's inputs are loaded: the GPU time of its replay alone; the overlapped loop
            bs = runner.graphs.bucket(b)
            rows[-1]["replay_ms"] = timed(lambda bs=bs: runner.graphs.graphs.replay(bs), args.iters) * 1e3
            rows[-1]["loop_ms"] = engine_loop(runner, b, args.context, LOOP_STEPS, plain_cfg)["overlapped_ms"]
        print(json.dumps(rows[-1]), flush=True)
    runner.close()
    splits = [int(b) for b in args.breakdown.split(",") if b] if gpu else []
    for b in splits:  # the plain step's classes, for the K = 1 ones below
        runner.graphs = DecodeGraphs(runner.model, runner.attn, runner.pool, buckets, runner.context_len)
        reqs = make_reqs(engine, b, args.context, 0)
        batch = Batch(BatchMode.DECODE, reqs, [args.context - 1] * b, [args.context] * b)
        print_classes(f"plain decode step, batch {b}", lambda batch=batch: runner.run(batch), args.iters)
        runner.close()
    if args.split_sequences is not None:
        if not isinstance(runner.attn, TritonMLABackend) or args.split_sequences not in buckets:
            raise SystemExit(f"--split-sequences needs the triton backend and a bucket size ({buckets})")
        runner.attn.split_sequences = runner.attn.split_verify_sequences = args.split_sequences
    for k in ks:
        runner.verify_graphs = VerifyGraphs(
            runner.model, runner.attn, runner.pool, buckets, runner.context_len, k, oracle=True, capture=gpu
        )
        spec = MTPSpeculator(runner, engine.logits, SpeculativeConfig("mtp", k, oracle=True))
        for b in batches:
            reqs = make_reqs(engine, b, args.context, k)
            tokens: list[int] = []
            ms = (
                wall(lambda r=reqs, t=tokens, s=spec: t.append(spec_step(s, r, args.context)), args.iters)
                * 1e3
            )
            per_step = tokens[-1] / b
            row = {
                "batch": b,
                "k": k,
                "step_ms": ms,
                "tokens_per_step": per_step,
                "oracle_tpot_ms": ms / per_step,
            }
            for a in ACCEPTANCE:
                row[f"tpot_at_{a}"] = ms / tokens_per_step(a, k)
            plain_b, spec_b = step_floors(pb, runner.model_cfg, b, k, args.context, kv_per_token)
            row["floor_ms"], row["plain_floor_ms"] = spec_b / bw * 1e3, plain_b / bw * 1e3
            if gpu:
                row["replay_ms"] = spec_replay_ms(runner.verify_graphs, b, k, args.iters)
            spec_cfg = dataclasses.replace(cfg, speculative=SpeculativeConfig("mtp", k, oracle=True))
            loop = engine_loop(runner, b, args.context, LOOP_STEPS if gpu else args.iters, spec_cfg)
            row["loop_serial_ms"], row["loop_ms"] = loop["serial_ms"], loop["overlapped_ms"]
            row["loop_tokens_per_step"] = loop["tokens_per_step"]
            row.update({f"loop_{part}_ms": loop[f"{part}_ms"] for part in ("launch", "read", "emit")})
            rows.append(row)
            print(json.dumps(row), flush=True)
            if k == 1 and b in splits:
                what = f"MTP step (K = 1, oracle), batch {b}"
                print_classes(what, lambda r=reqs, s=spec: spec_step(s, r, args.context), args.iters)
        runner.close()
        if gpu:
            torch.cuda.empty_cache()
    print_tables(rows, args.context)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    runner.close()


if __name__ == "__main__":
    main()
