#!/usr/bin/env bash
# Device run on nvidia-h200-x2: the Mooncake parts only (KV transfer over NVLink, Mooncake EP).
set -u
source bench/gpu/setup_host.sh .whl-extra .whl-mooncake > $OUT/env.txt 2>&1; grep -E "mooncake|torch" $OUT/env.txt
echo "== kv transfer (nvlink)"
timeout 150 python3 -m pd.bench.kv_transfer --device cuda --protocol nvlink --tokens 1024,4096,16384 \
  --page-sizes 16,64 --out $OUT/kv_transfer_nvlink.md > $OUT/kv_transfer.log 2>&1; echo "rc=$?"
tail -30 $OUT/kv_transfer.log
echo "== ep latency (mooncake)"
timeout 200 python3 -m pd.bench.ep_latency --device cuda --backends mooncake --timeout-s 150 --out $OUT/ep_mooncake.json > $OUT/ep_mooncake.log 2>&1; echo "rc=$?"
tail -32 $OUT/ep_mooncake.log
echo "== kv transfer, page size 1"
timeout 90 python3 -m pd.bench.kv_transfer --device cuda --protocol nvlink --tokens 1024,4096 --page-sizes 1 \
  --out $OUT/kv_transfer_nvlink_p1.md > $OUT/kv_transfer_p1.log 2>&1; echo "rc=$?"
tail -12 $OUT/kv_transfer_p1.log
