#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 9): `auto` now picks the triton backend (pd's split-KV
# MLA decode for decode steps of up to 16 sequences, splits of >= 64 positions at 16 heads; FlashInfer for the
# rest). Its kernel tests, every model-level GPU test, then the MTP K = 1 step and the decode table with it.
# Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_mla_decode.py tests/test_gpu.py -rfE -x \
  > $OUT/pytest_gpu.txt 2>&1
echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head
timeout 130 python3 -m pd.bench.spec_step --batches 1,8,16,32 --ks 1 --context 1024 --iters 10 \
  --out $OUT/spec_auto.json > $OUT/spec_auto.txt 2>&1
echo "== spec_step auto rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_auto.txt
timeout $(( 500 - $(elapsed) )) python3 -m pd.bench.decode_step --contexts 1024 --iters 10 --prefill-tokens 4096 \
  --out $OUT/decode_auto.json > $OUT/decode_auto.txt 2>&1
echo "== decode_step auto rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_auto.txt
