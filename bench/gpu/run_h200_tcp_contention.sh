#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU), issue 16: bench/gpu/tcp_contention.py (why one room's KV takes 10x
# longer over Mooncake TCP under serving load when both instances share the GPU). Carry: .gpu-pack.
set -u
tar -xJf .gpu-pack/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/gsite
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/gsite .gpu-pack/*.whl
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
timeout 400 python3 bench/gpu/tcp_contention.py 2>&1 | grep -vE "^[IWE][0-9]{4} " | tee $OUT/tcp_contention.txt
