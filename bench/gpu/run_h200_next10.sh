#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 10) for the next session's first call. Session
# 10 had no device; it built MTP's pipelined loop (Engine.pipelined: each verify step launched once the one before
# is read, before the host postprocesses it). First the GPU tests that cover it and the triton backend as changed
# in session 9 (never run on a GPU in that form), then issue 20's figures: spec_step at K = 1 with both backends
# (the plain overlapped loop, the speculative loop serial and pipelined, the replays alone), then the decode table
# with the triton backend. If the tests hold and triton's loop is the faster, `auto` picks triton
# (pd/engine/runner.py make_attention_backend; tests/test_gpu.py's agreement test). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 240 python3 -m pytest -q -m gpu tests/test_kernels_mla_decode.py tests/test_gpu.py -rfE \
  -k "cuda or triton or mtp or pipelined or overlapped" > $OUT/pytest_gpu.txt 2>&1
echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head
for backend in triton flashinfer; do
  timeout 150 python3 -m pd.bench.spec_step --attention-backend $backend --batches 1,8,16,32 --ks 1 \
    --context 1024 --iters 10 --out $OUT/spec_$backend.json > $OUT/spec_$backend.txt 2>&1
  echo "== spec_step $backend rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_$backend.txt | tail -4
done
# Would the split kernel win verify steps of 32 sequences (64 queries at K = 1), which go to FlashInfer (and its
# ~1.3 ms host plan) now? Query rows 16-128 against fa3, per layer.
timeout 60 python3 -m pd.bench.mla_decode --backends fa3,triton --batches 16,32,64,128 --out $OUT/mla_rows.json \
  > $OUT/mla_rows.txt 2>&1
echo "== mla_decode rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/mla_rows.txt
timeout $(( 560 - $(elapsed) )) python3 -m pd.bench.decode_step --attention-backend triton --contexts 1024 \
  --iters 10 --prefill-tokens 4096 --out $OUT/decode_triton.json > $OUT/decode_triton.txt 2>&1
echo "== decode_step triton rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_triton.txt
