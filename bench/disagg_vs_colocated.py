"""Disaggregated (1P1D) vs colocated serving on two GPUs, end to end through the proxy.

    python -m pd.bench.disagg_vs_colocated --systems 1p1d,colocated --out-dir DIR

- ``1p1d``: a prefill instance on GPU 0 and a decode instance on GPU 1, KV over Mooncake's NVLink path.
- ``colocated``: two colocated instances (prefill and decode in one engine), one per GPU, behind the proxy.
- ``2p2d``: a 2-rank prefill instance (GPUs 0-1, normal EP dispatch) and a 2-rank decode instance
  (GPUs 2-3, low-latency EP dispatch in CUDA graphs), DP attention + EP 2 each (needs 4 GPUs).

Both serve the DESIGN.md §8 shape with dummy weights. For each workload (input/output lengths, random
dataset) the request rate is swept upward until the system saturates; each point reports TTFT and
TPOT percentiles and goodput under the SLO (default TTFT <= 2 s and TPOT <= 50 ms). The headline is
the highest offered rate a system sustains at the SLO (>= 90% of its requests meet the SLO, none fail).
With ``--device cpu --model DIR`` the same script runs on the tiny model (a smoke test of the script).
Each point keeps its requests' TTFT and TPOT; ``--plot-from disagg_*.json`` draws the experiment's PNGs
(latency percentiles and goodput against the offered rate, TTFT/TPOT CDFs per rate; needs matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pd.bench.serve import BenchConfig, run_benchmark

SUSTAINED = 0.9  # share of requests meeting the SLO at which a rate counts as sustained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shape_model(max_positions: int) -> str:
    """The §8 shape (config and tokenizer only; dummy weights), with room for the longest workload."""
    from pd.tiny_model import make_tiny_model

    path = make_tiny_model(Path(tempfile.mkdtemp()) / "moonlight-shape", "moonlight-shape", config_only=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_positions)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(path)


def pd_serve_command(model: str, port: int, device: str) -> list[str]:
    """pd-serve of ``model`` as "bench" on ``port``; on CUDA with dummy bf16 weights (the §8 shape has no files)."""
    cmd = [
        sys.executable,
        "-m",
        "pd.launch.serve",
        "--model",
        model,
        "--model-name",
        "bench",
        "--port",
        str(port),
    ]
    cmd += ["--device", device]
    if device == "cuda":
        cmd += ["--load-format", "dummy", "--dtype", "bfloat16"]
    return cmd


def serve_command(system: str, args: argparse.Namespace, model: str, port: int) -> list[str]:
    cmd = pd_serve_command(model, port, args.device)
    cmd += ["--page-size", str(args.page_size), "--chunk-size", str(args.chunk_size)]
    cmd += ["--max-running", str(args.max_running), "--max-context-len", str(args.max_context_len)]
    cmd += ["--ready-timeout", "900"]
    if system == "1p1d":
        if args.device == "cuda":
            cmd += [
                "--prefill-device",
                "cuda:0",
                "--decode-device",
                "cuda:1",
                "--transfer-protocol",
                "nvlink",
            ]
    elif system == "colocated":
        cmd += ["--colocated", "2"]
    elif system == "2p2d":
        cmd += ["--dp", "2", "--ep", "2"]
        if args.device == "cuda":
            cmd += [
                "--prefill-device",
                "cuda:0",
                "--decode-device",
                "cuda:2",
                "--transfer-protocol",
                "nvlink",
            ]
    else:
        raise SystemExit(f"unknown system {system!r}; expected 1p1d, colocated or 2p2d")
    return cmd


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pd-serve exited with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 and r.json().get("models"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def point(url: str, args: argparse.Namespace, in_len: int, out_len: int, rate: float, warmups: int) -> dict:
    num = max(args.min_prompts, int(rate * args.seconds_per_rate))
    cfg = BenchConfig(
        base_url=url,
        model="bench",
        random_input_len=in_len,
        random_output_len=out_len,
        random_vocab_size=1000,  # what every recorded run drew below (the models here all know these ids)
        num_prompts=num,
        request_rate=rate,
        num_warmups=warmups,
        ignore_eos=True,
        seed=int(rate * 1000) + in_len,
        slo_ms={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms},
        request_timeout=args.request_timeout,
        disable_tqdm=True,
        # Dummy weights sample ids the small tokenizer cannot spell: count tokens by their ids.
        extra_body={"return_token_ids": True},
    )
    result = asyncio.run(run_benchmark(cfg))
    m = result.metrics
    return {
        "rate": rate,
        "num_prompts": num,
        "completed": m.completed,
        "failed": m.failed,
        "request_throughput": m.request_throughput,
        "goodput": m.goodput,
        "slo_attainment": (m.good_requests or 0) / num,
        "output_throughput": m.output_throughput,
        "ttft_ms": {"p50": m.ttft.median, "p90": m.ttft.p90, "p99": m.ttft.p99},
        "tpot_ms": {"p50": m.tpot.median, "p90": m.tpot.p90, "p99": m.tpot.p99},
        "errors": m.errors,
        # Per request, in seconds (None: failed, or no TPOT for a single token): for the CDF plots.
        "requests": [[r.ttft, r.tpot] for r in result.records],
    }


def sweep_system(
    system: str,
    args: argparse.Namespace,
    model: str,
    workloads: list[tuple[int, int, list[float]]],
    log_dir: Path,
) -> dict:
    port = free_port()
    log = log_dir / f"pd-serve-{system}.log"
    proc = subprocess.Popen(
        serve_command(system, args, model, port),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    results: dict = {"system": system, "workloads": []}
    started = time.monotonic()
    try:
        wait_healthy(url, proc, args.ready_timeout)
        print(f"[{system}] up in {time.monotonic() - started:.0f} s", flush=True)
        for in_len, out_len, rates in workloads:
            points, warmups = [], 2
            for rate in rates:
                if time.monotonic() - started > args.budget_s:
                    print(f"[{system}] time budget spent; stopping the sweep", flush=True)
                    break
                p = point(url, args, in_len, out_len, rate, warmups)
                warmups = 0
                points.append(p)
                print(f"[{system}] {in_len}/{out_len} " + json.dumps(p), flush=True)
                if p["slo_attainment"] < 0.5:
                    break  # saturated well past the SLO: higher rates only queue up
            results["workloads"].append({"input": in_len, "output": out_len, "points": points})
    finally:
        stop(proc)
    return results


def stop(proc: subprocess.Popen, grace_s: float = 90) -> None:
    """Stops a pd-serve this benchmark started (SIGTERM, then SIGKILL after ``grace_s``)."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def sustained_rate(points: list[dict]) -> float:
    ok = [p["rate"] for p in points if p["slo_attainment"] >= SUSTAINED and p["failed"] == 0]
    return max(ok, default=0.0)


