#!/usr/bin/env bash
# Device run on nvidia-h200-x2: expert placement under low-latency dispatch (issue 10), then the
# Mooncake EP rows of the uniform sweep that an earlier run could not finish (issue 5).
# Carry: .whl-gpu2 (mooncake-transfer-engine-cuda13, grpcio). Logs and JSON under $OUT.
set -u
source bench/gpu/setup_host.sh .whl-gpu2 > $OUT/env.txt 2>&1; cat $OUT/env.txt
echo "== placement study (grouped routers, linear vs round_robin)"
timeout 300 python3 -m pd.bench.ep_latency --device cuda --routing grouped --placements linear,round_robin \
  --backends mooncake,torch --timeout-s 120 --out $OUT/ep_placement.json > $OUT/ep_placement.log 2>&1; echo "rc=$?"
tail -30 $OUT/ep_placement.log
echo "== mooncake uniform sweep (one launch per shape group)"
timeout 260 python3 -m pd.bench.ep_latency --device cuda --backends mooncake --timeout-s 60 \
  --out $OUT/ep_mooncake.json > $OUT/ep_mooncake.log 2>&1; echo "rc=$?"
tail -32 $OUT/ep_mooncake.log
