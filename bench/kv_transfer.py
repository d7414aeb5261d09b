"""KV transfer bandwidth: page-by-page writes vs merged page runs, both pool axis orders.

Shape (DESIGN.md §8): 27 layers, MLA latent 512 + 64 = 576 bf16 values per token per layer;
prompts of 1K/4K/16K tokens, page sizes 1/16/64. Two processes: this one holds the source pool
(prefill) and writes; a child holds the destination pool (decode). Destination pages are
contiguous, so "merged" is the best case of run merging (one piece per layer for layer-major,
one piece in all for page-major) and "page" is one write per page per layer.

The floor printed beside each figure is the engine's own rate for one single piece of the same
total bytes over the same link (for CPU loopback TCP that is the ceiling we can reach); each
figure is also given as a fraction of it. Every measured configuration is checked byte-exact
(sha256 of the written ranges on both sides). Timed: ``TransferEngine.write`` only (the piece
list is built before), best of ``--repeats``, each repeat timing the floor piece and then the
configuration, so both see the same machine load.

    python -m pd.bench.kv_transfer                                # CPU, TCP on 127.0.0.1
    python -m pd.bench.kv_transfer --device cuda --protocol nvlink  # source on cuda:0, destination on cuda:1
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

import torch

from pd.kv_cache import KVLayout, KVOrder, transfer_pieces
from pd.transfer.engine import TransferConfig, TransferEngine

NUM_LAYERS = 27
LATENT_DIM = 512 + 64
DTYPE = torch.bfloat16
SLOW_PIECES = 50_000  # configurations with more pieces are timed once


def layout_for(tokens: int, page_size: int, order: KVOrder) -> KVLayout:
    """A pool just big enough for ``tokens`` (plus the dummy page 0)."""
    pages = -(-tokens // page_size) + 1
    return KVLayout(NUM_LAYERS, pages, page_size, LATENT_DIM, DTYPE, order)


def page_pieces(layout: KVLayout, pages: list[int]) -> list[tuple[int, int, int]]:
    """One piece per page per layer (no merging)."""
    n = layout.page_nbytes_per_layer
    return [
        (layout.offset(layer, p), layout.offset(layer, p), n)
        for layer in range(layout.num_layers)
        for p in pages
    ]


def digest(buffer: torch.Tensor, ranges: list[tuple[int, int]]) -> str:
    h = hashlib.sha256()
    for offset, nbytes in ranges:
        h.update(buffer[offset : offset + nbytes].cpu().numpy().tobytes())
    return h.hexdigest()


def serve(args: argparse.Namespace) -> None:
    """The destination process: a registered buffer, driven by JSON lines on stdin."""
    if args.dst_device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.dst_device))
    engine = TransferEngine(TransferConfig(protocol=args.protocol, transfer_timeout_s=30))
    buffer = torch.zeros(args.nbytes, dtype=torch.uint8, device=args.dst_device)
    engine.register(buffer.data_ptr(), buffer.numel())
    print(json.dumps({"session": engine.session_id, "base": buffer.data_ptr()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "zero":
            buffer.zero_()
            if buffer.is_cuda:
                torch.cuda.synchronize()
            print(json.dumps({"ok": True}), flush=True)
        elif cmd["op"] == "digest":
            print(json.dumps({"digest": digest(buffer, cmd["ranges"])}), flush=True)
        else:
            break


class Destination:
    def __init__(self, args: argparse.Namespace, nbytes: int) -> None:
        cmd = [sys.executable, "-m", "pd.bench.kv_transfer", "--serve", "--nbytes", str(nbytes)]
        cmd += ["--protocol", args.protocol, "--dst-device", args.dst_device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        info = self._read()
        self.session, self.base = info["session"], info["base"]

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the destination process exited")
        return json.loads(line)

    def call(self, **cmd: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def timed_pair(
    engine: TransferEngine,
    session: str,
    pieces: list[tuple[int, int, int]],
    floor_piece: tuple[int, int, int],
    repeats: int,
) -> tuple[float, float]:
    """Best seconds of ``pieces`` and of the single floor piece, measured alternately (same conditions)."""
    best, floor = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.write(session, [floor_piece])
        t1 = time.perf_counter()
        engine.write(session, pieces)
        t2 = time.perf_counter()
        floor, best = min(floor, t1 - t0), min(best, t2 - t1)
    return best, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--protocol", choices=("tcp", "rdma", "nvlink"), default="tcp")
    parser.add_argument("--src-device", default=None, help="default: cpu, or cuda:0 with --device cuda")
    parser.add_argument("--dst-device", default=None, help="default: cpu, or cuda:1 with --device cuda")
    parser.add_argument("--tokens", default="1024,4096,16384")
    parser.add_argument("--page-sizes", default="1,16,64")
    parser.add_argument("--orders", default="layer_major,page_major")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.src_device = args.src_device or ("cuda:0" if args.device == "cuda" else "cpu")
    args.dst_device = args.dst_device or ("cuda:1" if args.device == "cuda" else "cpu")
    if args.serve:
        serve(args)
        return

    tokens = [int(t) for t in args.tokens.split(",")]
    page_sizes = [int(p) for p in args.page_sizes.split(",")]
    orders = [KVOrder(o) for o in args.orders.split(",")]
    nbytes = max(layout_for(t, p, KVOrder.LAYER_MAJOR).nbytes for t in tokens for p in page_sizes)

    if args.src_device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.src_device))
    engine = TransferEngine(TransferConfig(protocol=args.protocol, transfer_timeout_s=30))
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=args.src_device)
    engine.register(src.data_ptr(), src.numel())
    dst = Destination(args, nbytes)
    lines = [
        "# KV transfer bandwidth",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        f"- devices: source {args.src_device}, destination {args.dst_device}"
        + (
            f" ({torch.cuda.get_device_name(torch.device(args.src_device))})" if args.device == "cuda" else ""
        ),
        f"- transport: asked {args.protocol}, engine installed {engine.transport}; "
        f"mooncake {_mooncake_version()}, torch {torch.__version__}",
        f"- shape: {NUM_LAYERS} layers x {LATENT_DIM} bf16 per token per layer "
        f"({NUM_LAYERS * LATENT_DIM * 2} bytes per token); destination pages contiguous; "
        f"best of {args.repeats} (1 above {SLOW_PIECES} pieces), floor and configuration timed alternately",
        "- floor: one single piece of the same bytes over the same link; fraction = rate / floor",
        "",
        "| tokens | page | order | mode | pieces | MB | ms | GB/s | floor GB/s | fraction |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    try:
        engine.write(dst.session, [(src.data_ptr(), dst.base, 4096)])  # opens the segment
        for n_tokens in tokens:
            for page_size in page_sizes:
                for order in orders:
                    layout = layout_for(n_tokens, page_size, order)
                    pages = list(range(1, layout.num_pages))
                    for mode in ("page", "merged"):
                        rel = (
                            page_pieces(layout, pages)
                            if mode == "page"
                            else transfer_pieces(layout, layout, pages, pages)
                        )
                        total = sum(n for _, _, n in rel)
                        pieces = [(src.data_ptr() + s, dst.base + d, n) for s, d, n in rel]
                        floor_piece = (src.data_ptr(), dst.base, total)
                        repeats = args.repeats if len(pieces) <= SLOW_PIECES else 1  # tens of seconds each
                        seconds, floor_s = timed_pair(engine, dst.session, pieces, floor_piece, repeats)
                        dst.call(op="zero")  # check the pieces alone (the floor piece overlaps them)
                        engine.write(dst.session, pieces)
                        ranges = [(s, n) for s, _, n in rel]
                        if dst.call(op="digest", ranges=ranges)["digest"] != digest(src, ranges):
                            raise RuntimeError(
                                f"bytes differ after {n_tokens} tokens, page {page_size}, {order.value}, {mode}"
                            )
                        rate, floor = total / seconds / 1e9, total / floor_s / 1e9
                        row = (
                            f"| {n_tokens} | {page_size} | {order.value} | {mode} | {len(pieces)} | {total / 1e6:.1f} "
                            f"| {seconds * 1e3:.1f} | {rate:.2f} | {floor:.2f} | {rate / floor:.2f} |"
                        )
                        lines.append(row)
                        print(row, flush=True)
    finally:
        dst.close()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def _mooncake_version() -> str:
    for name in (
        "mooncake-transfer-engine-non-cuda",
        "mooncake-transfer-engine-cuda13",
        "mooncake-transfer-engine",
    ):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


if __name__ == "__main__":
    main()
