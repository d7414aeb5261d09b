"""How a worker rank is set up: its engine thread owns the model's CUDA device; its engine config per role."""

from __future__ import annotations

import threading

import torch

from pd.worker.loop import EngineThread


def test_engine_thread_makes_the_model_device_current(monkeypatch) -> None:
    # The current CUDA device is per thread; Triton launches on it. A rank on cuda:1 whose engine
    # thread left it at cuda:0 failed its first MoE step (seen on two H200s).
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d))
    )
    thread = EngineThread(lambda: None, lambda: False, name="decode-engine", device=torch.device("cuda", 1))
    ran_on: list[str] = []
    thread.start()
    thread.submit(lambda: ran_on.append(threading.current_thread().name))
    thread.stop()
    assert calls == [("decode-engine", torch.device("cuda", 1))]
    assert ran_on == ["decode-engine"]


def test_engine_thread_on_cpu_sets_no_device(monkeypatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    thread = EngineThread(lambda: None, lambda: False, name="prefill-engine", device=torch.device("cpu"))
    thread.start()
    thread.stop()
    assert calls == [] and thread.error is None


def test_rank_engine_config_per_role() -> None:
    """Prefill ranks build no decode graphs (normal EP dispatch cannot be captured: it invalidated the
    capture on two H200s); low-latency decode ranks keep steps within the low-latency buffers."""
    from pd.config import EngineConfig, ParallelConfig
    from pd.worker.common import rank_engine_config

    engine = EngineConfig(model_path="m", device="cuda:0", chunk_size=2048, max_running=64)
    two = ParallelConfig(size=2, rank=1, dist_init_addr="127.0.0.1:1")
    prefill = rank_engine_config("prefill", engine, two)
    assert (prefill.device, prefill.cuda_graph, prefill.chunk_size) == ("cuda:1", False, 2048)
    decode = rank_engine_config("decode", engine, two)
    assert (decode.device, decode.cuda_graph, decode.chunk_size) == ("cuda:1", True, 64)
    one = rank_engine_config("decode", engine, ParallelConfig())
    assert (one.device, one.cuda_graph, one.chunk_size) == ("cuda:0", True, 2048)
