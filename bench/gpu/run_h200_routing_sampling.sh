#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU): the fused router against its torch reference and the warm-up test
# (tests/test_routing.py; tests/test_gpu.py -k "warm_up or graph": graph replay against eager after the
# graph inputs became one packed copy), issue 18's cost figures (pd.bench.sampling_cost,
# batch 1 and 64, context 1K) and issue 17's decode table with the kernel-class breakdown at batch 1 and 64
# and a profile at batch 64 (pd.bench.decode_step), all at the DESIGN.md §8 shape with dummy bf16 weights.
# Carry: .gpu-pack. Everything comes back as one archive.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 150 python3 -m pytest -q -m gpu tests/test_routing.py tests/test_gpu.py -k "routing or warm_up or graph_replay or agrees" -rfE \
  > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -6
timeout 120 python3 -m pd.bench.sampling_cost --batches 1,64 --out $OUT/sampling_cost.json > $OUT/sampling_cost.txt 2>&1
echo "== sampling cost (t=$(elapsed) s)"; tail -14 $OUT/sampling_cost.txt
timeout $(( 360 - $(elapsed) )) python3 -m pd.bench.decode_step --batches 1,8,64,128 --contexts 1024 \
  --breakdown 1,64 --profile $OUT/profile_b64.txt --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\s*$" $OUT/decode_step.txt | tail -40
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -f $OUT/* && mv /tmp/all.tar.xz $OUT/
