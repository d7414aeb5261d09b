#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), session 12 (2026-12-05), after run_h200_next10.sh: that call's GPU tests ran
# past their 220 s bound with one failure, test_grammar_masks_in_graph_equal_eager_and_hold[mtp] (the 17th; no
# traceback before the bound). Here: that test and the one the bound cut (triton decode attention) with tracebacks,
# then run_h200_next11.sh's figures (spec_step with FlashInfer at K = 1; the decode table with triton). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -rfE --tb=long \
  -k "grammar_masks or triton_decode_attention" > $OUT/pytest_gpu2.txt 2>&1
echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu2.txt)"; grep -E "^E |^FAILED|Error" $OUT/pytest_gpu2.txt | head -30
timeout 150 python3 -m pd.bench.spec_step --attention-backend flashinfer --batches 1,8,16,32 --ks 1 \
  --context 1024 --iters 10 --out $OUT/spec_flashinfer.json > $OUT/spec_flashinfer.txt 2>&1
echo "== spec_step flashinfer rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_flashinfer.txt | tail -4
timeout $(( 570 - $(elapsed) )) python3 -m pd.bench.decode_step --attention-backend triton --contexts 1024 \
  --iters 10 --prefill-tokens 4096 --out $OUT/decode_triton.json > $OUT/decode_triton.txt 2>&1
echo "== decode_step triton rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_triton.txt
