#!/usr/bin/env bash
# Device run on nvidia-h200-x2, call B of issue 7 (right after call A, on the same warm machine):
# adds Mooncake (+ grpcio), runs the 1P1D sweep, then the Mooncake EP shapes still missing (issue 5).
# Carry: .whl-gpu2.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl-gpu2/*.whl
export PYTHONPATH=$PWD/.site FLASHINFER_WORKSPACE_BASE=$PWD/.fi-cache
python3 -c "import flashinfer, mooncake.engine, starlette; print('ok')" || exit 1
systems=1p1d; [ -f .colocated-done ] || systems=1p1d,colocated
timeout 420 python3 -m pd.bench.disagg_vs_colocated --systems $systems --budget-s 280 --seconds-per-rate 10 --out-dir $OUT 2>&1 | grep -v "^\[1p1d\] [0-9]\|^\[colocated\] [0-9]" | tail -40
timeout 150 python3 -m pd.bench.ep_latency --device cuda --backends mooncake --timeout-s 35 --out $OUT/ep_mooncake.json > $OUT/ep_mooncake.log 2>&1; echo "ep rc=$?"
grep "^| mooncake" $OUT/ep_mooncake.log | head -24
