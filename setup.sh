#!/usr/bin/env bash
# Sets up pd from scratch in ./.venv (idempotent): system library, virtual environment, the package.
#   ./setup.sh                    CPU: torch's CPU build, the CPU Mooncake transfer engine, test and bench tools
#   ./setup.sh --torch-index URL  the same, with torch (and its dependencies) from the package index at URL:
#                                 PyTorch's own CPU wheel index, where the default index has only CUDA builds
#   ./setup.sh --cuda             GPU host: torch's default build, and the CUDA extras (Mooncake CUDA build,
#                                 FlashInfer, Triton)
# On the CPU path torch==2.13.0 is installed first, and only after a dry run showed that the package index
# resolves it to a CPU build: on Linux the default index resolves it to the CUDA build plus about twenty
# NVIDIA packages (several GB), and setup.sh then stops and says what to pass instead.
set -euo pipefail
cd "$(dirname "$0")"
torch_pin="torch==2.13.0"
cuda=0
torch_index=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1 ;;
    --torch-index) torch_index="${2:?setup.sh: --torch-index needs a URL}"; shift ;;
    --torch-index=*) torch_index="${1#*=}" ;;
    -h|--help) sed -n '2,10p' "$0" | cut -c3-; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see ./setup.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$cuda" = 1 ] && [ -n "$torch_index" ]; then
  echo "setup.sh: --torch-index is for the CPU path; --cuda installs torch's default (CUDA) build" >&2
  exit 2
fi
extras="cpu,test,bench"
[ "$cuda" = 1 ] && extras="cuda,test,bench"
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
if [ "$cuda" = 0 ]; then
  index=()
  [ -n "$torch_index" ] && index=(--index-url "$torch_index")
  # What would be installed, without installing it: refuse a resolution that pulls CUDA packages.
  report=$(mktemp)
  trap 'rm -f "$report"' EXIT
  python -m pip install -q --dry-run --report "$report" ${index[@]+"${index[@]}"} "$torch_pin"
  python - "$report" "$torch_pin" "$torch_index" <<'EOF'
import json
import sys

report, pin, index = sys.argv[1:]
with open(report) as f:
    install = [item["metadata"] for item in json.load(f).get("install", [])]
versions = {m["name"].lower(): m["version"] for m in install}
cuda = sorted(n for n in versions if n.startswith("nvidia-") or n == "triton")
if "+cu" in versions.get("torch", ""):
    cuda.insert(0, f"torch {versions['torch']}")
if cuda:
    where = f"the index {index}" if index else "the configured package index"
    sys.exit(
        f"setup.sh: {pin} from {where} resolves to torch's CUDA build: it would download "
        f"{len(cuda)} CUDA packages ({', '.join(cuda[:4])}{', ...' if len(cuda) > 4 else ''}; several GB) "
        "that the CPU path does not use.\n"
        "Run ./setup.sh --torch-index URL with URL the address of PyTorch's CPU wheel index (see the "
        "README, 'Install details'), or ./setup.sh --cuda on a GPU host."
    )
EOF
  python -m pip install -q ${index[@]+"${index[@]}"} "$torch_pin"
fi
python -m pip install -q -e ".[$extras]"
echo "pd is installed in $(pwd)/.venv"
