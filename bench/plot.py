"""PNG plots of a benchmark result (`pd-bench --plot DIR`). Needs matplotlib (the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pd.bench.metrics import THROUGHPUT_WINDOW_S, BenchMetrics, RequestRecord

PLOT_FILES = ("ttft_cdf.png", "tpot_cdf.png", "output_throughput.png")


def plot_results(records: list[RequestRecord], metrics: BenchMetrics, out_dir: str | Path) -> list[Path]:
    """Writes the TTFT CDF, TPOT CDF and output throughput over time; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.ok]
    samples = {
        "ttft_cdf.png": ("TTFT", [r.ttft for r in ok if r.ttft is not None]),
        "tpot_cdf.png": ("TPOT", [r.tpot for r in ok if r.tpot is not None]),
    }
    written = []
    for name, (label, values_s) in samples.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        if values_s:
            ms = np.sort(np.asarray(values_s) * 1000.0)
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{label} CDF ({len(values_s)} requests)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)

    name = "output_throughput.png"
    timeline = metrics.output_throughput_timeline
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(np.arange(len(timeline)) * THROUGHPUT_WINDOW_S, timeline, where="post")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Output throughput per {THROUGHPUT_WINDOW_S:g} s window")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    written.append(out / name)
    return written
