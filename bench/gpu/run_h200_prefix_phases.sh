#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 19: pd.bench.prefix_cache --device cuda at rates 4 and 16 with the
# latency phases of a group's later requests (where a hit's TTFT goes), then the multi-turn replay by turn
# (synthetic ShareGPT-format conversations). DESIGN.md §8 shape, dummy bf16 weights. Carry: .gpu-pack.
set -u
source bench/gpu/setup_pack.sh
timeout 330 python3 -m pd.bench.prefix_cache --device cuda --rates 4,16 --groups 8 --per-group 8 \
  --out $OUT/prefix_cache.json > $OUT/prefix_cache.txt 2>&1
echo "== shared prefix exit $?"; grep -vE "^\{" $OUT/prefix_cache.txt | tail -60
timeout 200 python3 -m pd.bench.prefix_cache --device cuda --rates "" --turns 4 --conversations 16 \
  --turn-rate 2 --out $OUT/multiturn.json > $OUT/multiturn.txt 2>&1
echo "== multi-turn exit $?"; tail -12 $OUT/multiturn.txt
tar -C $OUT -cJf /tmp/all.tar.xz . && rm -rf $OUT/* && mv /tmp/all.tar.xz $OUT/
