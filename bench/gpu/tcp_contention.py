"""Issue 16 experiment: why one request's KV (32 MB) takes 10x longer over Mooncake TCP under serving load.

Hypothesis: Mooncake's TCP transport copies GPU memory through the host 64 KiB at a time with a synchronous
cudaMemcpy. With prefill and decode as two processes on one GPU, each of those ~500 small copies per room
waits for the GPU to switch to its process's context (time slicing between contexts), which a busy
other process delays; a copy in the process that runs the kernels (own non-blocking stream) does not.

Measured, each mode 12 writes of 32 MB as 27 pieces (one per layer, the merged layer-major case), median
and p90 seconds:
- ``gpu->gpu``: source and destination buffers on cuda:0, over TCP (what pd does today with ``--transfer-protocol tcp``);
- ``host->host``: pinned host buffers over TCP (the wire alone);
- ``d2h``/``h2d``: one 32 MB copy between the GPU and pinned host memory on a side stream (what host staging would add),
each while the GPU is idle, while another process keeps it busy, and while this process keeps it busy.

    python bench/gpu/tcp_contention.py   # on a GPU host, Mooncake CUDA build installed
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

import torch

from pd.bench.kv_transfer import Destination
from pd.transfer.engine import TransferConfig, TransferEngine

NBYTES = 31_850_496  # one 1024-token request's KV at the DESIGN.md §8 shape
PIECES = 27
BUSY = "import torch,sys,time\na=torch.randn(8192,8192,device='cuda',dtype=torch.bfloat16)\nprint('up',flush=True)\n"
BUSY += "t=time.time()\nwhile time.time()-t<float(sys.argv[1]):\n a@a\n torch.cuda.synchronize()\n"


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1e3:8.2f} ms  p90 {xs[int(0.9 * (len(xs) - 1))] * 1e3:8.2f} ms"


def pieces(base: int, remote: int) -> list[tuple[int, int, int]]:
    size = NBYTES // PIECES
    return [(base + i * size, remote + i * size, size) for i in range(PIECES)]


def measure(mode: str, args: argparse.Namespace) -> None:
    engine = TransferEngine(TransferConfig(protocol="tcp", transfer_timeout_s=60))
    src_gpu = torch.randint(0, 255, (NBYTES,), dtype=torch.uint8, device="cuda")
    src_host = torch.empty(NBYTES, dtype=torch.uint8, pin_memory=True)
    engine.register(src_gpu.data_ptr(), NBYTES)
    engine.register(src_host.data_ptr(), NBYTES)
    dst_args = argparse.Namespace(protocol="tcp", dst_device="cuda:0")
    gpu_dst = Destination(dst_args, NBYTES)
    host_dst = Destination(argparse.Namespace(protocol="tcp", dst_device="cpu"), NBYTES)
    side = torch.cuda.Stream()
    rows: dict[str, list[float]] = {"gpu->gpu": [], "host->host": [], "d2h": [], "h2d": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        engine.write(gpu_dst.session, pieces(src_gpu.data_ptr(), gpu_dst.base))
        t1 = time.perf_counter()
        engine.write(host_dst.session, pieces(src_host.data_ptr(), host_dst.base))
        t2 = time.perf_counter()
        with torch.cuda.stream(side):
            src_host.copy_(src_gpu, non_blocking=True)
            side.synchronize()
            t3 = time.perf_counter()
            src_gpu.copy_(src_host, non_blocking=True)
            side.synchronize()
        t4 = time.perf_counter()
        for key, dt in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            rows[key].append(dt)
    for key, xs in rows.items():
        print(f"{mode:12s} {key:11s} {stats(xs)}", flush=True)
    gpu_dst.close()
    host_dst.close()


def busy_here(stop: threading.Event) -> None:
    stream = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(stream):
        while not stop.is_set():
            a @ a
            stream.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    print(f"{NBYTES / 1e6:.1f} MB in {PIECES} pieces; floor: the host->host row (TCP on 127.0.0.1)")
    measure("idle", args)
    busy = subprocess.Popen([sys.executable, "-c", BUSY, "60"], stdout=subprocess.PIPE, text=True)
    assert busy.stdout is not None and busy.stdout.readline().strip() == "up"
    measure("busy-other", args)
    busy.kill()
    busy.wait()
    stop = threading.Event()
    thread = threading.Thread(target=busy_here, args=(stop,), daemon=True)
    thread.start()
    time.sleep(1)
    measure("busy-here", args)
    stop.set()
    thread.join()


if __name__ == "__main__":
    main()
