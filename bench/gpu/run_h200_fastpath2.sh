#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 6: GPU correctness tests, MoE kernel tuning, kernel
# benchmark, then the §8-shape decode/prefill benchmark with the tuned table. Carry: .whl-flashinfer.
set -u
source bench/gpu/setup_host.sh .whl-flashinfer > $OUT/env.txt 2>&1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache
echo "== gpu tests"
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -s -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?"
grep -E "agreement|passed|failed|^E  " $OUT/gpu_tests.log | grep -v "^E  *[IW]1" | tail -12
echo "== tune"
timeout 200 python3 -m pd.bench.tune_moe --max-seconds 170 > $OUT/tune.log 2>&1; echo "rc=$?"
tail -3 $OUT/tune.log; cp kernels/configs/*.json $OUT/ 2>/dev/null
echo "== moe kernels"
timeout 60 python3 -m pd.bench.moe_kernels --design-ceilings --no-ref --out $OUT/moe_kernels.json > $OUT/moe_kernels.log 2>&1; echo "rc=$?"
tail -22 $OUT/moe_kernels.log
echo "== decode/prefill benchmark (tuned)"
timeout 150 python3 -m pd.bench.decode_step --iters 15 --out $OUT/decode_step.json --profile $OUT/profile.txt > $OUT/decode_step.log 2>&1; echo "rc=$?"
tail -18 $OUT/decode_step.log