def _by_workload(all_results: list[dict]) -> dict[tuple[int, int], dict[str, list[dict]]]:
    """{(input, output): {system: points}} from the per-system sweep results."""
    by_workload: dict[tuple[int, int], dict[str, list[dict]]] = {}
    for res in all_results:
        for w in res["workloads"]:
            by_workload.setdefault((w["input"], w["output"]), {})[res["system"]] = w["points"]
    return by_workload


def report(all_results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"SLO: TTFT <= {args.slo_ttft_ms:.0f} ms and TPOT <= {args.slo_tpot_ms:.0f} ms; a rate is sustained when "
        f">= {SUSTAINED:.0%} of its requests meet the SLO and none fails.",
        "",
    ]
    by_workload = _by_workload(all_results)
    for (in_len, out_len), systems in by_workload.items():
        lines += [f"### input {in_len} / output {out_len}", ""]
        lines += [
            "| system | rate req/s | done | failed | throughput req/s | goodput req/s | SLO met | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms |"
        ]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for system, points in systems.items():
            for p in points:
                t, o = p["ttft_ms"], p["tpot_ms"]
                lines.append(
                    f"| {system} | {p['rate']:g} | {p['completed']} | {p['failed']} | {p['request_throughput']:.2f} | "
                    f"{(p['goodput'] or 0):.2f} | {p['slo_attainment']:.0%} | {_pcts(t)} | {_pcts(o)} |"
                )
        rates = {s: sustained_rate(p) for s, p in systems.items()}
        lines += ["", "Sustained at the SLO: " + ", ".join(f"{s} {r:g} req/s" for s, r in rates.items())]
        if rates.get("colocated") and "1p1d" in rates:
            lines.append(f"1P1D / colocated: {rates['1p1d'] / rates['colocated']:.2f}x")
        lines.append("")
    return "\n".join(lines)


def _pcts(d: dict) -> str:
    return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in ("p50", "p90", "p99"))


