"""``pd-serve``: bootstrap, one prefill instance, one decode instance and the proxy on this machine,
as child processes. With no ``--model`` it serves the tiny demo model (made on first use)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pd.config import EngineConfig
from pd.launch.args import (
    GRANULARITY_HELP,
    PortInUse,
    add_common_args,
    add_field_arg,
    end_with_parent,
    forwarded,
    reserve_port,
    setup_logging,
    tls_config,
    tls_flags,
)
from pd.launch.engine_args import add_engine_args, add_parallel_args, engine_config
from pd.launch.proxy import add_proxy_args, routing_config
from pd.proxy.config import ProxyConfig
from pd.transfer.engine import GRANULARITIES, PROTOCOLS, STAGING_MODES, TransferConfig

log = logging.getLogger("pd.serve")

DEMO_PRESET = "ci"


def demo_model_dir() -> Path:
    """The tiny demo model, made once under the user's cache directory."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pd" / f"tiny-{DEMO_PRESET}"
    if not (root / "config.json").is_file():
        from pd.tiny_model import make_tiny_model

        log.info("making the tiny demo model in %s", root)
        make_tiny_model(root, DEMO_PRESET, seed=0)
    return root


def _child_setup() -> None:
    """Runs in each child before exec: its own process group, so a terminal's Ctrl-C reaches only
    pd-serve, which stops the children in order; and SIGTERM if pd-serve dies, even by SIGKILL
    (Linux), so none is left behind."""
    os.setpgid(0, 0)
    end_with_parent(signal.SIGTERM)


def build_parser() -> tuple[argparse.ArgumentParser, list[argparse.Action], list[argparse.Action]]:
    """The parser, and the engine and proxy flags that pd-serve forwards to its children."""
    p = argparse.ArgumentParser(
        prog="pd-serve",
        description="Run a whole disaggregated deployment on this machine: bootstrap server, one prefill "
        "instance, one decode instance and the OpenAI-compatible proxy. Without --model it serves a tiny "
        "demo model made on first use. Every port it needs is checked before anything starts.",
    )
    add_field_arg(
        p,
        "--port",
        ProxyConfig,
        "port",
        help="HTTP port of the proxy; pd-serve binds it first and fails at once, naming it, when it is taken",
    )
    p.add_argument("--prefill-device", help="device of the prefill instance (default: --device)")
    p.add_argument("--decode-device", help="device of the decode instance (default: --device)")
    p.add_argument(
        "--transfer-protocol",
        choices=("auto", *PROTOCOLS),
        default="auto",
        help="KV transfer; auto: nvlink when both instances run on GPUs (of this host, as pd-serve's always "
        f"do), else {TransferConfig.protocol} (default: auto)",
    )
    add_field_arg(
        p,
        "--kv-checksum",
        TransferConfig,
        "kv_checksum",
        help="checksum every KV page prefill sends; decode verifies it before decoding",
    )
    add_field_arg(
        p,
        "--transfer-writers",
        TransferConfig,
        "writers_per_peer",
        help="rooms the prefill instance writes to a decode rank at once",
    )
    add_field_arg(
        p,
        "--host-staging",
        TransferConfig,
        "host_staging",
        choices=STAGING_MODES,
        help="copy KV through pinned host memory in bulk (auto: with the TCP transport and a GPU pool)",
    )
    add_field_arg(
        p,
        "--staging-mb",
        TransferConfig,
        "staging_mb",
        help="pinned host memory for host staging, MB per rank",
    )
    add_field_arg(
        p,
        "--transfer-granularity",
        TransferConfig,
        "granularity",
        choices=GRANULARITIES,
        help=GRANULARITY_HELP,
    )
    par = add_parallel_args(p, multinode=False)
    par.add_argument("--prefill-dp", type=int, help="ranks of the prefill instance (default: --dp)")
    par.add_argument("--decode-dp", type=int, help="ranks of the decode instance (default: --dp)")
    p.add_argument(
        "--colocated",
        type=int,
        default=0,
        metavar="N",
        help="instead of prefill + decode: N colocated instances (prefill and decode in one engine; on CUDA "
        "instance i uses GPU i) behind the same proxy, for comparisons",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for the deployment to be healthy"
    )
    engine_actions = add_engine_args(p, model_required=False)
    proxy_actions = add_proxy_args(p)
    add_common_args(p, ProxyConfig)
    return p, engine_actions, proxy_actions


