#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-03 (session 6), the session's last (~6 minutes of device time
# left): the MLA prologue kernel writing the KV cache itself, the local dispatch's counts in one launch and the
# merged q/kv_a projection (one GEMM) against their references and the model against transformers, bf16 and
# FP8, graph replay against eager; then the decode table (bf16, classes at batch 1). Each step leaves its own
# file under $OUT (a cut run still returns them). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 60 python3 -m pytest -q -m gpu tests/test_kernels_mla_rope.py tests/test_kernels_expert_counts.py -rfE \
  > $OUT/pytest_kernels.txt 2>&1
echo "== kernel tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_kernels.txt)"; grep -E "^E|FAILED" $OUT/pytest_kernels.txt | head -8
timeout 130 python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -k "agrees_with_transformers or \
  graph_replay_equals_eager_decode or fp8_model_agrees" > $OUT/pytest_model.txt 2>&1
echo "== model tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_model.txt)"; grep -E "^E|FAILED" $OUT/pytest_model.txt | head -8
timeout 90 python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --breakdown 1 --iters 10 \
  --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step.txt | grep -v arn | tail -30
