#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04: where the overlapped decode loop spends its time beyond the
# replay (issue 17): pd.bench.loop_trace at batch 1 and 64 (GPU idle gaps and the host calls in them, the
# replay's kernel inventory), Chrome traces kept. Carry: .gpu-pack. One archive comes back.
set -u
start=$(date +%s)
source bench/gpu/setup_pack.sh
timeout 400 python3 -m pd.bench.loop_trace --batches 1,64 --steps 6 --out $OUT/traces > $OUT/loop_trace.txt 2>&1
echo "== loop_trace (t=$(( $(date +%s) - start )) s)"; grep -E "^## |^\| [0-9]" $OUT/loop_trace.txt | head -40
xz -T0 $OUT/traces/*.json
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
