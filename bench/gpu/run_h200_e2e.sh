#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 16: pd-serve end to end at the DESIGN.md §8 shape (dummy bf16
# weights, both instances on cuda:0), pd-bench random 1024 in / 128 out, over the TCP and the NVLink transfer
# paths, after the page-allocator fix (freed pages came back descending: every page of every layer moved
# as its own piece). pd-bench prints the per-phase table (return_phases). Carry: .gpu-pack.
# Usage: bash bench/gpu/run_h200_e2e.sh "tcp nvlink" "4:100 16 inf" [num_prompts] ["extra pd-serve flags"] [test -k]
#   a fifth argument runs those GPU tests of tests/test_gpu.py at the end (pytest -k expression)
#   a rate may carry its own prompt count (rate:prompts); rates that would start after 540 s are skipped,
#   so the call's 600 s limit never cuts a run in half. First: the GPU test of the TCP path's stream.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
protocols=${1:-"tcp nvlink"}
rates=${2:-"16 inf"}
prompts=${3:-200}
extra=${4:-}
tests=${5:-}
source bench/gpu/setup_pack.sh
python3 -m pd.launch.make_tiny_model /tmp/design --preset moonlight-shape --config-only > /dev/null
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_transfer_engine.py > $OUT/test_tcp_stream.txt 2>&1
echo "== GPU test of the TCP stream (t=$(elapsed) s): $(tail -1 $OUT/test_tcp_stream.txt)"
for proto in $protocols; do
  pd-serve --model /tmp/design --device cuda --load-format dummy --dtype bfloat16 --transfer-protocol $proto \
    --port 8000 $extra > $OUT/serve_$proto.log 2>&1 &
  serve=$!
  wait_ready 8000
  echo "== $proto ready (t=$(elapsed) s)"; grep -E "transfer|NVLink|nvlink|TCP" $OUT/serve_$proto.log | cut -c1-200 | head -4
  for spec in $rates; do
    rate=${spec%%:*}; n=$prompts; [ "$spec" != "$rate" ] && n=${spec#*:}
    if [ "$(elapsed)" -gt 540 ]; then echo "-- $proto rate $rate skipped (t=$(elapsed) s)"; continue; fi
    timeout 150 pd-bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 1024 \
      --random-output-len 128 --num-prompts $n --request-rate $rate --ignore-eos --disable-tqdm \
      --result-json $OUT/bench_${proto}_$rate.json > $OUT/bench_${proto}_$rate.txt 2>&1
    echo "-- $proto rate $rate, $n prompts (exit $?, t=$(elapsed) s)"
    grep -E "Successful|Request throughput|Output token throughput|Median TTFT|P99 TTFT|Median TPOT" $OUT/bench_${proto}_$rate.txt
    sed -n '/Latency by phase/,/KV bytes/p' $OUT/bench_${proto}_$rate.txt
  done
  curl -s http://127.0.0.1:8000/metrics 2>/dev/null | grep -E "^pd_decode_batch_size_(sum|count)" > $OUT/batch_$proto.txt || \
    python3 -c "import httpx;print(httpx.get('http://127.0.0.1:8000/metrics').text)" | grep -E "^pd_decode_batch_size_(sum|count)" > $OUT/batch_$proto.txt
  cat $OUT/batch_$proto.txt
  kill -INT $serve; wait $serve
done
if [ -n "$tests" ]; then
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "$tests" -rfE > $OUT/gpu_tests.txt 2>&1
  echo "== GPU tests (t=$(elapsed) s): $(tail -1 $OUT/gpu_tests.txt)"; grep -E "^E|FAILED" $OUT/gpu_tests.txt | head -8
fi
# Only a few files under $OUT come back: everything goes back as one archive.
tar -C $OUT -cJf /tmp/e2e_all.tar.xz . && rm -f $OUT/* && mv /tmp/e2e_all.tar.xz $OUT/
