#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 8): MLA's absorbed factors on pd.kernels.skinny.head_mm
# (no copies of strided operands) on top of the side-stream shared experts. GPU tests (the kernel against einsum,
# graph == eager, agreement with transformers), then the decode step b1-128 with kernel classes at 1, 8 and 128,
# then the MTP K=1 step. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 280 python3 -m pytest -q -m gpu tests/test_kernels_skinny.py tests/test_gpu.py -rfE \
  -k "on_cuda or usable or shared_experts or graph_replay or agrees or overlapped" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout 170 python3 -m pd.bench.decode_step --contexts 1024 --iters 15 --prefill-tokens 4096 --breakdown 1,8,128 \
  --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step rc=$? (t=$(elapsed) s)"; grep -vE "^\{|^$|Warn|warn" $OUT/decode_step.txt | head -20
timeout $(( 580 - $(elapsed) )) python3 -m pd.bench.spec_step --batches 1,8,32 --ks 1 --context 1024 --iters 10 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step rc=$? (t=$(elapsed) s)"; grep -E "^\|" $OUT/spec_step.txt | tail -3