def plot_sweeps(all_results: list[dict], out_dir: Path, slo_ttft_ms: float, slo_tpot_ms: float) -> list[Path]:
    """Per workload: TTFT and TPOT percentiles and goodput against the offered rate for every system (SLO
    lines dashed), and per system the TTFT and TPOT CDFs of each rate. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    by_workload = _by_workload(all_results)
    written = []
    for (in_len, out_len), systems in by_workload.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for color, (system, points) in enumerate(systems.items()):
            rates = [p["rate"] for p in points]
            for ax, key in zip(axes[:2], ("ttft_ms", "tpot_ms")):
                for pct, style in (("p50", "-o"), ("p90", "--s")):
                    values = [p[key][pct] for p in points]
                    ax.plot(rates, values, style, color=f"C{color}", label=f"{system} {pct}")
            axes[2].plot(rates, [p["goodput"] or 0.0 for p in points], "-o", color=f"C{color}", label=system)
        for ax, slo, title in ((axes[0], slo_ttft_ms, "TTFT (ms)"), (axes[1], slo_tpot_ms, "TPOT (ms)")):
            ax.axhline(slo, color="grey", linestyle=":", label="SLO")
            ax.set_title(title)
            ax.set_yscale("log")
        axes[2].set_title("goodput at the SLO (req/s)")
        for ax in axes:
            ax.set_xlabel("offered rate (req/s)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"input {in_len} / output {out_len}")
        fig.tight_layout()
        written.append(out_dir / f"disagg_vs_colocated_{in_len}_{out_len}.png")
        fig.savefig(written[-1])
        plt.close(fig)
        for system, points in systems.items():
            if not any(p.get("requests") for p in points):
                continue  # older results without per-request samples
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for p in points:
                for ax, col in zip(axes, (0, 1)):
                    ms = sorted(r[col] * 1000.0 for r in p.get("requests", []) if r[col] is not None)
                    if ms:
                        ax.step(
                            ms,
                            [(i + 1) / len(ms) for i in range(len(ms))],
                            where="post",
                            label=f"{p['rate']:g} req/s",
                        )
            for ax, slo, title in ((axes[0], slo_ttft_ms, "TTFT"), (axes[1], slo_tpot_ms, "TPOT")):
                ax.axvline(slo, color="grey", linestyle=":")
                ax.set_xscale("log")
                ax.set_xlabel(f"{title} (ms)")
                ax.set_ylabel("fraction of requests")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f"{system}, input {in_len} / output {out_len}: CDFs per offered rate")
            fig.tight_layout()
            written.append(out_dir / f"cdf_{system}_{in_len}_{out_len}.png")
            fig.savefig(written[-1])
            plt.close(fig)
    return written


def parse_workloads(text: str, rates: str) -> list[tuple[int, int, list[float]]]:
    out = []
    for item, rate_list in zip(text.split(","), rates.split(";")):
        i, o = (int(v) for v in item.split(":"))
        out.append((i, o, [float(r) for r in rate_list.split(",")]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default="1p1d,colocated")
    p.add_argument("--workloads", default="2048:256,8192:128", help="input:output lengths, comma separated")
    p.add_argument(
        "--rates", default="4,8,12,16,24,32;1,2,4,6,8,12", help="rates per workload, ';' between workloads"
    )
    p.add_argument("--model", help="model directory (default: the §8 shape, dummy weights)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--max-running", type=int, default=128)
    p.add_argument("--max-context-len", type=int, default=8448)
    p.add_argument("--seconds-per-rate", type=float, default=12.0)
    p.add_argument("--min-prompts", type=int, default=16)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--budget-s", type=float, default=400.0, help="stop a system's sweep after this long")
    p.add_argument("--out-dir", default=".")
    p.add_argument(
        "--plot-from", nargs="+", type=Path, help="draw the PNGs of saved disagg_*.json into --out-dir"
    )
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        saved = [json.loads(path.read_text()) for path in args.plot_from]
        for path in plot_sweeps(saved, out, args.slo_ttft_ms, args.slo_tpot_ms):
            print(f"wrote {path}")
        return
    model = args.model or shape_model(args.max_context_len)
    workloads = parse_workloads(args.workloads, args.rates)
    results = []
    for system in args.systems.split(","):
        results.append(sweep_system(system, args, model, workloads, out))
        (out / f"disagg_{system}.json").write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **results[-1],
                },
                indent=2,
            )
        )
    text = report(results, args)
    print(text)
    (out / "disagg_vs_colocated.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
