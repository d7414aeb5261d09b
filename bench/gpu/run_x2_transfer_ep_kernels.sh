#!/usr/bin/env bash
# Device run on nvidia-h200-x2: KV transfer GPU0->GPU1 (issue 3), EP backends (issue 5), MoE kernel
# correctness (issue 6). Carry: .whl-mooncake .whl-extra. Logs under $OUT.
set -u
source bench/gpu/setup_host.sh .whl-extra .whl-mooncake > $OUT/env.txt 2>&1; cat $OUT/env.txt
nvidia-smi topo -m > $OUT/topo.txt 2>&1
python3 -c "import mooncake, os; print(os.listdir(os.path.dirname(mooncake.__file__)))" >> $OUT/env.txt 2>&1
echo "== kv transfer (nvlink)"
timeout 150 python3 -m pd.bench.kv_transfer --device cuda --protocol nvlink --tokens 1024,4096,16384 \
  --page-sizes 16,64 --out $OUT/kv_transfer_nvlink.md > $OUT/kv_transfer.log 2>&1; echo "rc=$?"
tail -40 $OUT/kv_transfer.log
echo "== ep latency"
timeout 240 python3 -m pd.bench.ep_latency --device cuda --timeout-s 110 --out $OUT/ep_latency.json > $OUT/ep_latency.log 2>&1; echo "rc=$?"
tail -45 $OUT/ep_latency.log
echo "== kernel tests"
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py -x > $OUT/kernel_tests.log 2>&1; echo "rc=$?"
tail -15 $OUT/kernel_tests.log
echo "== kv transfer, page size 1 (many small pieces; last, bounded)"
timeout 90 python3 -m pd.bench.kv_transfer --device cuda --protocol nvlink --tokens 1024,4096 --page-sizes 1 \
  --out $OUT/kv_transfer_nvlink_p1.md > $OUT/kv_transfer_p1.log 2>&1; echo "rc=$?"
tail -12 $OUT/kv_transfer_p1.log
