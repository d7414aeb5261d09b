#!/usr/bin/env bash
# Sourced at the start of every device run: installs the carried wheels (no registry there) and pd.
# Usage: source bench/gpu/setup_host.sh [wheel dirs...]
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
for d in "$@"; do
  [ -d "$d" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$d"/*.whl
done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . >/dev/null 2>&1 \
  || echo "editable install of pd failed"
python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for m in ("triton", "google.protobuf", "grpc", "flashinfer", "mooncake", "starlette", "uvicorn", "transformers"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PY
