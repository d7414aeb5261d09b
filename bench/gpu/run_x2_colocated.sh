#!/usr/bin/env bash
# Device run on nvidia-h200-x2, call A of issue 7: installs FlashInfer and the proxy's wheels into
# .site (kept while the machine is warm), then the colocated sweep. Carry: .whl-gpu1.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl-gpu1/*.whl
export PYTHONPATH=$PWD/.site FLASHINFER_WORKSPACE_BASE=$PWD/.fi-cache
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . >/dev/null 2>&1
python3 -c "import grpc, google.protobuf, flashinfer, starlette, uvicorn; print('grpc', grpc.__version__, 'protobuf', google.protobuf.__version__, 'flashinfer', flashinfer.__version__)"
python3 -c "import pd.rpc.worker_pb2_grpc" || { echo "grpcio too old here: the colocated sweep moves to call B"; exit 0; }
timeout 480 python3 -m pd.bench.disagg_vs_colocated --systems colocated --budget-s 280 --seconds-per-rate 10 --out-dir $OUT 2>&1 | tail -30 && touch .colocated-done
