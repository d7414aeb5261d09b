#!/usr/bin/env bash
# Device run on nvidia-h200 (one GPU): the start-up memory plan of a rank. The benchmark shape with dummy
# weights (a) in too small a share: refused before allocation, bytes named; (b) in the default share: the
# memory line. No wheels needed (torch attention, no graphs).
set -u
source bench/gpu/setup_host.sh > $OUT/env.txt 2>&1
python3 -m pd.launch.make_tiny_model /tmp/ms --preset moonlight-shape --config-only > /dev/null
python3 - <<'PY' 2>&1 | tee $OUT/memory.txt
import logging, time
import torch
from pd.config import EngineConfig, ModelConfig
from pd.engine.runner import ModelRunner
logging.basicConfig(level=logging.INFO, format="%(message)s")
cfg = dict(model_path="/tmp/ms", device="cuda", load_format="dummy", attention_backend="torch", cuda_graph=False)
t = time.time()
try:
    ModelRunner(EngineConfig(**cfg, gpu_memory_fraction=0.1), ModelConfig.from_dir("/tmp/ms"))
except MemoryError as e:
    print(f"refused in {time.time() - t:.2f} s, {torch.cuda.memory_allocated() / 1e9:.2f} GB allocated: {e}")
runner = ModelRunner(EngineConfig(**cfg), ModelConfig.from_dir("/tmp/ms"))
print("reserved by torch after the pool:", f"{torch.cuda.memory_reserved() / 1e9:.2f} GB")
PY
