"""Disaggregation overhead: TTFT/TPOT through pd-serve (proxy -> prefill -> Mooncake -> decode)
against the in-process reference engine on the same prompt, sequential requests.

    python -m pd.bench.overhead [--model DIR] [--device cpu] [--requests 20] [--out FILE]

Without --model it uses the tiny demo model. Prints a markdown table; medians over the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pd.bench.datasets import SampleRequest
from pd.bench.serve import BenchConfig, run_benchmark


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_engine(
    model: str, device: str, prompt: list[int], n_out: int, requests: int
) -> tuple[float, float]:
    """Median TTFT and TPOT (seconds) of the colocated reference engine, one request at a time."""
    from pd.config import EngineConfig
    from pd.engine.engine import Engine
    from pd.types import SamplingParams

    engine = Engine(EngineConfig(model, device=device))
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    ttfts, tpots = [], []
    for i in range(requests + 2):  # two warm-ups
        t0 = time.perf_counter()
        engine.add_request(prompt, params)
        first = last = None
        while engine.has_work():
            if engine.step():
                last = time.perf_counter()
                first = first or last
        if i >= 2:
            ttfts.append(first - t0)
            tpots.append((last - first) / (n_out - 1))
    return statistics.median(ttfts), statistics.median(tpots)


def through_pd_serve(
    model: str, device: str, prompt: list[int], n_out: int, requests: int
) -> tuple[float, float]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="pd-overhead-")) / "pd-serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pd.launch.serve", "--model", model, "--device", device, "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pd-serve did not come up; log: {log}")
            time.sleep(0.3)
        cfg = BenchConfig(
            base_url=url,
            num_warmups=2,
            max_concurrency=1,
            ignore_eos=True,
            disable_tqdm=True,
            request_timeout=120,
        )
        samples = [SampleRequest(prompt, len(prompt), n_out) for _ in range(requests)]
        result = asyncio.run(run_benchmark(cfg, requests=samples))
        ok = [r for r in result.records if r.ok]
        if len(ok) != requests:
            raise RuntimeError(f"{requests - len(ok)} requests failed: {result.metrics}")
        return statistics.median(r.ttft for r in ok), statistics.median(r.tpot for r in ok)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the tiny demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args()
    if args.model is None:
        from pd.launch.serve import demo_model_dir

        args.model = str(demo_model_dir())
    prompt = [3 + (i * 7919) % 900 for i in range(args.prompt_tokens)]
    ref_ttft, ref_tpot = reference_engine(args.model, args.device, prompt, args.output_tokens, args.requests)
    pd_ttft, pd_tpot = through_pd_serve(args.model, args.device, prompt, args.output_tokens, args.requests)
    lines = [
        f"Date {datetime.date.today()}, host {platform.node()} ({platform.processor() or platform.machine()}), "
        f"device {args.device}, model {Path(args.model).name}, prompt {args.prompt_tokens} tokens, "
        f"output {args.output_tokens} tokens, median of {args.requests} sequential requests (2 warm-ups).",
        "",
        "| path | TTFT ms | TPOT ms |",
        "|---|---:|---:|",
        f"| reference engine (in process) | {ref_ttft * 1e3:.2f} | {ref_tpot * 1e3:.2f} |",
        f"| pd-serve (HTTP -> proxy -> prefill -> Mooncake TCP -> decode -> SSE) | {pd_ttft * 1e3:.2f} | {pd_tpot * 1e3:.2f} |",
        f"| disaggregation overhead | {(pd_ttft - ref_ttft) * 1e3:+.2f} | {(pd_tpot - ref_tpot) * 1e3:+.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
