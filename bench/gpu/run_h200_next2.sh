#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-03 (session 5) for the next session: the GPU tests of
# penalties, bias and min_tokens in the launched decode step (2b0ad4a: processing on the device behind the replay,
# the counts updated without a host sync; such requests overlap too), then issue 18's sampling cost again
# (penalties + bias was +9.5% at batch 64 on the serial path) and the decode table with the engine loop.
# DESIGN.md §8 shape, dummy bf16 weights. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 90 python3 bench/gpu/probe_kernels_api.py > $OUT/probe_kernels_api.txt 2>&1
echo "== probe (t=$(elapsed) s)"; grep -vE "^flashinfer\.(rope|norm)\." $OUT/probe_kernels_api.txt | tail -20
timeout 220 python3 -m pytest -q -m gpu tests/test_gpu.py -rfE -k "overlapped or logits_processing or grammar \
  or seeded_sampling or warm_up" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -8
timeout 120 python3 -m pd.bench.sampling_cost --batches 1,64 --iters 40 --out $OUT/sampling_cost.json \
  > $OUT/sampling_cost.txt 2>&1
echo "== sampling cost (t=$(elapsed) s)"; tail -13 $OUT/sampling_cost.txt
timeout $(( 570 - $(elapsed) )) python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --breakdown 1,64 \
  --profile $OUT/profile_b64.txt --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step.txt | tail -30
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
