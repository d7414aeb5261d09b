#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), written 2026-12-04 (session 8) for the next session's first call: pd's
# split-KV MLA decode kernel (kernels/mla_decode.py, --attention-backend triton; built and tested on CPU in the
# interpreter, never run on a GPU yet). Its CUDA tests, the kernel against FlashInfer's fa3/fa2 per layer, the
# decode step with it, then the model-level tests (graph == eager for plain decode and MTP, agreement with
# FlashInfer). Carry: .gpu-pack.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
timeout 90 python3 -m pytest -q -m gpu tests/test_kernels_mla_decode.py -rfE > $OUT/pytest_kernel.txt 2>&1
echo "== kernel tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_kernel.txt)"; grep -E "^E|FAILED" $OUT/pytest_kernel.txt | head
timeout 120 python3 -m pd.bench.mla_decode --contexts 1024,4096 --out $OUT/mla_decode.json > $OUT/mla_decode.txt 2>&1
echo "== mla_decode rc=$? (t=$(elapsed) s)"; grep -E "^\|" $OUT/mla_decode.txt
timeout 200 python3 -m pd.bench.decode_step --attention-backend triton --contexts 1024 --iters 15 \
  --prefill-tokens 4096 --breakdown 1,8 --out $OUT/decode_step.json > $OUT/decode_step.txt 2>&1
echo "== decode_step (triton) rc=$? (t=$(elapsed) s)"; grep -vE "^\{|^$|Warn|warn" $OUT/decode_step.txt | head -20
timeout $(( 580 - $(elapsed) )) python3 -m pytest -q -m gpu tests/test_gpu.py -rfE \
  -k "triton_decode or graph_replay_equals_eager_decode or (mtp_graph_replay and triton)" > $OUT/pytest_gpu.txt 2>&1
echo "== model tests (t=$(elapsed) s): $(tail -1 $OUT/pytest_gpu.txt)"; grep -E "^E|FAILED" $OUT/pytest_gpu.txt | head
