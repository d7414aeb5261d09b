"""Runs one prefill or decode rank until SIGINT/SIGTERM (``pd-prefill``, ``pd-decode``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from pd.launch.args import (
    add_common_args,
    add_engine_args,
    add_worker_args,
    cluster_token,
    engine_config,
    setup_logging,
    transfer_config,
    transfer_timeouts,
)
from pd.worker.common import WorkerConfig

log = logging.getLogger("pd.launch")

DESCRIPTIONS = {
    "prefill": "A prefill rank: chunked prefill of each prompt, its KV shipped to the decode rank over Mooncake.",
    "decode": "A decode rank: receives each prompt's KV from its prefill rank, decodes and streams the tokens.",
}


def parse(role: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"pd-{role}", description=DESCRIPTIONS[role])
    add_engine_args(p)
    add_worker_args(p)
    add_common_args(p)
    return p.parse_args(argv)


def worker_config(role: str, args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        role=role,
        engine=engine_config(args, args.model),
        bootstrap=args.bootstrap,
        host=args.host,
        port=args.port,
        instance_id=args.instance_id,
        model_name=args.model_name,
        transfer=transfer_config(args),
        timeouts=transfer_timeouts(args),
        cluster_token=cluster_token(args),
        aux_slots=args.aux_slots,
        decode_headroom_tokens=args.decode_headroom_tokens,
        max_pending=args.max_waiting,
    )


def run(role: str, argv: list[str] | None = None) -> None:
    args = parse(role, argv)
    setup_logging(args.log_level)
    cfg = worker_config(role, args)
    if role == "prefill":
        from pd.worker.prefill import PrefillWorker as Worker
    else:
        from pd.worker.decode import DecodeWorker as Worker
    worker = Worker(cfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.serve()

    asyncio.run(main())
    log.info("%s rank stopped", role)
