#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), two figures:
# 1. Issue 19: pd.bench.prefix_cache --device cuda (shared-prefix workload with and without the cache).
# 2. Issue 16 item 4, "decode reaches its batch": pd-serve (TCP, host staging, defaults: --max-running 64) on
#    the DESIGN.md §8 shape, dummy bf16 weights; a decode-bound workload (random 128 in / 512 out, 192 prompts,
#    rate inf) so prefill takes little of the shared GPU; the achieved decode batch is the difference of
#    pd_decode_batch_size sum/count scraped before and after; then pd.bench.decode_step at batches around
#    it and context 384 (the workload's mean) for the bound.
# Carry: .gpu-pack. Everything comes back as one archive.
set -u
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
source bench/gpu/setup_pack.sh
python3 -m pd.launch.make_tiny_model /tmp/design --preset moonlight-shape --config-only > /dev/null
timeout 280 python3 -m pd.bench.prefix_cache --device cuda --rates 4,16 --groups 8 --per-group 8 \
  --out $OUT/prefix_cache.json > $OUT/prefix_cache.txt 2>&1
echo "== prefix cache exit $? (t=$(elapsed) s)"; tail -12 $OUT/prefix_cache.txt
scrape() { python3 -c "
import httpx
for line in httpx.get('http://127.0.0.1:8000/metrics').text.splitlines():
    if line.startswith(('pd_decode_batch_size_sum', 'pd_decode_batch_size_count')): print(line)"; }
pd-serve --model /tmp/design --device cuda --load-format dummy --dtype bfloat16 --port 8000 > $OUT/serve_sat.log 2>&1 &
serve=$!
wait_ready 8000
echo "== ready (t=$(elapsed) s)"
scrape > $OUT/batch_before.txt
timeout 120 pd-bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 128 \
  --random-output-len 512 --num-prompts 192 --request-rate inf --ignore-eos --disable-tqdm \
  > $OUT/bench_sat.txt 2>&1
echo "-- saturation run exit $? (t=$(elapsed) s)"
scrape > $OUT/batch_after.txt
cat $OUT/batch_before.txt $OUT/batch_after.txt
grep -E "Successful|Request throughput|Output token throughput|Median TTFT|Median TPOT|Duration" $OUT/bench_sat.txt
sed -n '/Latency by phase/,/KV bytes/p' $OUT/bench_sat.txt
kill -INT $serve; ( sleep 40; kill -KILL $serve 2>/dev/null ) & wait $serve
timeout $(( 510 - $(elapsed) )) python3 -m pd.bench.decode_step --batches 64 --contexts 384 --out $OUT/decode_step_sat.json \
  > $OUT/decode_step_sat.txt 2>&1
echo "== decode_step (t=$(elapsed) s)"; grep -iE "batch|floor|graph" $OUT/decode_step_sat.txt | head -12
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -f $OUT/* && mv /tmp/all.tar.xz $OUT/
