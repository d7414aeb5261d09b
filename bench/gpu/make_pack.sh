#!/usr/bin/env bash
# Builds ./.gpu-pack (git-ignored through .git/info/exclude), the wheels the GPU host lacks, which every
# bench/gpu/run_h200_*.sh carries and installs into /tmp/gsite: site.tar.xz (flashinfer-python, Mooncake's
# CUDA 13 build, starlette, uvicorn, unpacked) and loose wheels (flashinfer's apache-tvm-ffi and cuda-tile,
# prometheus_client, pydantic and its parts, jsonschema and its parts for the grammar GPU test). Without
# apache-tvm-ffi flashinfer does not import and ranks fall back to the torch attention backend without CUDA
# graphs (seen 2026-12-03: TPOT 120 ms instead of 20).
# The whole carry (pack + working tree) must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$1" "${@:2}"
}
get "$tmp/site" flashinfer-python==0.7.2.post1 mooncake-transfer-engine-cuda13==0.3.14 starlette uvicorn
mkdir -p .gpu-pack "$tmp/gsite"
for w in "$tmp"/site/*.whl; do python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$tmp/gsite"; done
# Mooncake Store (its client, master and Python module) is not used by pd: left out to keep the carry small.
rm -f "$tmp"/gsite/mooncake/_store*.so "$tmp"/gsite/mooncake/mooncake_client "$tmp"/gsite/mooncake/mooncake_master
tar -C "$tmp" -cf - gsite | xz -T0 -6 > .gpu-pack/site.tar.xz
get .gpu-pack apache-tvm-ffi==0.1.15.post2 cuda-tile==1.7.0 prometheus_client pydantic pydantic-core llguidance \
  annotated-types typing-inspection jsonschema jsonschema-specifications referencing rpds-py attrs
grep -qx "/.gpu-pack/" .git/info/exclude 2>/dev/null || echo "/.gpu-pack/" >> .git/info/exclude
rm -rf "$tmp"
du -sh .gpu-pack
