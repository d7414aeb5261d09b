#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), session 12 (2026-12-05), with `auto` now the triton backend and verify steps of
# two queries a sequence on the split kernel up to 32 sequences: the grammar tests again (plain and MTP; the MTP
# case's own assertion fixed: its steps replay runner.verify_graphs, not runner.graphs, run_h200_next12.sh), the
# agreement with transformers under auto, then spec_step at K = 1, batch 32, on the defaults. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -rfE --tb=long \
  -k "grammar_masks or agrees_with_transformers_fp32" > $OUT/pytest_gpu3.txt 2>&1
echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu3.txt)"; grep -E "^E |^FAILED|Error" $OUT/pytest_gpu3.txt | head -30
timeout $(( 280 - $(elapsed) )) python3 -m pd.bench.spec_step --batches 32 --ks 1 --context 1024 --iters 10 \
  --out $OUT/spec_auto_b32.json > $OUT/spec_auto_b32.txt 2>&1
echo "== spec_step auto b32 rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_auto_b32.txt | tail -1
