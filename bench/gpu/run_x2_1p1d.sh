#!/usr/bin/env bash
# Device run on nvidia-h200-x2, call B of issue 7 (right after call A, on the same warm machine):
# adds Mooncake (+ grpcio), runs the 1P1D sweep, then the Mooncake EP shapes still missing (issue 5).
# Carry: .whl-gpu2.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl-gpu2/*.whl
export PYTHONPATH=$PWD/.site FLASHINFER_WORKSPACE_BASE=$PWD/.fi-cache
python3 -c "import flashinfer, mooncake.engine, starlette; print('ok')" || exit 1
timeout 540 python3 -m pd.bench.disagg_vs_colocated --systems 1p1d,colocated --budget-s 170 --seconds-per-rate 8 --out-dir $OUT 2>&1 | grep -v "^\[1p1d\] [0-9]\|^\[colocated\] [0-9]" | tail -40
