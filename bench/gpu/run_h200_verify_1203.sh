#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), first of the session after 2026-12-03: the GPU tests of everything built
# on CPU since the last device call (tests/test_gpu.py in full: the decode graph's log_softmax output and top
# logprobs from it, the one-pass rotary; tests/test_routing.py), then issue 18's cost with a profile per option
# (pd.bench.sampling_cost --profile) and issue 17's decode table with its kernel-class breakdown
# (pd.bench.decode_step). DESIGN.md §8 shape, dummy bf16 weights. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_routing.py -rfE > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head -6
timeout 120 python3 -m pd.bench.sampling_cost --batches 1,64 --profile $OUT/sampling_profile \
  --out $OUT/sampling_cost.json > $OUT/sampling_cost.txt 2>&1
echo "== sampling cost (t=$(elapsed) s)"; tail -13 $OUT/sampling_cost.txt
timeout $(( 560 - $(elapsed) )) python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 \
  --breakdown 1,64 --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\s*$|^\{" $OUT/decode_step.txt | tail -36
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
