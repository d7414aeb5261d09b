"""Runs a prefill or decode instance until SIGINT/SIGTERM (``pd-prefill``, ``pd-decode``).

One rank runs in this process. With ``--dp N`` this process starts the node's ranks as child
processes (the same command plus ``--rank-in-node``), forwards SIGINT/SIGTERM to them, and stops
them all if one of them dies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time

from pd.config import ModelConfig, ParallelConfig
from pd.launch.args import (
    GRANULARITY_HELP,
    PortInUse,
    add_common_args,
    add_field_arg,
    cluster_token,
    end_with_parent,
    reserve_port,
    setup_logging,
    tls_config,
)
from pd.launch.engine_args import add_engine_args, add_parallel_args, engine_config
from pd.transfer.engine import GRANULARITIES, PROTOCOLS, STAGING_MODES, TransferConfig
from pd.transfer.state import TransferTimeouts
from pd.worker.builder import WorkerConfig, build_rank, check_speculative

log = logging.getLogger("pd.launch")

DESCRIPTIONS = {
    "colocated": "A colocated rank: prefill and decode in one engine, behind the same proxy and API (no KV transfer).",
    "prefill": "A prefill rank: chunked prefill of each prompt, its KV shipped to the decode rank over Mooncake.",
    "decode": "A decode rank: receives each prompt's KV from its prefill rank, decodes and streams the tokens.",
}


def add_worker_args(p: argparse.ArgumentParser) -> None:
    W = WorkerConfig
    g = p.add_argument_group("worker")
    g.add_argument("--bootstrap", required=True, help="HOST:PORT of the bootstrap server")
    add_field_arg(
        g,
        "--port",
        W,
        "port",
        help="gRPC port of this rank; 0: any free port. With --dp N, rank i of a node listens on PORT + i, so "
        "the instance takes PORT..PORT+N-1 on each node: leave that room before the next instance's port",
    )
    add_field_arg(
        g,
        "--instance-id",
        W,
        "instance_id",
        help="instance name in the registry (default: <role>-<host>-<port>)",
    )
    add_field_arg(g, "--aux-slots", W, "aux_slots", help="rooms that can be in transfer at once")
    add_field_arg(
        g,
        "--drain-timeout",
        W,
        "drain_timeout_s",
        help="on SIGTERM, seconds to serve the requests held (new ones are refused) before stopping; a second "
        "signal stops at once; 0: stop at once",
    )
    add_field_arg(
        g,
        "--decode-headroom-tokens",
        W,
        "decode_headroom_tokens",
        help="decode: pages reserved beyond the prompt when a room arrives",
    )
    par = add_parallel_args(p, multinode=True)
    par.add_argument(
        "--rank-in-node", type=int, help=argparse.SUPPRESS
    )  # set by the launcher for its children
    T, S = TransferConfig, TransferTimeouts
    t = p.add_argument_group("KV transfer (Mooncake)")
    add_field_arg(t, "--transfer-protocol", T, "protocol", choices=PROTOCOLS, help="nvlink: GPUs of one host")
    add_field_arg(
        t, "--transfer-device-names", T, "device_names", help="RDMA devices, comma separated (empty: all)"
    )
    t.add_argument(
        "--transfer-hostname", help="address peers reach this rank's transfer engine at (default: --host)"
    )
    add_field_arg(t, "--transfer-timeout", T, "transfer_timeout_s", help="seconds one transfer call may take")
    add_field_arg(
        t,
        "--transfer-writers",
        T,
        "writers_per_peer",
        help="rooms a prefill rank writes to one decode rank at once (writer threads per peer)",
    )
    add_field_arg(
        t,
        "--host-staging",
        T,
        "host_staging",
        choices=STAGING_MODES,
        help="copy KV through pinned host memory in bulk (auto: with the TCP transport and a GPU pool)",
    )
    add_field_arg(t, "--staging-mb", T, "staging_mb", help="pinned host memory for host staging, MB per rank")
    add_field_arg(
        t,
        "--transfer-granularity",
        T,
        "granularity",
        choices=GRANULARITIES,
        help=GRANULARITY_HELP,
    )
    add_field_arg(
        t,
        "--kv-checksum",
        T,
        "kv_checksum",
        help="checksum every KV page sent and verify it before decoding; prefill and decode must agree",
    )
    add_field_arg(
        t, "--bootstrapping-timeout", S, "bootstrapping_s", help="seconds a room may wait for its peer"
    )
    add_field_arg(
        t,
        "--waiting-timeout",
        S,
        "waiting_for_input_s",
        help="seconds a room may wait for its KV to be computed",
    )
    add_field_arg(t, "--transferring-timeout", S, "transferring_s", help="seconds without transfer progress")
    add_field_arg(
        t,
        "--abort-grace",
        S,
        "abort_grace_s",
        help="decode: wait before reusing pages of an unconfirmed abort",
    )


def build_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"pd-{role}", description=DESCRIPTIONS[role])
    add_engine_args(p)
    add_worker_args(p)
    add_common_args(p, WorkerConfig)
    return p


def parse(role: str, argv: list[str] | None) -> argparse.Namespace:
    return build_parser(role).parse_args(argv)


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(
        hostname=args.transfer_hostname or args.host,
        protocol=args.transfer_protocol,
        device_names=args.transfer_device_names,
        transfer_timeout_s=args.transfer_timeout,
        kv_checksum=args.kv_checksum,
        writers_per_peer=args.transfer_writers,
        host_staging=args.host_staging,
        staging_mb=args.staging_mb,
        granularity=args.transfer_granularity,
    )


def transfer_timeouts(args: argparse.Namespace) -> TransferTimeouts:
    return TransferTimeouts(
        bootstrapping_s=args.bootstrapping_timeout,
        waiting_for_input_s=args.waiting_timeout,
        transferring_s=args.transferring_timeout,
        abort_grace_s=args.abort_grace,
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    if args.ep is not None and args.ep != args.dp:
        raise SystemExit(f"--ep {args.ep} must equal --dp {args.dp}: DP attention and EP MoE share the ranks")
    local = args.dp // args.nnodes if args.dp % args.nnodes == 0 else 0
    rank = args.node_rank * local + (args.rank_in_node or 0)
    return ParallelConfig(
        size=args.dp,
        rank=rank,
        ep_backend=args.ep_backend,
        expert_placement=args.expert_placement,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr,
    )


def worker_config(role: str, args: argparse.Namespace) -> WorkerConfig:
    par = parallel_config(args)
    port = args.port + par.local_rank if args.port else 0
    return WorkerConfig(
        role=role,
        engine=engine_config(args, args.model),
        bootstrap=args.bootstrap,
        host=args.host,
        port=port,
        instance_id=args.instance_id,
        parallel=par,
        model_name=args.model_name,
        transfer=transfer_config(args),
        timeouts=transfer_timeouts(args),
        cluster_token=cluster_token(args),
        tls=tls_config(args),
        aux_slots=args.aux_slots,
        decode_headroom_tokens=args.decode_headroom_tokens,
        max_pending=args.max_waiting,
        drain_timeout_s=args.drain_timeout,
    )


def reserve_rank_ports(role: str, args: argparse.Namespace, par: ParallelConfig) -> list[socket.socket]:
    """Reserves the gRPC port of each of this node's ranks (``--port`` + local rank) before any rank starts
    its engine, so a port that another process holds fails the start, naming the port and the rank.

    The sockets are held (by this process) while the ranks run; each rank's own gRPC server can still
    bind its port (``reserve_port(share_with_grpc=True)``), another launcher's reservation cannot. No
    reservation for ``--port 0`` (each rank picks a free port).
    """
    if not args.port:
        return []
    n = par.local_size
    if args.port + n - 1 > 65535:
        raise SystemExit(
            f"pd-{role}: --port {args.port} with {n} ranks on this node needs ports up to "
            f"{args.port + n - 1}, beyond 65535"
        )
    held: list[socket.socket] = []
    for i in range(n):
        port = args.port + i
        if n == 1:
            purpose = f"the gRPC port of this {role} rank, --port"
        else:
            rank = args.node_rank * n + i
            purpose = (
                f"the gRPC port of rank {rank} of this {role} instance: --port {args.port} + local rank {i}; "
                f"its {n} ranks on this node use ports {args.port}-{args.port + n - 1}"
            )
        try:
            held.append(reserve_port(args.host, port, purpose, share_with_grpc=True))
        except PortInUse as e:
            for s in held:
                s.close()
            raise SystemExit(f"pd-{role}: {e}") from None
    return held


def run(role: str, argv: list[str] | None = None) -> None:
    args = parse(role, argv)
    setup_logging(args.log_level)
    if args.dp > 1 and args.rank_in_node is None:
        sys.exit(spawn_ranks(role, args, sys.argv[1:] if argv is None else argv))
    try:
        cfg = worker_config(role, args)
        if cfg.engine.speculative.enabled:  # refused here with its message, not deep in the rank's start
            check_speculative(cfg.engine, ModelConfig.from_dir(cfg.engine.model_path))
    except ValueError as e:  # a config field out of range: named, without a traceback
        raise SystemExit(f"pd-{role}: error: {e}") from None
    # One rank on its own: it reserves its port before building the engine (the ranks of a multi-rank
    # instance have theirs reserved by the launcher process that started them).
    reserved = reserve_rank_ports(role, args, cfg.parallel) if args.rank_in_node is None else []
    if role == "prefill":
        from pd.worker.prefill import PrefillWorker as Worker
    elif role == "decode":
        from pd.worker.decode import DecodeWorker as Worker
    else:
        from pd.worker.colocated import ColocatedWorker as Worker
    worker = Worker(build_rank(cfg))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.serve()

    asyncio.run(main())
    for sock in reserved:
        sock.close()
    log.info("%s rank stopped", role)


def spawn_ranks(role: str, args: argparse.Namespace, argv: list[str]) -> int:
    """Starts this node's ranks as child processes and supervises them; returns the exit status."""
    extra = []
    if args.dist_init_addr is None:
        if args.nnodes > 1:
            raise SystemExit("--dist-init-addr is required with --nnodes > 1")
        with socket.socket() as s:
            s.bind((args.host, 0))
            args.dist_init_addr = f"{args.host}:{s.getsockname()[1]}"
        extra += ["--dist-init-addr", args.dist_init_addr]
    if args.instance_id is None:
        if args.nnodes > 1:
            raise SystemExit("--instance-id is required with --nnodes > 1 (every node must use the same one)")
        args.instance_id = f"{role}-{args.host}-{secrets.token_hex(3)}"
        extra += ["--instance-id", args.instance_id]
    par = parallel_config(args)  # validates the flags before anything starts
    tls_config(args)
    reserved = reserve_rank_ports(role, args, par)  # held until the ranks are gone
    # A rank stuck in a collective may not stop on SIGTERM; if this launcher is killed for it, its ranks go too.
    children = [
        subprocess.Popen(
            [sys.executable, "-m", f"pd.launch.{role}", *argv, *extra, "--rank-in-node", str(i)],
            preexec_fn=lambda: end_with_parent(signal.SIGKILL),
        )
        for i in range(par.local_size)
    ]
    stopping = False

    def forward(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while all(c.poll() is None for c in children):
        time.sleep(0.2)
    if not stopping:  # one rank died: the others cannot continue without it
        log.error(
            "a rank of the %s instance exited (codes %s): stopping the others",
            role,
            [c.poll() for c in children],
        )
        for c in children:
            if c.poll() is None:
                c.terminate()
    drain = args.drain_timeout if stopping else 0  # asked to stop, the ranks drain first
    deadline = time.monotonic() + 30 + drain
    for c in children:
        try:
            c.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
    for sock in reserved:
        sock.close()
    return max(abs(c.returncode) for c in children)
