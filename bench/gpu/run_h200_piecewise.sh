#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04: piecewise CUDA graphs (issue 17 item 4). The GPU tests of the
# cut graphs (decode and prompt steps bit for bit against whole graphs, greedy decode against eager) and the
# graph tests they could break (decode and extend replay against eager, MTP, warm-up), then pd.bench.piecewise:
# whole graphs, piecewise graphs and eager at decode batches and prompt-step buckets, each beside its floor.
# Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 330 python3 -m pytest -q -m gpu tests/test_gpu_piecewise.py tests/test_gpu.py -rfE \
  -k "piecewise or graph_replay or extend_graph or warm_up or cuda_against" > $OUT/pytest_gpu.txt 2>&1
echo "== tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED|Error" $OUT/pytest_gpu.txt | head -20
timeout $(( 585 - $(elapsed) )) python3 -m pd.bench.piecewise --out $OUT/piecewise.json > $OUT/piecewise.txt 2>&1
echo "== piecewise (t=$(elapsed) s)"; grep -vE "^\s*$" $OUT/piecewise.txt | grep -v arn | tail -16
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
