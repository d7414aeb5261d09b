#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 10): the second call after run_h200_next10.sh.
# spec_step at K = 1 with FlashInfer (today's auto), for the pipelined loop against the triton backend's, then the
# decode table with the triton backend (its plain decode steps as changed in session 9). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 200 python3 -m pd.bench.spec_step --attention-backend flashinfer --batches 1,8,16,32 --ks 1 \
  --context 1024 --iters 10 --out $OUT/spec_flashinfer.json > $OUT/spec_flashinfer.txt 2>&1
echo "== spec_step flashinfer rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_flashinfer.txt | tail -4
timeout $(( 580 - $(elapsed) )) python3 -m pd.bench.decode_step --attention-backend triton --contexts 1024 \
  --iters 10 --prefill-tokens 4096 --out $OUT/decode_triton.json > $OUT/decode_triton.txt 2>&1
echo "== decode_step triton rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_triton.txt
