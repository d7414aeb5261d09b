#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 8), for after run_h200_next5.sh passes: the
# decode step and the MTP K = 1 step with each attention backend in one call (same host, same hour), the loop
# at batch 128 unprofiled (why the overlapped loop ran 0.5 ms above its replay there), and the FP8 table.
# Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
for backend in flashinfer triton; do
  timeout 150 python3 -m pd.bench.decode_step --attention-backend $backend --contexts 1024 --iters 15 \
    --prefill-tokens 4096 --out $OUT/decode_$backend.json > $OUT/decode_$backend.txt 2>&1
  echo "== decode_step $backend rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_$backend.txt
  timeout 60 python3 -m pd.bench.spec_step --attention-backend $backend --batches 1,8,32 --ks 1 --context 1024 \
    --iters 10 --out $OUT/spec_$backend.json > $OUT/spec_$backend.txt 2>&1
  echo "== spec_step $backend rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_$backend.txt
done
timeout 60 python3 -m pd.bench.loop_trace --batches 128 --steps 20 --out $OUT/traces > $OUT/loop_trace.txt 2>&1
echo "== loop_trace rc=$? (t=$(elapsed) s)"; grep -E "^## batch 128, unprofiled" $OUT/loop_trace.txt
timeout $(( 585 - $(elapsed) )) python3 -m pd.bench.decode_step --quantization fp8 --contexts 1024 --iters 10 \
  --prefill-tokens 4096 --out $OUT/decode_fp8.json > $OUT/decode_fp8.txt 2>&1
echo "== decode_step fp8 rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_fp8.txt
rm -rf $OUT/traces
