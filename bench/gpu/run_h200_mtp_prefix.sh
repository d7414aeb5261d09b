#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-03, issues 20 and 19 in one call (device time was short):
# GPU tests of the new graphs (extend graphs against their uncaptured step and eager prefill; FlashInfer's
# causal multi-query MLA against the torch reference, eager and in a graph bucket; MTP speculative decoding
# through the verify and draft graphs equals eager, greedy and oracle), pd.bench.spec_step (draft + verify
# step for K = 1..3 at batch 1/8/32/64 against the plain step; TPOT at acceptance 0.6-0.9), then the
# shared-prefix workload at rate 4 (cache hits' prompt tails now run in the extend graphs) and the
# multi-turn replay. DESIGN.md §8 shape, dummy bf16 weights. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 130 python3 -m pytest -q -m gpu tests/test_gpu.py -k "mtp or flashinfer_mla or extend_graph" -rfE -s > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED|rel err" $OUT/pytest_gpu.txt | head -12
timeout 170 python3 -m pd.bench.spec_step --batches 1,8,32,64 --ks 1,2,3 --context 1024 --iters 10 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step exit $? (t=$(elapsed) s)"; grep -vE "^\{" $OUT/spec_step.txt | tail -16
timeout 200 python3 -m pd.bench.prefix_cache --device cuda --rates 4 --groups 8 --per-group 8 \
  --out $OUT/prefix_cache.json > $OUT/prefix_cache.txt 2>&1
echo "== shared prefix exit $? (t=$(elapsed) s)"; grep -vE "^\{" $OUT/prefix_cache.txt | tail -34
left=$(( 565 - $(elapsed) ))
if [ $left -gt 60 ]; then
  timeout $left python3 -m pd.bench.prefix_cache --device cuda --rates "" --turns 4 --conversations 16 \
    --turn-rate 2 --out $OUT/multiturn.json > $OUT/multiturn.txt 2>&1
  echo "== multi-turn exit $? (t=$(elapsed) s)"; tail -9 $OUT/multiturn.txt
fi
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
