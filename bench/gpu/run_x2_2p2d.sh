#!/usr/bin/env bash
# Device run on nvidia-h200-x2, issue 9 as far as two GPUs allow: a 2-rank prefill instance and a 2-rank
# decode instance (--dp 2 --ep 2, low-latency Mooncake EP inside the decode CUDA graphs) sharing GPUs 0-1,
# greedy tokens compared with the one-GPU run. Call A: `bash bench/gpu/run_x2_experiment.sh jit` (carry
# .whl-fi); call B, on the same warm machine: this script (carry .whl-serve).
set -u
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache
source bench/gpu/setup_host.sh .whl-serve > $OUT/env.txt 2>&1
timeout 420 python3 -m pd.bench.same_tokens --system-a 2p2d-2gpu --system-b 1gpu --out-dir $OUT; echo "rc=$?"
for f in $OUT/same-tokens-*.log; do echo "--- $f"; grep -v "HTTP Request\|^I1123\|^W1123" "$f" | tail -8 | cut -c1-300; done
