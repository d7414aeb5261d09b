"""How a worker rank is set up: its engine thread owns the model's CUDA device; its engine config per role."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from pd.engine.messages import AbortRoom, Event, TransferEnded
from pd.engine.role import Load
from pd.transfer.state import TransferState
from pd.worker.loop import CommandQueue, EngineThread


class Recorder:
    """A role engine that records which thread handled each command and answers with no events."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, object]] = []

    def handle(self, cmd) -> list[Event]:
        self.handled.append((threading.current_thread().name, cmd))
        return []

    def step(self) -> list[Event]:
        return []

    def has_work(self) -> bool:
        return False

    def load(self) -> Load:
        return Load(0, 0)


def test_engine_thread_binds_the_model_device_and_stream_first() -> None:
    # The current CUDA device and stream are per thread; Triton launches on the device. A rank on cuda:1
    # whose engine thread left it at cuda:0 failed its first MoE step (seen on two H200s).
    engine, commands = Recorder(), CommandQueue()

    def bind() -> None:
        engine.handled.append((threading.current_thread().name, "bind"))

    thread = EngineThread(engine, commands, print, name="decode-engine", bind=bind)
    thread.submit(AbortRoom(1, "x"))
    commands.sender_final(2, TransferState.DONE, "")  # from a transfer thread
    thread.start()
    thread.stop()
    assert engine.handled == [
        ("decode-engine", "bind"),
        ("decode-engine", AbortRoom(1, "x")),
        ("decode-engine", TransferEnded(2, TransferState.DONE, "")),
    ]


def test_runner_on_cpu_binds_no_cuda_state(monkeypatch, tiny_model_dir) -> None:
    from pd.config import EngineConfig
    from pd.engine.engine import Engine

    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("device", d)))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: calls.append(("stream", s)))
    runner = Engine(EngineConfig(model_path=str(tiny_model_dir), num_pages=16)).runner
    runner.bind_thread()
    assert runner.stream is None and calls == []


def test_rank_engine_config_per_role() -> None:
    """Prefill ranks build no decode graphs (on several ranks their prompt-step graphs are piecewise: normal EP
    dispatch cannot be captured, it invalidated a whole graph's capture on two H200s); decode ranks no
    prompt-step graphs; low-latency decode ranks keep steps within the low-latency buffers, piecewise ones
    (normal dispatch) need not."""
    from pd.config import EngineConfig, ParallelConfig
    from pd.worker.builder import rank_engine_config, uses_low_latency_moe

    engine = EngineConfig(model_path="m", device="cuda:0", chunk_size=2048, max_running=64)
    two = ParallelConfig(size=2, rank=1, dist_init_addr="127.0.0.1:1")
    prefill = rank_engine_config("prefill", engine, two)
    assert (prefill.device, prefill.decodes, prefill.graph_extend_tokens, prefill.chunk_size) == (
        "cuda:1",
        False,
        256,
        2048,
    )
    decode = rank_engine_config("decode", engine, two)
    assert (decode.device, decode.cuda_graph, decode.graph_extend_tokens, decode.chunk_size) == (
        "cuda:1",
        True,
        0,
        64,
    )
    one = rank_engine_config("decode", engine, ParallelConfig())
    assert (one.device, one.cuda_graph, one.chunk_size) == ("cuda:0", True, 2048)
    assert uses_low_latency_moe("decode", two, engine) and not uses_low_latency_moe("prefill", two, engine)
    cut = dataclasses.replace(engine, piecewise_graphs=True)
    assert not uses_low_latency_moe("decode", two, cut)
    assert rank_engine_config("decode", cut, two).chunk_size == 2048


def test_warm_up_runs_every_kernel_path_of_the_role_and_leaves_the_pool_idle(tiny_model_dir) -> None:
    """A rank registers only after this ran (pd.worker.builder): on a fresh GPU host the first forward
    JIT-builds kernels, and a rank that registered before that failed its first requests on timeouts."""
    from pd.config import EngineConfig
    from pd.engine.engine import Engine
    from pd.engine.warmup import warm_up

    engine = Engine(EngineConfig(model_path=str(tiny_model_dir), page_size=4, num_pages=8))
    seen: list[tuple[str, bool, list[bool], list[bool], list[bool]]] = []
    run = engine.runner.run

    def spy(batch, logits=None, kv_stored=None):
        greedy = [r.sampling.greedy for r in batch.reqs]
        processed = [r.sampling.needs_processing and r.sampling.top_logprobs > 0 for r in batch.reqs]
        starts = any(s > 0 for s in batch.starts)
        seen.append((batch.mode.value, starts, list(batch.samples), greedy, processed))
        assert logits is engine.logits
        return run(batch, logits, kv_stored)

    engine.runner.run = spy
    for extend, decode in ((True, False), (False, True), (True, True)):
        seen.clear()
        assert warm_up(engine, extend, decode) >= 0
        expected = []
        kinds = [True, False, False], [False, False, True]  # greedy; sampled; processed with logprobs
        if extend:  # a first chunk, then a chunk over a cached prefix that samples
            expected += [("extend", False, [False] * 3, *kinds), ("extend", True, [True] * 3, *kinds)]
        if decode:  # with a grammar backend the processed request asks for one; then again without (launched)
            expected += [("decode", True, [True] * 3, *kinds)] * (
                2 if engine.grammar.backend is not None else 1
            )
        assert seen == expected
        assert engine.pages_held == 0 and engine.logits.slots_in_use == 0
    assert int(engine.runner.model.expert_token_counts().sum()) == 0, "served tokens only in pd_expert_tokens"


