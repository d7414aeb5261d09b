#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), 2026-12-04 (session 8): decode's small dense GEMMs, cuBLAS against the
# Triton skinny kernel (pd.kernels.skinny) with a config sweep, at 1-64 rows. Carry: .gpu-pack.
set -u
source bench/gpu/setup_pack.sh
timeout 500 python3 -m pd.bench.skinny --rows 1,8,32,64 --sweep --out $OUT/skinny.md > $OUT/skinny.txt 2>&1
echo "rc=$?"; tail -3 $OUT/skinny.txt; cat $OUT/skinny.md
