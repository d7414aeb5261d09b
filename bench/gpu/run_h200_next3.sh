#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-03 (session 6) for the next session. First the model-level
# GPU tests the session's last call could not run on its final code (87e0132: the MLA kernel writing the cache,
# the merged q/kv_a GEMM, the one-launch dispatch counts): the model against transformers, FP8 against its
# dequantized run, graph replay against eager (bf16, FP8, MTP), warm-up, the overlapped loop, the launched
# step's processing, the grammar masks (the pack now brings jsonschema, their validator). A fresh host
# JIT-builds FlashInfer's prefill kernel first (over two minutes): hence the long limit. Then FlashInfer's MLA
# decode backends at decode batches (pd.bench.mla_decode: is fa2 faster than the default fa3 at batch 1-8?) and
# the decode table. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 330 python3 -m pytest -q -m gpu tests/test_kernels_mla_rope.py tests/test_kernels_expert_counts.py \
  tests/test_gpu.py -rfE -k "cuda_against or agrees or graph_replay or warm_up or overlapped or logits_processing or grammar" \
  > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -12
timeout 90 python3 -m pd.bench.mla_decode --contexts 1024,4096 --out $OUT/mla_decode.json > $OUT/mla_decode.txt 2>&1
echo "== mla_decode (t=$(elapsed) s)"; tail -20 $OUT/mla_decode.txt
timeout $(( 585 - $(elapsed) )) python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 \
  --breakdown 1,64 --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step.txt | grep -v arn | tail -30
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
