#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 10) for the next session's first call. Session
# 10 had no device; it built MTP's pipelined loop (Engine.pipelined: each verify step launched once the one before
# is read, before the host postprocesses it). First the GPU tests that cover it and the triton backend as changed
# in session 9 (never run on a GPU in that form), then issue 20's figures with the triton backend: spec_step at
# K = 1 (the plain overlapped loop, the speculative loop serial and pipelined with its host parts, the replays
# alone), batch 32 again with verify steps of 32 sequences on the split kernel instead of FlashInfer, and the split
# kernel at 16-128 query rows against fa3. run_h200_next11.sh follows (FlashInfer's figures, the decode table).
# If the tests hold and triton's loop is the faster, `auto` picks triton (pd/engine/runner.py
# make_attention_backend; tests/test_gpu.py's agreement test). Carry: .gpu-pack.
# Session 11 added the grammar tests (plain and MTP: a verify fills a bitmask per offset, each in its own buffer).
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 220 python3 -m pytest -q -m gpu tests/test_kernels_mla_decode.py tests/test_gpu.py -rfE \
  -k "cuda or triton or mtp or pipelined or overlapped or grammar" > $OUT/pytest_gpu.txt 2>&1
echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head
timeout 150 python3 -m pd.bench.spec_step --attention-backend triton --batches 1,8,16,32 --ks 1 \
  --context 1024 --iters 10 --out $OUT/spec_triton.json > $OUT/spec_triton.txt 2>&1
echo "== spec_step triton rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_triton.txt | tail -4
timeout 90 python3 -m pd.bench.spec_step --attention-backend triton --split-sequences 32 --batches 32 --ks 1 \
  --context 1024 --iters 10 --out $OUT/spec_triton_split32.json > $OUT/spec_triton_split32.txt 2>&1
echo "== spec_step triton, 32 sequences split rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_triton_split32.txt | tail -1
timeout $(( 580 - $(elapsed) )) python3 -m pd.bench.mla_decode --backends fa3,triton --batches 16,32,64,128 \
  --out $OUT/mla_rows.json > $OUT/mla_rows.txt 2>&1
echo "== mla_decode rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/mla_rows.txt
