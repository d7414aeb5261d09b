#!/usr/bin/env bash
# Sets up pd from scratch in ./.venv (idempotent): system library, virtual environment, the package.
#   ./setup.sh            CPU: torch (CPU build), the CPU Mooncake transfer engine, test and bench tools
#   ./setup.sh --cuda     GPU host: additionally the CUDA extras (Mooncake CUDA build, FlashInfer, Triton)
set -euo pipefail
cd "$(dirname "$0")"
extras="cpu,test,bench"
[ "${1:-}" = "--cuda" ] && extras="cuda,test,bench"
if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
  # The Mooncake transfer engine links against libibverbs even when it only uses TCP.
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libibverbs1 >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libibverbs1 >/dev/null; }
  else
    echo "libibverbs1 is missing: install it (e.g. 'sudo apt-get install libibverbs1') and run again" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "$extras" = "cpu,test,bench" ]; then
  # The CPU build of torch, pinned first: an unpinned torch would pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[$extras]"
echo "pd is installed in $(pwd)/.venv"
