#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 8), the last: head_mm up to 128 rows (the kernel against
# einsum on CUDA, then the decode step b1-128 and graph replay == eager with it), the MTP K=1 step with what time is
# left. Carry: .gpu-pack. Outcome: decode_step timed out behind a cold FlashInfer JIT (no b128 timing), so
# skinny.MAX_ROWS went back to the measured 64; the tests and spec_step ran.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 90 python3 -m pytest -q -m gpu tests/test_kernels_skinny.py -rfE > $OUT/pytest_skinny.txt 2>&1
echo "== skinny tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_skinny.txt)"; grep -E "^E|FAILED" $OUT/pytest_skinny.txt | head
timeout 200 python3 -m pd.bench.decode_step --contexts 1024 --iters 15 --prefill-tokens 4096 \
  --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step rc=$? (t=$(elapsed) s)"; grep -vE "^\{|^$|Warn|warn" $OUT/decode_step.txt | head -20
timeout $(( 390 - $(elapsed) )) python3 -m pytest -q -m gpu tests/test_gpu.py -rfE \
  -k "graph_replay_equals_eager_decode or shared_experts" > $OUT/pytest_gpu.txt 2>&1
echo "== model tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head
timeout $(( 430 - $(elapsed) )) python3 -m pd.bench.spec_step --batches 1,8,32 --ks 1 --context 1024 --iters 10 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step rc=$? (t=$(elapsed) s)"; grep -E "^\|" $OUT/spec_step.txt | tail -3
