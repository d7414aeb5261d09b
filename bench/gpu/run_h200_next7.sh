#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 9): the MTP K = 1 step with its floor and the GPU time
# of its replays alone beside the serial step (what a loop that overlaps the host work would reach), FlashInfer
# then the triton backend; the FP8 decode table after session 8's work; pd's split-KV MLA kernel with smaller
# splits if time is left. A fresh host's FlashInfer JIT lands in the first step. Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
spec() {  # $1: attention backend, $2: time limit
  timeout $2 python3 -m pd.bench.spec_step --attention-backend $1 --batches 1,8,32 --ks 1 --context 1024 \
    --iters 15 --out $OUT/spec_$1.json > $OUT/spec_$1.txt 2>&1
  echo "== spec_step $1 rc=$? (t=$(elapsed) s)"; grep -E "^\| [0-9]" $OUT/spec_$1.txt
}
spec flashinfer 250
timeout 190 python3 -m pd.bench.decode_step --quantization fp8 --contexts 1024 --iters 10 \
  --prefill-tokens 4096 --out $OUT/decode_fp8.json > $OUT/decode_fp8.txt 2>&1
echo "== decode_step fp8 rc=$? (t=$(elapsed) s)"; grep -E "^\| 1024" $OUT/decode_fp8.txt
spec triton $(( 520 - $(elapsed) ))
timeout $(( 590 - $(elapsed) )) python3 -m pd.bench.mla_decode --backends fa3,triton,triton:32,triton:64 \
  --batches 1,8,16 --out $OUT/mla_decode.json > $OUT/mla_decode.txt 2>&1
echo "== mla_decode rc=$? (t=$(elapsed) s)"; grep -E "^\|" $OUT/mla_decode.txt
