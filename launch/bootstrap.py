"""pd-bootstrap: the bootstrap registry server, standalone. Imports no torch (it starts in well under
a second)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from pd.bootstrap.server import BootstrapConfig, BootstrapServer
from pd.launch.args import add_common_args, add_field_arg, cluster_token, setup_logging, tls_config

log = logging.getLogger("pd.bootstrap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-bootstrap",
        description="Bootstrap registry of pd: prefill and decode ranks register here, renew a lease "
        "with heartbeats, and look each other up. Logs to stderr; stops on SIGINT/SIGTERM.",
    )
    add_field_arg(parser, "--port", BootstrapConfig, "port", help="port to listen on; 0 picks a free one")
    add_field_arg(
        parser,
        "--lease-seconds",
        BootstrapConfig,
        "lease_seconds",
        help="drop a rank that sends no heartbeat for this long",
    )
    add_field_arg(
        parser,
        "--max-ranks",
        BootstrapConfig,
        "max_ranks",
        help="refuse registrations beyond this many ranks",
    )
    add_common_args(parser, BootstrapConfig)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lease_seconds <= 0:
        parser.error(f"--lease-seconds must be positive, got {args.lease_seconds}")
    if args.max_ranks < 1:
        parser.error(f"--max-ranks must be >= 1, got {args.max_ranks}")
    return args


def bootstrap_config(args: argparse.Namespace) -> BootstrapConfig:
    return BootstrapConfig(
        host=args.host,
        port=args.port,
        lease_seconds=args.lease_seconds,
        max_ranks=args.max_ranks,
        cluster_token=cluster_token(args),
        tls=tls_config(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    server = BootstrapServer.from_config(bootstrap_config(args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server.start()
    except OSError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    stop.wait()
    log.info("shutting down")
    server.stop(grace=1.0)


if __name__ == "__main__":
    main()
