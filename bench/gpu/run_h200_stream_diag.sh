#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 16: after the model moved to a CUDA stream of its own
# (ModelRunner.bind_thread), pd-serve's decode TPOT went from ~12-25 ms to ~120 ms at every rate. Which part?
# 1. the GPU test of the TCP path's stream; 2. decode_step (one process, graphs) at batch 32/64;
# 3. pd-serve nvlink rate 4, 40 prompts, as built (A) and with bind_thread patched to leave the legacy default
#    stream current (B, a sitecustomize for this experiment only). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache TRITON_CACHE_DIR=/tmp/triton-cache
python3 -m pd.launch.make_tiny_model /tmp/design --preset moonlight-shape --config-only > /dev/null
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_transfer_engine.py -rfE > $OUT/t1.txt 2>&1
echo "== GPU test of the TCP stream (t=$(elapsed) s): $(tail -1 $OUT/t1.txt)"; grep -E "^E|assert" $OUT/t1.txt | head -5
timeout 200 python3 -m pd.bench.decode_step --batches 32,64 --contexts 1024 --iters 10 > $OUT/d.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -vE "^\{|^$" $OUT/d.txt | tail -8
mkdir -p /tmp/nostream && cat > /tmp/nostream/sitecustomize.py <<'PY'
import torch
import pd.engine.runner as runner
def _bind(self):
    if self.stream is not None:
        torch.cuda.set_device(self.device)
runner.ModelRunner.bind_thread = _bind
PY
for variant in A B; do
  pp=$PYTHONPATH; [ $variant = B ] && pp=/tmp/nostream:$PYTHONPATH
  PYTHONPATH=$pp pd-serve --model /tmp/design --device cuda --load-format dummy --dtype bfloat16 \
    --transfer-protocol nvlink --port 8000 > $OUT/serve_$variant.log 2>&1 &
  serve=$!
  python3 -c "
import time, httpx
deadline = time.time() + 300
while time.time() < deadline:
    try:
        if httpx.get('http://127.0.0.1:8000/health', timeout=2).status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(1)"
  echo "== $variant ready (t=$(elapsed) s)"
  timeout 100 pd-bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 1024 \
    --random-output-len 128 --num-prompts 40 --request-rate 4 --ignore-eos --disable-tqdm > $OUT/b_$variant.txt 2>&1
  grep -E "Request throughput|Median TTFT|Median TPOT|^tpot|^first_decode|^prefill_compute|^kv_transfer" $OUT/b_$variant.txt
  kill -INT $serve; wait $serve
done
