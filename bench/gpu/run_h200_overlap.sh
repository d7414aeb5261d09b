#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 8): shared experts on a side stream (pd.model.moe).
# GPU tests (bit-equality with in-line, graph == eager, piecewise), then the decode step b1-128 with its kernel
# classes, then the MTP K=1 step against the plain one. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 280 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_piecewise.py -rfE \
  -k "shared_experts or graph_replay or extend_graph or agrees or piecewise" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout 170 python3 -m pd.bench.decode_step --contexts 1024 --iters 15 --prefill-tokens 4096 --breakdown 1,8,64 \
  --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step rc=$? (t=$(elapsed) s)"; grep -vE "^\{|^$|Warn|warn" $OUT/decode_step.txt | tail -40
timeout $(( 580 - $(elapsed) )) python3 -m pd.bench.spec_step --batches 1,8,32 --ks 1 --context 1024 --iters 10 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step rc=$? (t=$(elapsed) s)"; grep -E "^\|" $OUT/spec_step.txt | tail -6
