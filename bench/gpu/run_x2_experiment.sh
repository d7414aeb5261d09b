#!/usr/bin/env bash
# Device runs on nvidia-h200-x2, issue 7: the 1P1D vs colocated sweep extended to saturation, with
# per-request samples for the plots. Two calls on one warm machine (the wheels exceed one call's carry):
#   bash bench/gpu/run_x2_experiment.sh jit     # carry .whl-fi: FlashInfer, tvm-ffi, cuda-tile; then JIT-build its kernels
#   bash bench/gpu/run_x2_experiment.sh sweep   # carry .whl-serve: Mooncake, grpcio, starlette, uvicorn, h11, click, protobuf; then both sweeps
set -u
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache
case "${1:-}" in
jit)
  source bench/gpu/setup_host.sh .whl-fi > $OUT/env.txt 2>&1; head -3 $OUT/env.txt
  timeout 400 python3 -m pd.bench.decode_step --batches 1,8 --contexts 1024 --prefill-tokens 2048 --iters 2 \
    > $OUT/jit.log 2>&1; echo "jit rc=$?"; tail -3 $OUT/jit.log ;;
sweep)
  source bench/gpu/setup_host.sh .whl-serve > $OUT/env.txt 2>&1
  python3 -c "import flashinfer, mooncake.engine, starlette, pd.rpc.worker_pb2_grpc; print('imports ok')" || exit 1
  timeout 560 python3 -m pd.bench.disagg_vs_colocated --systems 1p1d,colocated --rates "24,32,40;8,12,16,24" \
    --budget-s 240 --seconds-per-rate 8 --out-dir $OUT 2>&1 | grep -v '^\[[a-z0-9]*\] [0-9]' | tail -40 ;;
*) echo "usage: run_x2_experiment.sh jit|sweep"; exit 2 ;;
esac
