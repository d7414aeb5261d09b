#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU): graph replay against eager decode and the GPU fast path against
# transformers (tests/test_gpu.py), after the decode graph's inputs became one packed copy, attention planning
# moved to host tensors and routing to the fused kernel. Carry: .gpu-pack.
set -u
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache TRITON_CACHE_DIR=/tmp/triton-cache
timeout 270 python3 -m pytest -v -m gpu tests/test_gpu.py -rfE \
  -k "graph_replay_equals_eager_decode or agrees_with_transformers_fp32 or warm_up" > $OUT/pytest_gpu.txt 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $OUT/pytest_gpu.txt | head -20
