#!/usr/bin/env bash
# Issue 9 on nvidia-h200-x4 (not run yet: that kind was never lent to this project's sessions).
# 2P2D (prefill --dp 2 --ep 2 on GPUs 0-1, decode --dp 2 --ep 2 on GPUs 2-3) vs the one-GPU run,
# the rate sweep, and the KV transfer between a prefill GPU and a decode GPU.
# Call A carries .whl-gpu1 (FlashInfer + proxy wheels), call B right after carries .whl-gpu2 (Mooncake, grpcio):
#   A: python3 -m pip install -q --no-index --no-deps --target /tmp/site1 .whl-gpu1/*.whl
#   B: bash bench/gpu/run_x4_2p2d.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl-gpu2/*.whl
export PYTHONPATH=/tmp/site2:/tmp/site1 FLASHINFER_WORKSPACE_BASE=$PWD/.fi-cache
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . >/dev/null 2>&1
timeout 300 python3 -m pd.bench.same_tokens --system-a 2p2d --system-b 1gpu --out-dir $OUT
timeout 120 python3 -m pd.bench.kv_transfer --device cuda --protocol nvlink --src-device cuda:0 --dst-device cuda:2 \
  --tokens 4096 --page-sizes 64 --out $OUT/kv_transfer_0to2.md > $OUT/kv.log 2>&1; tail -8 $OUT/kv.log
timeout 420 python3 -m pd.bench.disagg_vs_colocated --systems 2p2d --workloads 2048:256 --rates "8,16,24,32,48" \
  --budget-s 380 --seconds-per-rate 8 --out-dir $OUT 2>&1 | tail -15
# The low-latency dispatch + combine time inside the decode graph: pd.bench.ep_latency --backends mooncake (2 ranks).
