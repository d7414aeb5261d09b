"""Regenerates the protobuf/gRPC Python modules in ``pd/rpc/`` from ``proto/pd/rpc/*.proto``.

Run from anywhere: ``python -m pd.rpc.generate`` (needs the ``test`` extra: grpcio-tools, pinned so
the output is reproducible). ``--check`` compares instead of writing and exits 1 if anything is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
OUT_DIR = REPO / "pd" / "rpc"


def generate(out_root: Path) -> list[Path]:
    """Compiles every .proto under proto/pd/rpc into ``out_root``/pd/rpc; returns the written files."""
    from grpc_tools import protoc  # test/dev dependency only

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "pd" / "rpc").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / 'pd' / 'rpc'}")
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}"]
    args += [f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "pd" / "rpc").glob("*_pb2*.py*"))


def stale_files() -> list[str]:
    """Names of generated files that differ from, are missing in, or are extra in pd/rpc/."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        current = {p.name: p for p in OUT_DIR.glob("*_pb2*.py*")}
        stale = [n for n in fresh if n not in current or not filecmp.cmp(fresh[n], current[n], shallow=False)]
        stale += [n for n in current if n not in fresh]
        return sorted(stale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if pd/rpc/ is stale; write nothing")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated files (run python -m pd.rpc.generate):", ", ".join(stale))
            sys.exit(1)
        print("pd/rpc is up to date")
        return
    for path in generate(REPO):
        print("wrote", path.relative_to(REPO))


if __name__ == "__main__":
    main()
