#!/usr/bin/env bash
# Device runs on nvidia-h200 (one GPU), issue 15 (block-FP8 weights, W8A8 kernels):
#   kernels  the FP8 kernels against their torch references (tests/test_gpu_fp8.py), the model-level GPU tests
#            (FP8 top-1 agreement with its dequantized run, FP8 graph replay == eager) and bench/fp8_gemm.py
#            (DeepSeek-V3 layer grouped GEMMs, dense GEMMs, activation quantization).
#   decode   bench/decode_step.py on the DESIGN.md §8 shape in FP8 and in bf16 (same host, same day), and
#            pd-serve readiness on the FP8 gpu-tiny checkpoint.
#   tune     bench/tune_moe_fp8.py (sorted FP8 experts at the §8 shape), then decode_step in FP8 with the
#            tuned table and a prefill kernel profile.
#   model    the model-level FP8 GPU tests and pd-serve on the FP8 gpu-tiny checkpoint.
#   suite    every GPU test (bf16 and FP8) on the final code.
# Usage: bash bench/gpu/run_h200_fp8.sh kernels|decode|tune|model|suite   (carry .gpu-pack)
set -u
stage=${1:?kernels, decode, tune, model or suite}
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/device.txt
git log -1 --format=%h > $OUT/commit.txt 2>/dev/null || true
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache TRITON_CACHE_DIR=/tmp/triton-cache
if [ "$stage" = kernels ]; then
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_fp8.py -rfExX > $OUT/test_gpu_fp8.txt 2>&1
  echo "kernel tests exit $?"; grep -E "^(FAILED|ERROR|XPASS|XFAIL)|passed|failed" $OUT/test_gpu_fp8.txt | cut -c1-300 | head -40
  timeout 120 python3 -m pd.bench.fp8_gemm --out $OUT/fp8_gemm.md > $OUT/fp8_gemm.log 2>&1
  echo "fp8_gemm exit $?"; tail -45 $OUT/fp8_gemm.log | cut -c1-250
  timeout 200 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py -k fp8 -rfE > $OUT/test_gpu_model.txt 2>&1
  echo "model tests exit $?"; grep -E "agreement|passed|failed|Error|^E " $OUT/test_gpu_model.txt | cut -c1-300 | head -30
fi
if [ "$stage" = tune ]; then
  timeout 230 python3 -m pd.bench.tune_moe_fp8 --max-seconds 170 --out $OUT/moe_fp8_NVIDIA_H200.json > $OUT/tune_fp8.log 2>&1
  echo "tune exit $?"; grep -vE "^\s*$" $OUT/tune_fp8.log | tail -14 | cut -c1-250
  [ -f $OUT/moe_fp8_NVIDIA_H200.json ] && cp $OUT/moe_fp8_NVIDIA_H200.json kernels/configs/
  timeout 230 python3 -m pd.bench.decode_step --quantization fp8 --iters 10 --out $OUT/decode_fp8_tuned.json \
    --profile $OUT/decode_profile_fp8_tuned.txt --profile-prefill $OUT/prefill_profile_fp8.txt > $OUT/decode_fp8_tuned.log 2>&1
  echo "decode_step fp8 (tuned) exit $?"; grep -vE "^\{|^$|Warn|warn" $OUT/decode_fp8_tuned.log | tail -16
  head -30 $OUT/prefill_profile_fp8.txt | cut -c1-60,100-140,150-200
fi
if [ "$stage" = model ]; then
  timeout 300 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py -k fp8 -rfE > $OUT/test_gpu_model.txt 2>&1
  echo "model tests exit $?"; grep -E "agreement|passed|failed|Error|^E " $OUT/test_gpu_model.txt | cut -c1-300 | head -30
  python3 -m pd.launch.make_tiny_model /tmp/gpu-tiny-fp8 --preset gpu-tiny --fp8 > /dev/null
  t0=$(date +%s)
  pd-serve --model /tmp/gpu-tiny-fp8 --device cuda --port 8000 --max-running 32 > $OUT/serve_fp8.log 2>&1 &
  serve=$!
  python3 - "$t0" > $OUT/readiness_fp8.txt 2>&1 <<'PY'
import asyncio, sys, time
import httpx
t0 = float(sys.argv[1])
while time.time() < t0 + 240:
    try:
        if httpx.get("http://127.0.0.1:8000/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
print(f"pd-serve on the FP8 checkpoint ready after {time.time() - t0:.1f} s")

async def one(client, i):
    body = {"model": "gpu-tiny-fp8", "prompt": f"request {i}: " + "hello " * (10 + i), "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    r = await client.post("http://127.0.0.1:8000/v1/completions", json=body, timeout=120)
    return r.status_code, r.json()["choices"][0]["text"][:40] if r.status_code == 200 else r.text[:200]

async def main():
    async with httpx.AsyncClient() as client:
        res = await asyncio.gather(*(one(client, i) for i in range(16)))
    print(f"16 concurrent completions right after ready: {sum(s == 200 for s, _ in res)}/16 answered 200")
    for s, text in res[:3]:
        print(s, repr(text))

asyncio.run(main())
PY
  cat $OUT/readiness_fp8.txt
  kill -INT $serve; wait $serve; echo "pd-serve exit $?"
  grep -E "warm-up|weights|FP8|ERROR|Traceback" $OUT/serve_fp8.log | cut -c1-260 | head -12
fi
if [ "$stage" = suite ]; then
  timeout 480 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py tests/test_gpu_fp8.py \
    tests/test_kernels.py -rfE > $OUT/test_gpu_suite.txt 2>&1
  echo "GPU suite exit $?"; grep -E "agreement|passed|failed|Error|^E " $OUT/test_gpu_suite.txt | cut -c1-300 | head -30
fi
if [ "$stage" = decode ]; then
  for q in fp8 none; do
    timeout 260 python3 -m pd.bench.decode_step --quantization $q --iters 10 --out $OUT/decode_$q.json \
      --profile $OUT/decode_profile_$q.txt > $OUT/decode_$q.log 2>&1
    echo "decode_step $q exit $?"; grep -vE "^\{|^$" $OUT/decode_$q.log | tail -18
  done
fi
