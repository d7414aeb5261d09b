#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 6, part 2: tune the MoE kernels, benchmark them, and the
# decode/prefill step again with the tuned table. Carry: .whl-flashinfer. Logs under $OUT.
set -u
source bench/gpu/setup_host.sh .whl-flashinfer > $OUT/env.txt 2>&1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache
echo "== tune"
timeout 260 python3 -m pd.bench.tune_moe --max-seconds 230 > $OUT/tune.log 2>&1; echo "rc=$?"
tail -5 $OUT/tune.log; cp kernels/configs/*.json $OUT/ 2>/dev/null
echo "== moe kernels"
timeout 90 python3 -m pd.bench.moe_kernels --design-ceilings --out $OUT/moe_kernels.json > $OUT/moe_kernels.log 2>&1; echo "rc=$?"
tail -25 $OUT/moe_kernels.log
echo "== decode/prefill benchmark (tuned)"
timeout 200 python3 -m pd.bench.decode_step --out $OUT/decode_step_tuned.json > $OUT/decode_step_tuned.log 2>&1; echo "rc=$?"
tail -20 $OUT/decode_step_tuned.log
