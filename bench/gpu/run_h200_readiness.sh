#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 14 (readiness, role engines on the GPU):
# 1. A fresh host (empty FlashInfer JIT cache): pd-serve --device cuda on the gpu-tiny model; as soon as
#    /health says ready, 16 concurrent completions (before the warm-up, 15 of 16 failed with 504).
# 2. The GPU tests (FlashInfer vs torch, transformers agreement, graph replay vs eager, warm-up buckets).
# Carry: .gpu-pack (site.tar.xz: flashinfer, mooncake cuda13, starlette, uvicorn, installed --no-deps; the
# prometheus_client wheel).
set -u
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
# Nothing JIT-built yet, as on a fresh host (a new cache folder per run, also on a machine kept warm).
export FLASHINFER_WORKSPACE_BASE=$(mktemp -d /tmp/fi-XXXX) TRITON_CACHE_DIR=$(mktemp -d /tmp/triton-XXXX)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/device.txt
python3 -m pd.launch.make_tiny_model /tmp/gpu-tiny --preset gpu-tiny > /dev/null
echo "== fresh-host readiness"
t0=$(date +%s.%N)
pd-serve --model /tmp/gpu-tiny --device cuda --port 8000 --max-running 32 > $OUT/serve.log 2>&1 &
serve=$!
python3 - "$t0" "$serve" > $OUT/readiness.txt 2>&1 <<'PY'
import asyncio, os, sys, time
import httpx
t0, serve = float(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 400
while time.time() < deadline:
    try:
        os.kill(serve, 0)
    except ProcessLookupError:
        sys.exit("pd-serve exited before it was ready")
    try:
        if httpx.get("http://127.0.0.1:8000/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
ready = time.time() - t0
print(f"ready after {ready:.1f} s")

async def one(client, i):
    body = {"model": "gpu-tiny", "prompt": f"request {i}: " + "hello " * (20 + i), "max_tokens": 32,
            "temperature": 0, "ignore_eos": True}
    t = time.time()
    r = await client.post("http://127.0.0.1:8000/v1/completions", json=body, timeout=300)
    return r.status_code, time.time() - t, r.text[:200]

async def main():
    async with httpx.AsyncClient() as client:
        res = await asyncio.gather(*(one(client, i) for i in range(16)))
    ok = sum(s == 200 for s, _, _ in res)
    print(f"first 16 concurrent requests right after ready: {ok}/16 answered 200; "
          f"latency max {max(l for _, l, _ in res):.2f} s")
    for s, l, text in res:
        if s != 200:
            print(s, f"{l:.2f}s", text)

asyncio.run(main())
PY
cat $OUT/readiness.txt
kill -INT $serve; wait $serve; echo "pd-serve exit $?"
grep -E "warm-up|serving|ERROR" $OUT/serve.log | cut -c1-220 | head -12
[ "${1:-}" = "--no-tests" ] && exit 0
echo "== gpu tests"
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "rc=$?"
grep -E "passed|failed|^E  |Error" $OUT/gpu_tests.log | tail -12
