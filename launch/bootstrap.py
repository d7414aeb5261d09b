"""pd-bootstrap: the bootstrap registry server, standalone."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from pd.bootstrap.server import BootstrapServer
from pd.launch.args import add_common_args, cluster_token, setup_logging

log = logging.getLogger("pd.bootstrap")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pd-bootstrap",
        description="Bootstrap registry of pd: prefill and decode ranks register here, renew a lease "
        "with heartbeats, and look each other up. Logs to stderr; stops on SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "--port", type=int, default=8998, help="port to listen on; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=5.0,
        help="drop a rank that sends no heartbeat for this long (default: %(default)s)",
    )
    parser.add_argument(
        "--max-ranks",
        type=int,
        default=4096,
        help="refuse registrations beyond this many ranks (default: %(default)s)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.lease_seconds <= 0:
        parser.error(f"--lease-seconds must be positive, got {args.lease_seconds}")
    if args.max_ranks < 1:
        parser.error(f"--max-ranks must be >= 1, got {args.max_ranks}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    token = cluster_token(args)
    server = BootstrapServer(args.host, args.port, args.lease_seconds, token, max_ranks=args.max_ranks)
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
