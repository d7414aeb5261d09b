#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU): issue 18's cost figures (pd.bench.sampling_cost, batch 1 and 64, context
# 1K, DESIGN.md §8 shape, dummy weights), then the GPU tests (tests/test_gpu.py: graph replay with logits
# processing, grammar masks, seeded sampling; tests/test_routing.py: the fused router; tests/test_host_staging.py
# on cuda pools). Carry: .gpu-pack. Everything comes back as one archive.
set -u
source bench/gpu/setup_pack.sh
timeout 300 python3 -m pd.bench.sampling_cost --batches 1,64 --out $OUT/sampling_cost.json 2>&1 \
  | tee $OUT/sampling_cost.txt | tail -25
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_routing.py -rfE 2>&1 | tee $OUT/pytest_gpu.txt | tail -20
timeout 60 python3 -m pytest -q tests/test_host_staging.py -k cuda 2>&1 | tee $OUT/pytest_staging.txt | tail -8
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -f $OUT/* && mv /tmp/all.tar.xz $OUT/
