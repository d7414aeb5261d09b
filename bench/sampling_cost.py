"""What a request's sampling options cost per decode step (issue 18's figures): top-5 logprobs, penalties
(repetition, frequency, presence, a logit bias), a JSON-schema grammar, and all of them, against the plain
step, at each batch size, on one GPU at the DESIGN.md §8 shape (dummy weights; the tiny tokenizer of the
``moonlight-shape`` preset gives the grammar its vocabulary).

    python -m pd.bench.sampling_cost [--batches 1,64] [--context 1024] [--iters 20] [--profile DIR] [--out FILE]

Each row: median wall ms of ``ModelRunner.run`` with the engine's ``LogitsProcessor`` (host work included:
the grammar's bitmask is filled on the host while the forward runs), every request of the batch asking
for that option, and the overhead over the plain step. The plain step's floor is ``pd.bench.decode_step``'s.
Target: logprobs and penalties <= 5% at batch 64, the grammar <= 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
from pathlib import Path

from pd.bench.decode_step import make_batch, wall
from pd.config import EngineConfig
from pd.engine.engine import Engine
from pd.grammar import GrammarSpec
from pd.tokenizer import Tokenizer
from pd.types import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
MODES = {
    "plain": SamplingParams(temperature=0, max_tokens=16),
    "top5 logprobs": SamplingParams(temperature=0, max_tokens=16, top_logprobs=5),
    "penalties + bias": SamplingParams(
        temperature=0,
        max_tokens=16,
        repetition_penalty=1.1,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        logit_bias=((5, 2.0), (9, -3.0)),
    ),
    "json schema": SamplingParams(temperature=0, max_tokens=16, grammar=GrammarSpec.json_schema(SCHEMA)),
}
MODES["all"] = dataclasses.replace(
    MODES["penalties + bias"], top_logprobs=5, grammar=MODES["json schema"].grammar
)


def profile_step(path: Path, runner, batch, logits) -> None:
    """Writes a profiler table (host and device time per op, by self CPU time) of five steps to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            runner.run(batch, logits)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code (no graphs)")
    p.add_argument(
        "--preset", default="moonlight-shape", help="pd-make-tiny-model preset (ci: a CPU smoke run)"
    )
    p.add_argument(
        "--profile",
        help="directory: a CPU + CUDA profile table of each option at the largest batch (host work shows)",
    )
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    from pd.tiny_model import make_tiny_model

    model = make_tiny_model(Path(tempfile.mkdtemp()) / args.preset, args.preset, config_only=True)
    batches = [int(b) for b in args.batches.split(",")]
    page_size = 64
    pages = max(batches) * (-(-(args.context + 1) // page_size)) + 2
    cfg = EngineConfig(
        str(model), device=args.device, dtype="bfloat16" if args.device != "cpu" else "float32", load_format="dummy", page_size=page_size,
        num_pages=pages, max_running=max(batches), max_context_len=args.context + 64,
    )  # fmt: skip
    engine = Engine(cfg, Tokenizer.from_dir(model))
    runner = engine.runner
    if runner.graphs is None and args.device != "cpu":
        raise SystemExit(
            "sampling_cost: no CUDA graphs were captured (see the attention backend warning above)"
        )
    runner.pool.buffer.normal_()  # never time on zeros
    rows = []
    for b in batches:
        plain_ms = None
        for mode, sampling in MODES.items():
            batch = make_batch(runner, b, args.context)
            for r in batch.reqs:
                r.sampling = sampling
            logits = None if mode == "plain" else engine.logits
            ms = wall(lambda batch=batch, logits=logits: runner.run(batch, logits), args.iters) * 1e3
            if args.profile and b == max(batches):
                name = re.sub(r"\W+", "_", mode)
                profile_step(Path(args.profile) / f"{name}_b{b}.txt", runner, batch, logits)
            for r in batch.reqs:
                engine.logits.release(r)
            plain_ms = ms if mode == "plain" else plain_ms
            assert plain_ms is not None
            rows.append({"batch": b, "mode": mode, "ms": ms, "overhead": ms / plain_ms - 1})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nDecode step with sampling options (ms, median wall), context {args.context}\n")
    print("| batch | option | step ms | over plain |")
    print("|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['ms']:.2f} | {r['overhead']:+.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    runner.close()


if __name__ == "__main__":
    main()
