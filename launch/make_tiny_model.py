"""pd-make-tiny-model: writes a tiny DeepSeek-V3 checkpoint (random weights, trained BPE tokenizer, chat
template) offline and deterministically. See pd.tiny_model."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from pd.tiny_model import DTYPES, PRESETS, make_tiny_model


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pd-make-tiny-model", description=__doc__)
    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--preset", default="ci", choices=sorted(PRESETS), help="architecture (default: ci)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument(
        "--shard-size",
        type=_positive_int,
        metavar="BYTES",
        help="write model-0000k-of-0000n.safetensors shards of at most BYTES each (one tensor may exceed it) "
        "and model.safetensors.index.json; default: one model.safetensors",
    )
    parser.add_argument(
        "--with-mtp", action="store_true", help="add the MTP layer published checkpoints carry"
    )
    parser.add_argument("--config-only", action="store_true", help="config and tokenizer only, no weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the preset's)")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="block-FP8 checkpoint laid out like DeepSeek-V3/R1's (quantization_config; the linear projections "
        "in float8_e4m3fn with <name>_scale_inv), plus its dequantized copy in DIR/dequantized/",
    )
    parser.add_argument(
        "--fp8-block",
        type=_positive_int,
        nargs=2,
        metavar=("OUT", "IN"),
        default=[128, 128],
        help="with --fp8: the [out, in] block of one scale (default: 128 128, as DeepSeek's)",
    )
    args = parser.parse_args(argv)

    start = time.monotonic()
    out = make_tiny_model(
        args.dir,
        args.preset,
        args.seed,
        shard_size=args.shard_size,
        with_mtp=args.with_mtp,
        config_only=args.config_only,
        dtype=args.dtype,
        fp8=args.fp8,
        fp8_block=(args.fp8_block[0], args.fp8_block[1]),
    )
    kind = (
        f"fp8 {args.preset} model (dequantized copy in {out}/dequantized)"
        if args.fp8
        else f"{args.preset} model"
    )
    print(f"wrote {kind} to {out} in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    main()
