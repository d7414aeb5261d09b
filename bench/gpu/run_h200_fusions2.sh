#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-03 (session 6), after run_h200_fusions.sh: moe_align in one
# 16-warp program up to 512 pairs at 64 experts (was three launches past 256) against its reference and
# replayed in a graph; the FP8 model with the MLA prologue kernel against its dequantized run and the FP8
# kernels' torch references; then the decode table in bf16 (kernel classes at 1 and 64, a profile at batch 1)
# and in FP8 (classes at 64). DESIGN.md §8 shape, dummy weights. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -rfE -k "fused_moe_matches \
  or deterministic or cuda_graph_replay or fp8_model_agrees or fp8_kernels_in_the_model" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout 150 python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --breakdown 1,64 \
  --profile $OUT/profile_b1.txt --profile-batch 1 --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step bf16 (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step.txt | grep -v arn | tail -40
timeout $(( 585 - $(elapsed) )) python3 -m pd.bench.decode_step --quantization fp8 --batches 1,8,32,64,128 \
  --contexts 1024 --breakdown 64 --out $OUT/decode_step_fp8.json > $OUT/decode_step_fp8.txt 2>&1
echo "== decode_step fp8 (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step_fp8.txt | grep -v arn | tail -30
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