def test_warm_up_compiles_each_moe_block_config_a_prompt_step_can_pick(tiny_model_dir) -> None:
    """Each block config of the sorted-layout MoE kernels is a kernel compiled on first use (1.1 s of the first
    long prompt's TTFT on an H200): warm-up runs the experts once per config that 1..max_rows rows pick."""
    from pd.config import EngineConfig
    from pd.engine.engine import Engine
    from pd.engine.warmup import compile_moe_configs
    from pd.model.moe import MoE

    engine = Engine(EngineConfig(model_path=str(tiny_model_dir), page_size=4, num_pages=8))
    model = engine.runner.model
    experts = next(m.experts for m in model.modules() if isinstance(m, MoE))
    ran: list[int] = []
    sorted_ = experts.sorted
    experts.sorted = lambda x, ids, w: (ran.append(len(x)), sorted_(x, ids, w))[1]  # type: ignore[method-assign]
    rows = 300
    assert compile_moe_configs(model, rows, torch.float32) == len(ran) >= 2
    x = torch.zeros(rows, experts.w13.shape[-1])
    ids = torch.zeros(rows, engine.model_cfg.num_experts_per_tok, dtype=torch.int64)
    every = {experts.sorted_config(x[:n], ids[:n]) for n in range(1, rows + 1)}
    assert {experts.sorted_config(x[:n], ids[:n]) for n in ran} == every and len(ran) == len(every)


def test_warm_up_compiles_the_moe_configs_of_every_eager_step_kind(tiny_model_dir) -> None:
    """Rows the sorted-layout experts take outside a whole graph: prompt steps' chunk, and decode steps in normal
    mode outside a whole decode graph (piecewise or eager) up to max_running; none for whole decode graphs
    (compiled when captured) or low-latency decode (masked layout)."""
    from types import SimpleNamespace

    from pd.config import EngineConfig
    from pd.engine.engine import Engine
    from pd.engine.warmup import sorted_moe_rows

    cfg = EngineConfig(
        model_path=str(tiny_model_dir), page_size=4, num_pages=8, chunk_size=96, max_running=200
    )
    engine = Engine(cfg)
    assert engine.runner.graphs is None  # CPU: decode runs eager
    assert sorted_moe_rows(engine, extend=True, decode=False) == 96
    assert sorted_moe_rows(engine, extend=False, decode=True) == 200
    assert sorted_moe_rows(engine, extend=True, decode=True) == 200
    for piecewise, rows in ((False, 0), (True, 200)):
        engine.runner.graphs = SimpleNamespace(piecewise=piecewise)  # type: ignore[assignment]
        assert sorted_moe_rows(engine, extend=False, decode=True) == rows
    engine.runner.graphs = None
    engine.runner.low_latency_moe = True
    assert sorted_moe_rows(engine, extend=False, decode=True) == 0


def test_decode_warm_up_masks_from_a_live_grammar_matcher(tiny_model_dir) -> None:
    """A decode-only warm-up has no prompt step to sample the grammar request's first token: it starts from a
    token the grammar allows, so the decode step's mask is llguidance's (more than the EOS tokens a failed
    matcher would allow), and every matcher is gone afterwards."""
    pytest.importorskip("llguidance")
    from pd.config import EngineConfig
    from pd.engine.engine import Engine
    from pd.engine.warmup import warm_up
    from pd.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)
    engine = Engine(EngineConfig(model_path=str(tiny_model_dir), page_size=4, num_pages=8), tok)
    assert engine.grammar.backend is not None
    allowed: list[int] = []
    fill = engine.grammar.fill

    def spy(reqs, drafted=None, part=0):
        mask = fill(reqs, drafted, part)
        if mask is not None:
            rows = [i for i, r in enumerate(reqs) if r.sampling.grammar is not None and r.output_ids]
            allowed.extend(sum(bin(w & 0xFFFFFFFF).count("1") for w in mask[i].tolist()) for i in rows)
        return mask

    engine.grammar.fill = spy  # type: ignore[method-assign]
    assert warm_up(engine, extend=False, decode=True) >= 0
    assert allowed and all(n > len(tok.eos_token_ids) for n in allowed), allowed
    assert engine.grammar.active == 0 and engine.pages_held == 0
