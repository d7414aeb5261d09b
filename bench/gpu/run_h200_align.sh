#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04: (1) pd.bench.stream_block: does a host call right after a graph
# replay wait for the graph (the overlapped loop's host blocked in a 2 KB copy)? (2) moe_align as one program per
# expert: the CUDA kernel tests, then the decode table and a replay's kernel inventory at batch 64 (was 17 us a
# layer for the alignment). Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 60 python3 -m pd.bench.stream_block > $OUT/stream_block.txt 2>&1; echo "== stream_block (t=$(elapsed) s)"
cat $OUT/stream_block.txt | grep "|"
timeout 90 python3 -m pytest -q -m gpu tests/test_kernels.py -rfE > $OUT/pytest_kernels.txt 2>&1
echo "== kernel tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_kernels.txt)"; grep -E "^E|FAILED" $OUT/pytest_kernels.txt | head
timeout 240 python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --iters 20 \
  --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -A8 "engine's decode loop" $OUT/decode_step.txt
timeout $(( 440 - $(elapsed) )) python3 -m pd.bench.loop_trace --batches 64 --steps 4 --out $OUT/traces \
  > $OUT/loop_trace.txt 2>&1
echo "== loop_trace (t=$(elapsed) s)"; grep -E "^## |align|gate_up|down_sorted" $OUT/loop_trace.txt | head -8
xz -T0 $OUT/traces/*.json 2>/dev/null
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
