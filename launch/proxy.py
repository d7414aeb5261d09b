"""``pd-proxy``: the OpenAI-compatible HTTP front end. Imports no torch."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket

import uvicorn

from pd.launch.args import add_common_args, add_field_arg, cluster_token, setup_logging, tls_config
from pd.proxy.config import ProxyConfig
from pd.proxy.http import build_app
from pd.proxy.prefix_routing import POLICIES, RoutingConfig
from pd.proxy.reasoning import REASONING_PARSERS
from pd.proxy.tools import TOOL_PARSERS


def add_proxy_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The proxy's own flags (pd-proxy; pd-serve forwards them), defaults from ``ProxyConfig``;
    returns them for ``forwarded``."""
    g = p.add_argument_group("proxy")
    return [
        g.add_argument(
            "--api-key-file",
            help="file holding the API key clients must send as 'Authorization: Bearer <key>'",
        ),
        add_field_arg(g, "--max-body-bytes", ProxyConfig, "max_body_bytes", help="largest request body"),
        add_field_arg(
            g,
            "--max-prompt-tokens",
            ProxyConfig,
            "max_prompt_tokens",
            type=int,
            help="longest prompt (default: the model's context length)",
        ),
        add_field_arg(
            g, "--max-completion-tokens", ProxyConfig, "max_completion_tokens", help="cap of max_tokens"
        ),
        add_field_arg(g, "--max-inflight", ProxyConfig, "max_inflight", help="requests in flight before 429"),
        g.add_argument(
            "--max-connections",
            type=int,
            default=8192,
            help="open HTTP connections before new requests get 503 (default: %(default)s)",
        ),
        add_field_arg(
            g,
            "--request-timeout",
            ProxyConfig,
            "request_timeout_s",
            help="seconds a request may take end to end",
        ),
        add_field_arg(
            g,
            "--body-timeout",
            ProxyConfig,
            "body_timeout_s",
            help="seconds a client may take to send a request body before 408",
        ),
        add_field_arg(
            g,
            "--keepalive",
            ProxyConfig,
            "keepalive_s",
            help="seconds between pings to the workers; a worker that does not answer one within as long "
            "fails its requests",
        ),
        add_field_arg(
            g,
            "--retry-prefill",
            ProxyConfig,
            "retry_prefill",
            help="move a request whose prefill rank fails before the first token to another prefill "
            "instance, once",
        ),
        add_field_arg(
            g,
            "--drain-timeout",
            ProxyConfig,
            "drain_timeout_s",
            help="on SIGTERM: new connections are refused and open requests run on for this many seconds at "
            "most; the ones still open then are cut (their rooms aborted)",
        ),
        add_field_arg(
            g,
            "--routing",
            RoutingConfig,
            "policy",
            choices=POLICIES,
            help="which prefill rank computes a prompt: cache_aware sends shared prefixes where they were "
            "computed while the load is balanced; least_load ignores prefixes",
        ),
        add_field_arg(
            g,
            "--routing-cache-threshold",
            RoutingConfig,
            "cache_threshold",
            help="cache_aware: least share of the prompt a recorded prefix must cover",
        ),
        add_field_arg(
            g,
            "--routing-balance-abs",
            RoutingConfig,
            "balance_abs",
            help="cache_aware: outstanding requests the busiest rank may have beyond the idlest",
        ),
        add_field_arg(
            g,
            "--routing-balance-rel",
            RoutingConfig,
            "balance_rel",
            help="cache_aware: or at most this many times the idlest's",
        ),
        g.add_argument(
            "--reasoning-parser",
            choices=sorted(REASONING_PARSERS),
            help="chat: the model's reasoning goes to 'reasoning_content', the answer stays in 'content' "
            "(default: none, all output is content)",
        ),
        add_field_arg(
            g,
            "--tool-call-parser",
            ProxyConfig,
            "tool_call_parser",
            choices=sorted(TOOL_PARSERS),
            help="chat: the format the model writes tool calls in; requests may then send 'tools', and the "
            "calls come back as 'tool_calls' (default: none, requests with tools get 400)",
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pd-proxy",
        description="OpenAI-compatible HTTP endpoint: routes each request to a prefill and a decode rank "
        "from the bootstrap registry and streams the tokens back.",
    )
    p.add_argument("--bootstrap", required=True, help="HOST:PORT of the bootstrap server")
    add_field_arg(p, "--port", ProxyConfig, "port", help="HTTP port")
    # pd-serve binds the port itself (so that a busy port fails before anything starts, and nothing
    # else can answer on it) and hands this process the socket.
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    add_proxy_args(p)
    add_common_args(p, ProxyConfig)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def read_api_key(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as f:
        api_key = f.read().strip()
    if not api_key:
        raise SystemExit(f"{path} is empty")
    if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise SystemExit(f"{path}: the API key must be printable ASCII without spaces")
    return api_key


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        bootstrap=args.bootstrap,
        host=args.host,
        port=args.port,
        api_key=read_api_key(args.api_key_file),
        cluster_token=cluster_token(args),
        tls=tls_config(args),
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
        max_inflight=args.max_inflight,
        request_timeout_s=args.request_timeout,
        body_timeout_s=args.body_timeout,
        keepalive_s=args.keepalive,
        retry_prefill=args.retry_prefill,
        drain_timeout_s=args.drain_timeout,
        reasoning_parser=args.reasoning_parser,
        routing=routing_config(args),
        tool_call_parser=args.tool_call_parser,
    )


def routing_config(args: argparse.Namespace) -> RoutingConfig:
    """The ``--routing*`` flags' config; raises ValueError naming a bad value (pd-serve checks it first)."""
    return RoutingConfig(
        policy=args.routing,
        cache_threshold=args.routing_cache_threshold,
        balance_abs=args.routing_balance_abs,
        balance_rel=args.routing_balance_rel,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    setup_logging(args.log_level)
    try:
        cfg = proxy_config(args)
    except ValueError as e:
        raise SystemExit(f"pd-proxy: error: {e}") from None
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that was
    # installed before it: make that one a no-op, so a requested stop exits with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    config = uvicorn.Config(
        build_app(cfg),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        limit_concurrency=args.max_connections,
        timeout_graceful_shutdown=cfg.drain_timeout_s,
        # With TLS, HTTPS on the public port with the same certificate; clients need not present one
        # (OpenAI clients do not), only pd's own gRPC peers must.
        ssl_certfile=cfg.tls.cert if cfg.tls else None,
        ssl_keyfile=cfg.tls.key if cfg.tls else None,
    )
    sockets = None if args.fd is None else [socket.socket(fileno=args.fd)]
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    if not server.started:  # e.g. the port is taken (what uvicorn.run does)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
