"""Command-line flags shared by the launchers, and the configs they build."""

from __future__ import annotations

import argparse
import logging
import sys

from pd.config import EngineConfig
from pd.rpc.auth import read_token_file
from pd.transfer.engine import PROTOCOLS, TransferConfig
from pd.transfer.state import TransferTimeouts


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)"
    )
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument(
        "--cluster-token-file",
        help="file holding a shared secret that every gRPC call between pd processes must carry",
    )


def add_proxy_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The proxy's own flags (pd-proxy; pd-serve forwards them); returns them for ``forwarded``."""
    g = p.add_argument_group("proxy")
    return [
        g.add_argument(
            "--api-key-file",
            help="file holding the API key clients must send as 'Authorization: Bearer <key>'",
        ),
        g.add_argument(
            "--max-body-bytes", type=int, default=8 << 20, help="largest request body (default: %(default)s)"
        ),
        g.add_argument(
            "--max-prompt-tokens", type=int, help="longest prompt (default: the model's context length)"
        ),
        g.add_argument(
            "--max-completion-tokens",
            type=int,
            default=16384,
            help="cap of max_tokens (default: %(default)s)",
        ),
        g.add_argument(
            "--max-inflight",
            type=int,
            default=4096,
            help="requests in flight before 429 (default: %(default)s)",
        ),
        g.add_argument(
            "--max-connections",
            type=int,
            default=8192,
            help="open HTTP connections before new requests get 503 (default: %(default)s)",
        ),
        g.add_argument(
            "--request-timeout", type=float, default=600.0, help="seconds a request may take end to end"
        ),
        g.add_argument(
            "--body-timeout",
            type=float,
            default=30.0,
            help="seconds a client may take to send a request body before 408 (default: %(default)s)",
        ),
        g.add_argument(
            "--keepalive",
            type=float,
            default=5.0,
            help="seconds between pings to the workers; a worker that does not answer one within as long "
            "fails its requests (default: %(default)s)",
        ),
        g.add_argument(
            "--retry-prefill",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="move a request whose prefill rank fails before the first token to another prefill "
            "instance, once (default: on)",
        ),
    ]


def forwarded(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """Command-line flags repeating the values of ``actions`` that differ from their defaults."""
    flags = []
    for a in actions:
        value = getattr(args, a.dest)
        if value == a.default:
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            flags.append(a.option_strings[0] if value else a.option_strings[1])
        else:
            flags += [a.option_strings[0], str(value)]
    return flags


def add_engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        required=model_required,
        help="Hugging Face model directory (config.json, safetensors, tokenizer)",
    )
    g.add_argument("--model-name", help="name served in the API (default: the model directory's name)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32"
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights of the right shapes",
    )
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: %(default)s)")
    g.add_argument(
        "--num-pages",
        type=int,
        help="KV pages (default: fill --gpu-memory-fraction on CUDA; 64K tokens on CPU)",
    )
    g.add_argument("--gpu-memory-fraction", type=float, default=0.85)
    g.add_argument(
        "--chunk-size",
        type=int,
        default=2048,
        help="token budget of one prefill forward (default: %(default)s)",
    )
    g.add_argument(
        "--max-running", type=int, default=64, help="most requests in a batch (default: %(default)s)"
    )
    g.add_argument(
        "--max-waiting", type=int, default=4096, help="bound of the waiting queue (default: %(default)s)"
    )
    g.add_argument("--max-context-len", type=int, help="default: the model's max_position_embeddings")
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "flashinfer"],
        help="auto: flashinfer on CUDA when installed, else the torch reference (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of dummy weights and of requests without a seed")
    g.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly instead of in CUDA graphs")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker")
    g.add_argument("--bootstrap", required=True, help="HOST:PORT of the bootstrap server")
    g.add_argument("--port", type=int, default=0, help="gRPC port of this rank (default: any free port)")
    g.add_argument("--instance-id", help="instance name in the registry (default: <role>-<host>-<port>)")
    g.add_argument("--aux-slots", type=int, default=1024, help="rooms that can be in transfer at once")
    par = p.add_argument_group("parallelism (DP attention + EP MoE over the same ranks)")
    par.add_argument(
        "--dp", type=int, default=1, help="ranks of this instance: DP attention size (default: %(default)s)"
    )
    par.add_argument("--ep", type=int, help="EP size; must equal --dp (default: --dp)")
    par.add_argument(
        "--ep-backend",
        choices=["local", "torch", "mooncake", "deepep"],
        help="EP communication (default: local for one rank; torch on CPU; on GPU deepep if installed, else "
        "mooncake for decode, torch for prefill)",
    )
    par.add_argument(
        "--expert-placement",
        choices=["linear", "round_robin"],
        default="linear",
        help="which rank holds expert e: e // E_local (linear) or e % W (round_robin) (default: %(default)s)",
    )
    par.add_argument("--nnodes", type=int, default=1, help="nodes the ranks span (default: %(default)s)")
    par.add_argument("--node-rank", type=int, default=0, help="this node's index (default: %(default)s)")
    par.add_argument(
        "--dist-init-addr", help="HOST:PORT where the ranks meet (default on one node: a free local port)"
    )
    par.add_argument(
        "--rank-in-node", type=int, help=argparse.SUPPRESS
    )  # set by the launcher for its children
    g.add_argument(
        "--decode-headroom-tokens", type=int, default=64, help="decode: pages reserved beyond the prompt"
    )
    t = p.add_argument_group("KV transfer (Mooncake)")
    t.add_argument(
        "--transfer-protocol", default="tcp", choices=list(PROTOCOLS), help="tcp, rdma, or nvlink (one host)"
    )
    t.add_argument("--transfer-device-names", default="", help="RDMA devices, comma separated (default: all)")
    t.add_argument(
        "--transfer-hostname", help="address peers reach this rank's transfer engine at (default: --host)"
    )
    t.add_argument("--transfer-timeout", type=float, default=5.0, help="seconds one transfer call may take")
    t.add_argument(
        "--bootstrapping-timeout", type=float, default=60.0, help="seconds a room may wait for its peer"
    )
    t.add_argument(
        "--waiting-timeout",
        type=float,
        default=300.0,
        help="seconds a room may wait for its KV to be computed",
    )
    t.add_argument(
        "--transferring-timeout", type=float, default=30.0, help="seconds without transfer progress"
    )
    t.add_argument(
        "--abort-grace",
        type=float,
        default=10.0,
        help="decode: wait before reusing pages of an unconfirmed abort",
    )


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model_path=model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        page_size=args.page_size,
        num_pages=args.num_pages,
        gpu_memory_fraction=args.gpu_memory_fraction,
        chunk_size=args.chunk_size,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_context_len=args.max_context_len,
        attention_backend=args.attention_backend,
        seed=args.seed,
        cuda_graph=not args.no_cuda_graph,
    )


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(
        hostname=args.transfer_hostname or args.host,
        protocol=args.transfer_protocol,
        device_names=args.transfer_device_names,
        transfer_timeout_s=args.transfer_timeout,
    )


def transfer_timeouts(args: argparse.Namespace) -> TransferTimeouts:
    return TransferTimeouts(
        bootstrapping_s=args.bootstrapping_timeout,
        waiting_for_input_s=args.waiting_timeout,
        transferring_s=args.transferring_timeout,
        abort_grace_s=args.abort_grace,
    )


def cluster_token(args: argparse.Namespace) -> str | None:
    return read_token_file(args.cluster_token_file) if args.cluster_token_file else None
