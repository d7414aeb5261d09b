"""The worker's engine thread: commands run on it, and it owns the model's CUDA device."""

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
