#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 20: the verify and draft CUDA graphs of MTP speculative decoding.
# GPU tests (the extend graphs against uncaptured and eager prefill; FlashInfer's causal multi-query MLA against the torch reference, eager and in a graph bucket;
# speculative decoding through the graphs equals eager, greedy and oracle), then pd.bench.spec_step: the
# draft + verify step for K = 1, 2, 3 at batch 1/8/32/64 against the plain decode step, the oracle's tokens
# per step, TPOT at acceptance 0.6-0.9. DESIGN.md §8 shape with an MTP layer, dummy bf16 weights.
# Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 140 python3 -m pytest -q -m gpu tests/test_gpu.py -k "mtp or flashinfer_mla or extend_graph" -rfE > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED|Error" $OUT/pytest_gpu.txt | head -12
timeout $(( ${BUDGET:-560} - $(elapsed) )) python3 -m pd.bench.spec_step --batches 1,8,32,64 --ks 1,2,3 --context 1024 --iters 12 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step exit $? (t=$(elapsed) s)"; grep -vE "^\{" $OUT/spec_step.txt | tail -24
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