def parse(argv: list[str] | None) -> argparse.Namespace:
    p, engine_actions, proxy_actions = build_parser()
    args = p.parse_args(argv)
    args.engine_flags = forwarded(args, [a for a in engine_actions if a.dest != "device"])
    args.proxy_flags = forwarded(args, proxy_actions)
    return args


def _engine_flags(args: argparse.Namespace, model: str, device: str) -> list[str]:
    flags = ["--model", model, "--device", device, *args.engine_flags]
    shared = (args.prefill_device or args.device) == (args.decode_device or args.device)
    if device.startswith("cuda") and shared and not args.colocated and "--gpu-memory-fraction" not in flags:
        # Prefill and decode on the same GPUs: each instance takes half of the default share.
        flags += ["--gpu-memory-fraction", str(EngineConfig.gpu_memory_fraction / 2)]
    if args.model_name is not None:
        flags += ["--model-name", args.model_name]
    return flags


def _parallel_flags(args: argparse.Namespace, dp: int | None) -> list[str]:
    dp = dp or args.dp
    if args.ep is not None and args.ep != args.dp:
        raise SystemExit(f"--ep {args.ep} must equal --dp {args.dp}")
    flags = ["--dp", str(dp), "--expert-placement", args.expert_placement]
    if args.ep_backend:
        flags += ["--ep-backend", args.ep_backend]
    return flags


def transfer_protocol(args: argparse.Namespace) -> str:
    """``--transfer-protocol``, with ``auto`` resolved: NVLink between GPUs of this host (Mooncake's
    intra-node path, about 100x TCP for a request's KV), else the transfer engine's default."""
    if args.transfer_protocol != "auto":
        return args.transfer_protocol
    devices = (args.prefill_device or args.device, args.decode_device or args.device)
    if all(d.startswith("cuda") for d in devices):
        log.info("KV transfer over nvlink: both instances run on GPUs of this host")
        return "nvlink"
    return TransferConfig.protocol


def commands(
    args: argparse.Namespace, model: str, bootstrap_port: int, proxy_fd: int | None = None
) -> list[tuple[str, list[str]]]:
    """The child processes (name, argv): bootstrap, the instances, the proxy (last). The proxy listens on
    the socket ``proxy_fd`` (inherited) when given, else binds ``--port`` itself."""
    host = args.host
    py = [sys.executable, "-m"]
    boot = f"{host}:{bootstrap_port}"
    common = ["--host", host, "--log-level", args.log_level]
    if args.cluster_token_file:
        common += ["--cluster-token-file", args.cluster_token_file]
    common += tls_flags(args)  # every child: mutual TLS between them, HTTPS on the proxy
    worker = ["--bootstrap", boot, "--transfer-protocol", transfer_protocol(args)]
    if args.kv_checksum:
        worker.append("--kv-checksum")
    worker += ["--transfer-writers", str(args.transfer_writers), "--host-staging", args.host_staging]
    worker += ["--staging-mb", str(args.staging_mb)]
    worker += ["--transfer-granularity", args.transfer_granularity]
    bootstrap = ("bootstrap", [*py, "pd.launch.bootstrap", "--port", str(bootstrap_port), *common])
    fd = [] if proxy_fd is None else ["--fd", str(proxy_fd)]
    proxy = (
        "proxy",
        [
            *py,
            "pd.launch.proxy",
            "--bootstrap",
            boot,
            "--port",
            str(args.port),
            *fd,
            *args.proxy_flags,
            *common,
        ],
    )
    if args.colocated:
        instances = []
        for i in range(args.colocated):
            device = f"cuda:{i}" if args.device == "cuda" else args.device
            flags = [
                *_engine_flags(args, model, device),
                *_parallel_flags(args, None),
                "--bootstrap",
                boot,
                *common,
            ]
            instances.append((f"colocated{i}", [*py, "pd.launch.colocated", *flags]))
        return [bootstrap, *instances, proxy]
    return [
        bootstrap,
        (
            "prefill",
            [
                *py,
                "pd.launch.prefill",
                *_engine_flags(args, model, args.prefill_device or args.device),
                *_parallel_flags(args, args.prefill_dp),
                *worker,
                *common,
            ],
        ),
        (
            "decode",
            [
                *py,
                "pd.launch.decode",
                *_engine_flags(args, model, args.decode_device or args.device),
                *_parallel_flags(args, args.decode_dp),
                *worker,
                *common,
            ],
        ),
        proxy,
    ]


