#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 16 item 3: layer-by-layer KV sends against chunk sends.
# pd-serve at the DESIGN.md §8 shape (dummy bf16 weights, both instances on cuda:0) over the TCP transfer
# (host staging: auto, i.e. on for a GPU pool over TCP), --transfer-granularity chunk and layer; pd-bench
# random 1024 in / 128 out (a 1024-token prompt is one chunk, so with chunk granularity its whole transfer
# waits for the forward). Prints req/s, TTFT p50 / p99 and the kv_transfer phase p50 per run, then one table.
# First the GPU case of tests/test_layer_sends.py. Carry: .gpu-pack.
# Usage: bash bench/gpu/run_h200_layer_sends.sh ["chunk layer"] ["4 16"] [num_prompts] ["extra pd-serve flags"]
#   runs that would start after 500 s (a pd-serve after 380 s) are skipped: the whole stays under 540 s.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
granularities=${1:-"chunk layer"}
rates=${2:-"4 16"}
prompts=${3:-100}
extra=${4:-}
source bench/gpu/setup_pack.sh
python3 -m pd.launch.make_tiny_model /tmp/design --preset moonlight-shape --config-only > /dev/null
# First the GPU case of the layer-send test: a CUDA pool whose layers are stored asynchronously, byte-exact.
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_layer_sends.py > $OUT/test_layer_sends_gpu.txt 2>&1
echo "== GPU test of layer sends (t=$(elapsed) s): $(tail -1 $OUT/test_layer_sends_gpu.txt)"
summary=$OUT/summary.txt
printf "%-12s %6s %8s %10s %10s %16s\n" granularity rate "req/s" "TTFT p50" "TTFT p99" "kv_transfer p50" > $summary
# field LABEL FILE: the number after LABEL in pd-bench's table
field() { grep -F "$1" "$2" | head -1 | awk '{print $NF}'; }
for g in $granularities; do
  if [ "$(elapsed)" -gt 380 ]; then echo "-- $g skipped (t=$(elapsed) s)"; continue; fi
  pd-serve --model /tmp/design --device cuda --load-format dummy --dtype bfloat16 --transfer-protocol tcp \
    --transfer-granularity $g --port 8000 $extra > $OUT/serve_$g.log 2>&1 &
  serve=$!
  wait_ready 8000 240
  echo "== $g ready (t=$(elapsed) s)"; grep -E "host staging|transport" $OUT/serve_$g.log | cut -c1-200 | head -3
  for rate in $rates; do
    if [ "$(elapsed)" -gt 500 ]; then echo "-- $g rate $rate skipped (t=$(elapsed) s)"; continue; fi
    txt=$OUT/bench_${g}_$rate.txt
    timeout 120 pd-bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 1024 \
      --random-output-len 128 --num-prompts $prompts --request-rate $rate --ignore-eos --disable-tqdm \
      --result-json $OUT/bench_${g}_$rate.json > $txt 2>&1
    echo "-- $g rate $rate, $prompts prompts (exit $?, t=$(elapsed) s)"
    grep -E "Successful|Request throughput|Median TTFT|P99 TTFT" $txt
    sed -n '/Latency by phase/,/KV bytes/p' $txt
    kv=$(grep -E "^kv_transfer " $txt | awk '{print $2}')
    printf "%-12s %6s %8s %10s %10s %16s\n" $g $rate "$(field 'Request throughput' $txt)" \
      "$(field 'Median TTFT' $txt)" "$(field 'P99 TTFT' $txt)" "${kv:-?}" >> $summary
  done
  kill -INT $serve; wait $serve
done
echo "== summary (ms; t=$(elapsed) s)"; cat $summary
# Only a few files under $OUT come back: everything goes back as one archive.
tar -C $OUT -cJf /tmp/layer_sends_all.tar.xz . && rm -f $OUT/* && mv /tmp/layer_sends_all.tar.xz $OUT/
