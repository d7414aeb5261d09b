"""Scheduler behaviour with a fake model: chunking, admission, preemption, and page accounting."""

import random

import pytest

from pd.config import SchedulerConfig
from pd.engine.scheduler import QueueFull, Scheduler
from pd.kv_cache import PageAllocator
from pd.types import BatchMode, FinishReason, Req, SamplingParams, StepResult

EOS = 0


def make(num_pages=64, page_size=4, chunk=8, max_running=8, max_waiting=100):
    alloc = PageAllocator(num_pages)
    cfg = SchedulerConfig(page_size, chunk, max_running, max_waiting)
    return Scheduler(cfg, alloc, frozenset({EOS})), alloc


def req(rid, n_prompt, max_tokens=5, **kw):
    return Req(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw), 0, 10_000)


def run_to_end(sched, token_fn=lambda r: 7, max_steps=10_000):
    steps = []
    for _ in range(max_steps):
        batch = sched.schedule()
        if batch is None:
            break
        # The batch's KV ranges must lie inside the request's pages.
        for r, s, e in zip(batch.reqs, batch.starts, batch.ends):
            assert s == r.num_computed and e <= r.seq_len
            assert len(r.pages) * sched.cfg.page_size >= e
        steps.append(batch)
        tokens = [token_fn(r) if s else None for r, s in zip(batch.reqs, batch.samples)]
        sched.postprocess(batch, StepResult.of(tokens, [0.0 if t is not None else None for t in tokens]))
    return steps


def test_chunked_prefill_respects_budget_and_samples_once():
    sched, alloc = make(chunk=8)
    r = req(0, 21, max_tokens=3)
    sched.add(r)
    steps = run_to_end(sched)
    extend = [b for b in steps if b.mode is BatchMode.EXTEND]
    assert [(b.starts[0], b.ends[0]) for b in extend] == [(0, 8), (8, 16), (16, 21)]
    assert [b.samples for b in extend] == [[False], [False], [True]]
    assert r.output_ids == [7, 7, 7] and r.finish_reason is FinishReason.LENGTH
    assert alloc.num_used == 0


def test_budget_shared_across_requests_fifo():
    sched, _ = make(chunk=10)
    for i, n in enumerate((6, 6, 6)):
        sched.add(req(i, n))
    batch = sched.schedule()
    assert [r.rid for r in batch.reqs] == [0, 1]
    assert [e - s for s, e in zip(batch.starts, batch.ends)] == [6, 4]


def test_eos_stop_ids_and_ignore_eos():
    sched, alloc = make()
    a, b, c = (
        req(0, 3, max_tokens=10),
        req(1, 3, max_tokens=10, stop_token_ids=(9,)),
        req(2, 3, max_tokens=4, ignore_eos=True),
    )
    for r in (a, b, c):
        sched.add(r)
    run_to_end(sched, token_fn=lambda r: {0: EOS, 1: 9, 2: EOS}[r.rid])
    assert a.output_ids == [EOS] and a.finish_reason is FinishReason.STOP
    assert b.output_ids == [9] and b.finish_reason is FinishReason.STOP
    assert c.output_ids == [EOS] * 4 and c.finish_reason is FinishReason.LENGTH
    assert alloc.num_used == 0


def test_preemption_under_page_pressure_finishes_everything_and_frees_all():
    # 12 usable pages of 4 tokens; 4 requests that grow to 12 tokens each (3 pages) cannot all fit
    # while decoding beyond their prompts, so the newest get preempted and recomputed.
    sched, alloc = make(num_pages=10, page_size=4, chunk=64)
    reqs = [req(i, 5, max_tokens=7) for i in range(4)]
    for r in reqs:
        sched.add(r)
    run_to_end(sched)
    assert all(r.finish_reason is FinishReason.LENGTH and len(r.output_ids) == 7 for r in reqs)
    assert alloc.num_used == 0


def test_abort_frees_pages_exactly_once_from_every_queue():
    sched, alloc = make(chunk=4)
    a, b, c = req(0, 10), req(1, 3), req(2, 3)
    for r in (a, b, c):
        sched.add(r)
    batch = sched.schedule()  # a is mid-prefill
    sched.finish(a, FinishReason.ABORT)
    sched.finish(a, FinishReason.ABORT)  # idempotent
    sched.postprocess(batch, StepResult.of([None], [None]))  # a late result for an aborted request is ignored
    sched.finish(c, FinishReason.ABORT)  # still waiting
    run_to_end(sched)
    assert a.finish_reason is FinishReason.ABORT and c.finish_reason is FinishReason.ABORT
    assert b.finish_reason is FinishReason.LENGTH
    assert alloc.num_used == 0


def test_bounded_waiting_queue_and_oversized_request():
    sched, _ = make(num_pages=5, page_size=4, max_waiting=2)
    sched.add(req(0, 3))
    sched.add(req(1, 3))
    with pytest.raises(QueueFull):
        sched.add(req(2, 3))
    sched2, _ = make(num_pages=5, page_size=4)
    with pytest.raises(ValueError, match="KV pages"):
        sched2.add(req(0, 30, max_tokens=1))


def test_random_workload_invariants():
    rng = random.Random(0)
    sched, alloc = make(num_pages=40, page_size=4, chunk=16, max_running=6)
    reqs = [req(i, rng.randint(1, 30), max_tokens=rng.randint(1, 12)) for i in range(40)]
    for r in reqs:
        sched.add(r)
    aborted = set()
    for _ in range(5000):
        batch = sched.schedule()
        if batch is None:
            break
        tokens = [rng.choice([7, 8, EOS]) if s else None for s in batch.samples]
        sched.postprocess(batch, StepResult.of(tokens, [0.0] * len(tokens)))
        if rng.random() < 0.05:
            victim = rng.choice(reqs)
            aborted.add(victim.rid)
            sched.finish(victim, FinishReason.ABORT)
        used = sum(len(r.pages) for r in reqs)
        assert used == alloc.num_used  # every used page belongs to exactly one live request
    assert all(r.finished for r in reqs)
    assert alloc.num_used == 0


def test_req_token_at_and_ids_equal_slices_of_all_ids():
    """The per-step accessors read the prompt and output lists in place: the same tokens as ``all_ids``."""
    from pd.types import Req, SamplingParams

    req = Req(0, [5, 6, 7, 8], SamplingParams(), 0, 64)
    req.output_ids += [9, 10, 11]
    every = req.all_ids
    assert [req.token_at(p) for p in range(len(every))] == every
    for start in range(len(every) + 1):
        for end in range(start, len(every) + 1):
            assert req.ids(start, end) == every[start:end], (start, end)
