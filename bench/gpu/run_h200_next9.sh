#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 9) for the next session's first call: the
# triton backend as changed after its last GPU run (splits of >= 64 positions at 16 heads; decode-mode steps of
# up to 16 sequences, a bucket size, instead of 32 queries). Its kernel and model tests, then the MTP K = 1 step and
# the decode table with it. If both hold, `auto` picks it (pd/engine/runner.py, tests/test_gpu.py's agreement
# test) and this runs again with the default. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_mla_decode.py tests/test_gpu.py -rfE \
  -k "cuda or triton" > $OUT/pytest_gpu.txt 2>&1
echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head
timeout 130 python3 -m pd.bench.spec_step --attention-backend triton --batches 1,8,16,32 --ks 1 --context 1024 \
  --iters 10 --out $OUT/spec_triton.json > $OUT/spec_triton.txt 2>&1
echo "== spec_step triton rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_triton.txt
timeout $(( 500 - $(elapsed) )) python3 -m pd.bench.decode_step --attention-backend triton --contexts 1024 \
  --iters 10 --prefill-tokens 4096 --out $OUT/decode_triton.json > $OUT/decode_triton.txt 2>&1
echo "== decode_step triton rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_triton.txt
