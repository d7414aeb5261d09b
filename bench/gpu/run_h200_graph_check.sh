#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU): graph replay against eager decode and the GPU fast path against
# transformers (tests/test_gpu.py), after the decode graph's inputs became one packed copy, attention planning
# moved to host tensors and routing to the fused kernel. Carry: .gpu-pack.
set -u
source bench/gpu/setup_pack.sh
timeout 270 python3 -m pytest -v -m gpu tests/test_gpu.py -rfE \
  -k "graph_replay_equals_eager_decode or agrees_with_transformers_fp32 or warm_up" > $OUT/pytest_gpu.txt 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed|^E " $OUT/pytest_gpu.txt | head -20
