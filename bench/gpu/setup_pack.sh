#!/usr/bin/env bash
# Sourced first by the device scripts that carry .gpu-pack (bench/gpu/make_pack.sh): unpacks its site
# packages and wheels into /tmp/gsite, installs pd and writes what the host has to $OUT/env.txt
# (bench/gpu/setup_host.sh), and puts FlashInfer's and Triton's JIT caches under /tmp.
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache TRITON_CACHE_DIR=/tmp/triton-cache
# wait_ready PORT [SECONDS]: until pd-serve on 127.0.0.1:PORT answers /health (default 300 s).
wait_ready() {
  python3 - "$1" "${2:-300}" <<'PY'
import sys, time, httpx
port, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(1)
PY
}
