"""``pd-proxy``: the OpenAI-compatible HTTP front end."""

from __future__ import annotations

import argparse
import signal

import uvicorn

from pd.launch.args import add_common_args, add_proxy_args, cluster_token, setup_logging
from pd.proxy.config import ProxyConfig
from pd.proxy.http import build_app


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pd-proxy",
        description="OpenAI-compatible HTTP endpoint: routes each request to a prefill and a decode rank "
        "from the bootstrap registry and streams the tokens back.",
    )
    p.add_argument("--bootstrap", required=True, help="HOST:PORT of the bootstrap server")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    add_proxy_args(p)
    add_common_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup_logging(args.log_level)
    api_key = None
    if args.api_key_file:
        with open(args.api_key_file) as f:
            api_key = f.read().strip()
        if not api_key:
            raise SystemExit(f"{args.api_key_file} is empty")
        if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise SystemExit(f"{args.api_key_file}: the API key must be printable ASCII without spaces")
    cfg = ProxyConfig(
        bootstrap=args.bootstrap,
        host=args.host,
        port=args.port,
        api_key=api_key,
        cluster_token=cluster_token(args),
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
        max_inflight=args.max_inflight,
        request_timeout_s=args.request_timeout,
        body_timeout_s=args.body_timeout,
        keepalive_s=args.keepalive,
        retry_prefill=args.retry_prefill,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that was
    # installed before it: make that one a no-op, so a requested stop exits with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    uvicorn.run(
        build_app(cfg),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        limit_concurrency=args.max_connections,
    )


if __name__ == "__main__":
    main()
