#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-03 (session 6): issue 17's first fusions. The MLA prologue kernel
# (pd.kernels.mla_rope: the latent's norm and both rotary parts in one launch) against the torch path on CUDA;
# the model against transformers and graph replay against eager with it (and with the router's logits from one
# bf16 GEMM with float32 output); then the decode table with kernel classes at batch 1 and 64 and a profile at
# 64, and the MTP step at K = 1 (issue 20's ratio). DESIGN.md §8 shape, dummy bf16 weights. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_mla_rope.py tests/test_gpu.py -rfE \
  -k "cuda_against_torch or agrees or graph_replay or warm_up or overlapped" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout 200 python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --breakdown 1,64 \
  --profile $OUT/profile_b64.txt --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step.txt | grep -v Warn | tail -42
timeout $(( 585 - $(elapsed) )) python3 -m pd.bench.spec_step --batches 1,8,32 --ks 1 --context 1024 --iters 10 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/spec_step.txt | tail -8
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
