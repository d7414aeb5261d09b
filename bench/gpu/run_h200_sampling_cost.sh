#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 18's figures: pd.bench.sampling_cost (top-5 logprobs, penalties,
# a JSON-schema grammar and all of them against the plain decode step, batch 1 and 64, context 1K, DESIGN.md
# §8 shape with dummy weights). Carry: .gpu-pack (its wheels must include llguidance for the grammar rows).
set -u
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache TRITON_CACHE_DIR=/tmp/triton-cache
timeout 500 python3 -m pd.bench.sampling_cost --batches 1,8,64 --out $OUT/sampling_cost.json 2>&1 | tee $OUT/sampling_cost.txt | tail -25
