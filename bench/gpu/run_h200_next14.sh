#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), session 12 (2026-12-05): run_h200_next13.sh cut to its one test that matters
# (the device time left could not hold the rest): test_grammar_masks_in_graph_equal_eager_and_hold[mtp], its own
# assertion fixed (the steps replay runner.verify_graphs), under the new auto (triton). Carry: .gpu-pack.
set -u
source bench/gpu/setup_pack.sh
timeout 140 python3 -m pytest -q -m gpu tests/test_gpu.py -rfE --tb=long -k "grammar_masks and mtp" \
  > $OUT/pytest_gpu4.txt 2>&1
echo "== GPU test: $(tail -1 $OUT/pytest_gpu4.txt)"; grep -E "^E |^FAILED|Error" $OUT/pytest_gpu4.txt | head -30
