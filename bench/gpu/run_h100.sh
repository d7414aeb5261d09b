#!/usr/bin/env bash
# Device runs on nvidia-h100-x1, issue 6: GPU correctness tests and the H100 MoE block table.
#   bash bench/gpu/run_h100.sh tests-tune   # GPU tests, then tune (writes $OUT/moe_<device>.json)
#   bash bench/gpu/run_h100.sh bench        # kernel and decode/prefill benchmarks with the checked-in table
#   bash bench/gpu/run_h100.sh tests-step   # model GPU tests, then the decode/prefill benchmark
# Carry: .whl-gpu1 (flashinfer and its deps). Logs under $OUT.
set -u
source bench/gpu/setup_host.sh .whl-gpu1 > $OUT/env.txt 2>&1; head -3 $OUT/env.txt
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache
case "${1:-}" in
tests-tune)
  echo "== gpu tests"
  timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py -s -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?"
  grep -E "agreement|passed|failed|^E  " $OUT/gpu_tests.log | grep -v "^E  *[IW]1" | tail -14
  echo "== tune"
  timeout 300 python3 -m pd.bench.tune_moe --max-seconds 270 > $OUT/tune.log 2>&1; echo "rc=$?"
  tail -4 $OUT/tune.log; cp kernels/configs/*.json $OUT/ 2>/dev/null ;;
bench)
  echo "== moe kernels"
  timeout 90 python3 -m pd.bench.moe_kernels --out $OUT/moe_kernels.json > $OUT/moe_kernels.log 2>&1; echo "rc=$?"
  tail -24 $OUT/moe_kernels.log
  echo "== decode/prefill benchmark (tuned)"
  timeout 240 python3 -m pd.bench.decode_step --iters 15 --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "rc=$?"
  tail -20 $OUT/decode_step.log ;;
tests-step)
  echo "== gpu tests (model)"
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -s -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?"
  grep -E "agreement|passed|failed|^E  " $OUT/gpu_tests.log | grep -v "^E  *[IW]1" | tail -14
  echo "== decode/prefill benchmark (tuned)"
  timeout 300 python3 -m pd.bench.decode_step --iters 15 --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "rc=$?"
  tail -20 $OUT/decode_step.log ;;
*) echo "usage: run_h100.sh tests-tune|bench|tests-step"; exit 2 ;;
esac
