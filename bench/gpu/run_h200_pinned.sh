#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04: the decode launch's host inputs staged in pinned buffers (the
# loop trace showed the host blocked in pageable copies, which wait for the stream to drain, so the GPU idled
# ~0.6 ms a step at batch 64). GPU tests of every graph path the staging feeds, then the decode table and the
# loop trace at batch 1 and 64 again (the staging gave no time and was reverted in 71cb243). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_piecewise.py -rfE \
  -k "graph_replay or overlapped or logits_processing or seeded or extend_graph or piecewise or grammar" \
  > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout 150 python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --iters 20 \
  --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -A8 "engine's decode loop" $OUT/decode_step.txt
timeout $(( 540 - $(elapsed) )) python3 -m pd.bench.loop_trace --batches 1,64 --steps 6 --out $OUT/traces \
  > $OUT/loop_trace.txt 2>&1
echo "== loop_trace (t=$(elapsed) s)"; grep -E "^## batch|^\| [0-9]" $OUT/loop_trace.txt | head -16
xz -T0 $OUT/traces/*.json
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
