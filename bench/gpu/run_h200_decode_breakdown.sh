#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 17 item 5: pd.bench.decode_step at the DESIGN.md §8 shape (dummy
# bf16 weights, context 1K) with the decode step of batch 1 and 64 split into kernel classes and the gap
# (wall minus the kernels' sum). Carry: .gpu-pack.
set -u
source bench/gpu/setup_pack.sh
timeout 540 python3 -m pd.bench.decode_step --batches 1,8,32,64,128 --contexts 1024 --breakdown 1,64 --profile $OUT/profile_b64.txt \
  --out $OUT/decode_step.json 2>&1 | tee $OUT/decode_step.txt | tail -60
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -f $OUT/* && mv /tmp/all.tar.xz $OUT/
