#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 7) for the next session's first call. The
# model-level GPU tests on the per-expert alignment (e1ec5b3; its CUDA kernel tests passed, the model ones did not
# run), then the overlapped loop's phases without a profiler (pd.bench.loop_trace: is the host late for the next
# replay, and how much GPU time lies between replays?) at batch 1, 8 and 64. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 330 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_piecewise.py -rfE \
  -k "cuda_against or agrees or graph_replay or overlapped or piecewise or warm_up" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout $(( 585 - $(elapsed) )) python3 -m pd.bench.loop_trace --batches 1,8,64 --steps 6 --out $OUT/traces \
  > $OUT/loop_trace.txt 2>&1
echo "== loop_trace (t=$(elapsed) s)"; grep -E "^## " $OUT/loop_trace.txt
xz -T0 $OUT/traces/*.json 2>/dev/null
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