def reserve_ports(args: argparse.Namespace) -> tuple[socket.socket, socket.socket]:
    """Binds the two ports pd-serve chooses, before anything starts: the proxy's ``--port`` (0: a free
    one) and a free port for the bootstrap server. The workers' gRPC ports, their transfer engines' and
    the ranks' rendezvous are picked free by the children themselves. Raises ``PortInUse`` naming the port
    and what it was for."""
    proxy = reserve_port(args.host, args.port, "the proxy's HTTP port, --port")
    try:
        bootstrap = reserve_port(args.host, 0, "the bootstrap server's port")
    except PortInUse:
        proxy.close()
        raise
    return proxy, bootstrap


def wait_healthy(
    url: str, children: dict[str, subprocess.Popen], timeout: float, ca: str | None = None
) -> None:
    """Until ``url``/health answers 200 while every child runs. The proxy child listens on the socket
    pd-serve bound (and no other process can bind that port meanwhile), so the answer is its own; a
    child that exits fails the start. ``ca``: the CA bundle an https ``url``'s certificate is checked
    against."""
    verify = ssl.create_default_context(cafile=ca) if ca else True
    deadline = time.monotonic() + timeout

    def check_children() -> None:
        for name, p in children.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode} during start-up")

    while time.monotonic() < deadline:
        check_children()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0, verify=verify).status_code == 200:
                check_children()
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not become healthy within {timeout:.0f} s")


def stop_all(children: dict[str, subprocess.Popen], proxy_drain_s: float, grace: float = 10.0) -> None:
    """Stops the children in reverse start order (proxy first, bootstrap last, so workers can still
    deregister): SIGTERM, then SIGKILL for one still alive after ``grace`` seconds (the proxy: after its
    drain, ``proxy_drain_s``, and ``grace``; its open streams run on meanwhile)."""
    for name in reversed(list(children)):
        p = children[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        wait = grace + (proxy_drain_s if name == "proxy" else 0)
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0f s: killing it", name, p.pid, wait)
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup_logging(args.log_level)
    tls = tls_config(args)  # checked here, before any child starts
    try:  # the configs the children will build, checked here too
        engine_config(args, args.model or "")
        routing_config(args)
        ProxyConfig(bootstrap="", drain_timeout_s=args.drain_timeout)
        TransferConfig(
            protocol=transfer_protocol(args),
            kv_checksum=args.kv_checksum,
            writers_per_peer=args.transfer_writers,
            host_staging=args.host_staging,
            staging_mb=args.staging_mb,
        )
    except ValueError as e:
        raise SystemExit(f"pd-serve: error: {e}") from None
    try:
        proxy_sock, boot_sock = reserve_ports(args)
    except PortInUse as e:
        log.error("%s: is another pd-serve (or another server) running? Stop it or pick another --port", e)
        sys.exit(1)
    args.port = proxy_sock.getsockname()[1]
    bootstrap_port = boot_sock.getsockname()[1]
    url = f"{'https' if tls else 'http'}://{args.host}:{args.port}"
    model = args.model or str(demo_model_dir())
    procs = commands(args, model, bootstrap_port, proxy_sock.fileno())
    children: dict[str, subprocess.Popen] = {}
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        for name, cmd in procs:
            if name == "bootstrap":
                boot_sock.close()  # the bootstrap server binds it itself (without SO_REUSEPORT)
            fds = (proxy_sock.fileno(),) if name == "proxy" else ()
            children[name] = subprocess.Popen(cmd, preexec_fn=_child_setup, pass_fds=fds)
            log.info("started %s (pid %d)", name, children[name].pid)
        proxy_sock.close()  # the proxy child holds it now
        wait_healthy(url, children, args.ready_timeout, tls.ca if tls else None)
        print(f"pd is serving {Path(model).name} at {url}/v1 (Ctrl-C to stop)", flush=True)
        while not stopping:
            dead = [n for n, p in children.items() if p.poll() is not None]
            if dead:
                log.error("%s exited (code %s): shutting down", dead[0], children[dead[0]].returncode)
                code = 1
                break
            time.sleep(0.2)
    except (RuntimeError, TimeoutError) as e:
        log.error("%s", e)
        code = 1
    finally:
        boot_sock.close()
        proxy_sock.close()
        stop_all(children, args.drain_timeout)
    sys.exit(code)


if __name__ == "__main__":
    main()
