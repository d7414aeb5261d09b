#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 18's figures: pd.bench.sampling_cost (top-5 logprobs, penalties,
# a JSON-schema grammar and all of them against the plain decode step, batch 1 and 64, context 1K, DESIGN.md
# §8 shape with dummy weights). Carry: .gpu-pack (its wheels must include llguidance for the grammar rows).
set -u
source bench/gpu/setup_pack.sh
timeout 500 python3 -m pd.bench.sampling_cost --batches 1,8,64 --out $OUT/sampling_cost.json 2>&1 | tee $OUT/sampling_cost.txt | tail -25
