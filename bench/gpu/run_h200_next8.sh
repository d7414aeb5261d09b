#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 9), right after run_h200_next7.sh on the warm host: the
# batch-128 decode loop unprofiled (why it runs ~0.5 ms above its replay), then the MTP step for K = 1, 2, 3 at
# batch 1 / 8 / 32 / 64 with floors and replays. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 90 python3 -m pd.bench.loop_trace --batches 128 --steps 20 --out $OUT/traces > $OUT/loop_trace.txt 2>&1
echo "== loop_trace rc=$? (t=$(elapsed) s)"; grep -A12 -E "^## batch 128, unprofiled" $OUT/loop_trace.txt | head -30
rm -rf $OUT/traces
timeout $(( 560 - $(elapsed) )) python3 -m pd.bench.spec_step --batches 1,8,32,64 --ks 1,2,3 --context 1024 \
  --iters 10 --out $OUT/spec_k123.json > $OUT/spec_k123.txt 2>&1
echo "== spec_step K = 1-3 rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_k123.txt
