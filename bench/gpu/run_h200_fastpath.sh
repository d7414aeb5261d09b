#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 6, part 1: GPU correctness tests, then the §8-shape
# decode/prefill benchmark with untuned kernels. Carry: .whl-flashinfer. Logs under $OUT.
set -u
source bench/gpu/setup_host.sh .whl-flashinfer > $OUT/env.txt 2>&1; grep -E "torch|flashinfer|triton|MISSING" $OUT/env.txt
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache
echo "== gpu tests"
timeout 330 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -x -s -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?"
grep -E "agreement|passed|failed|Error|error" $OUT/gpu_tests.log | grep -v "^E  *[IW]1" | tail -15
echo "== decode/prefill benchmark (default kernel configs)"
timeout 230 python3 -m pd.bench.decode_step --out $OUT/decode_step.json --profile $OUT/profile.txt > $OUT/decode_step.log 2>&1; echo "rc=$?"
tail -22 $OUT/decode_step.log
