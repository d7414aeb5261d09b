#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-03 for the next session: the GPU tests of what was built
# after the session's device time ran out (the greedy verify graph and the chain graphs of MTP, eager drafting in
# decode's attention form, the extend graphs' test that did not run), pd.bench.spec_step again (K = 1..3 with the
# chains in graphs), then issue 16 item 3's chunk vs layer sends (bench/gpu/run_h200_layer_sends.sh's part).
# DESIGN.md §8 shape, dummy bf16 weights. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k "mtp or extend_graph or flashinfer_mla" -rfE -s > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED|rel err" $OUT/pytest_gpu.txt | head -12
timeout 230 python3 -m pd.bench.spec_step --batches 1,8,32,64 --ks 1,2,3 --context 1024 --iters 10 --breakdown 1,32 \
  --out $OUT/spec_step.json > $OUT/spec_step.txt 2>&1
echo "== spec_step exit $? (t=$(elapsed) s)"; grep -vE "^\{" $OUT/spec_step.txt | tail -60
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
