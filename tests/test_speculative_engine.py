"""Speculative decoding with MTP in the colocated engine (pd.engine.speculative), on the tiny checkpoint with
its MTP layer. The oracle is plain decoding: with drafts verified, ``Engine.generate`` must emit the very
same tokens (and logprobs) as without speculation, greedy and seeded sampling alike, for K = 1..3, chunked
prompts, max_tokens and stop tokens that end a request mid-step. The tiny model's random MTP layer rarely
drafts right, so acceptance is also driven by drafts planted from the plain run's output (some corrupted):
those must be accepted up to the first wrong one, and the engine must then need fewer target forwards. The
MTP layer's drafts themselves are checked against the dense reference of tests/test_mtp.py."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch

from pd.config import EngineConfig, ModelConfig
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.model.mtp import DeepseekV3WithMTP
from pd.speculative import SpeculativeConfig
from pd.types import FinishReason, SamplingParams
from tests.support.clients import random_prompt

PAGE_SIZE = 3  # odd on purpose: a step's K + 1 tokens cross pages
CHUNK = 16  # prompts longer than this are prefilled in chunks
LENGTHS = (5, 17, 40, 9)
GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=13, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("ci", with_mtp=True)


@pytest.fixture(scope="module")
def prompts(path):
    rng = random.Random(0)
    return [random_prompt(rng, n, 100) for n in LENGTHS]


def config(path, k: int = 0, oracle: bool = False, num_pages: int = 256, **kw) -> EngineConfig:
    spec = SpeculativeConfig("mtp", k, oracle) if k else SpeculativeConfig()
    return EngineConfig(
        str(path), page_size=PAGE_SIZE, num_pages=num_pages, chunk_size=CHUNK, speculative=spec, **kw
    )


def engine(path, k: int = 0, oracle: bool = False, num_pages: int = 256) -> Engine:
    return Engine(config(path, k, oracle, num_pages))


def generate(e: Engine, prompts, params) -> list[tuple[list[int], list[float], FinishReason]]:
    out = [(c.output_ids, c.logprobs, c.finish_reason) for c in e.generate(prompts, params)]
    assert e.pages_held == 0  # every page freed but the prefix cache's (a double free raises)
    return out


def same(got, want) -> None:
    for (gt, glp, gr), (wt, wlp, wr) in zip(got, want, strict=True):
        assert gt == wt and gr == wr
        assert glp == pytest.approx(wlp, abs=1e-4)


def plant(e: Engine, want: list[list[int]], vocab: int, wrong: int = 0) -> None:
    """Before each verify step is launched, each request's drafts become its plain-run continuation from the
    tokens it has by then (those of a step read but not postprocessed yet included), the draft at offset
    ``(tokens) % wrong`` corrupted (``wrong`` 0: every draft right)."""
    spec = e.spec
    assert spec is not None
    launch = spec.launch

    def planted(batch, ahead=None):
        rows = {r: b for b, r in enumerate(ahead.step.batch.reqs)} if ahead is not None else {}
        for r in batch.reqs:
            n = len(r.output_ids) + (ahead.counts[rows[r]] if r in rows else 0)
            drafts = list(want[r.rid][n : n + spec.k])
            if wrong and n % wrong < len(drafts):
                drafts[n % wrong] = (drafts[n % wrong] + 1) % vocab
            spec.drafter.drafts[r] = drafts
        return launch(batch, ahead)

    spec.launch = planted  # type: ignore[method-assign]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_decoding_emits_the_plain_tokens(path, prompts, params, k):
    want = generate(engine(path), prompts, params)
    same(generate(engine(path, k), prompts, params), want)  # the MTP layer's own drafts

    planted = engine(path, k)
    plain = engine(path)
    plant(planted, [w[0] for w in want], planted.model_cfg.vocab_size, wrong=k + 2)
    same(generate(planted, prompts, params), want)
    generate(plain, prompts, params)
    stats = planted.spec.stats
    assert sum(stats.accepted_at) > 0 and sum(stats.emitted_hist[2:]) > 0
    assert planted.forwards < plain.forwards


@pytest.mark.parametrize("k", [2, 3])
def test_max_tokens_and_stop_tokens_end_a_request_inside_a_step(path, prompts, k):
    want = generate(engine(path), prompts, GREEDY)
    # A stop token each request emits mid-way; max_tokens not a multiple of K + 1.
    stop = want[1][0][6]
    params = SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
    want = generate(engine(path), prompts, params)
    assert any(r is FinishReason.STOP for _, _, r in want) and any(
        r is FinishReason.LENGTH for _, _, r in want
    )
    e = engine(path, k)
    plant(e, [w[0] + [0] * k for w in want], e.model_cfg.vocab_size)  # every draft right
    same(generate(e, prompts, params), want)
    assert e.spec.stats.emitted_hist[k + 1] > 0  # whole steps accepted


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "pipelined"])
@pytest.mark.parametrize("k", [1, 3])
def test_choices_of_a_forked_request_decode_as_plain(path, prompts, k, graphs):
    """n = 2: the choices share the prompt's partial last page until the first write copies it (the verify
    step does the batch's copies first); each choice emits its plain tokens."""
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=5, n=2, ignore_eos=True)
    e = graph_engine(config(path, k), [1, 2, 4])[0] if graphs else engine(path, k)
    same(generate(e, prompts[:2], params), generate(engine(path), prompts[:2], params))


def test_the_oracle_accepts_every_draft_and_needs_fewer_forwards(path, prompts):
    plain, oracle = engine(path), engine(path, 3, oracle=True)
    generate(plain, prompts, GREEDY)
    got = generate(oracle, prompts, GREEDY)
    assert all(len(t) == GREEDY.max_tokens and r is FinishReason.LENGTH for t, _, r in got)
    assert oracle.forwards < plain.forwards
    assert oracle.spec.stats.emitted_hist[4] > 0


PROCESSED = [
    SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5
    ),
    SamplingParams(
        max_tokens=12,
        temperature=0.9,
        seed=3,
        ignore_eos=True,
        repetition_penalty=1.3,
        logit_bias=((5, 3.0),),
    ),
    # min_tokens holds back a stop token the bias makes the argmax: it must come as the 7th token exactly.
    SamplingParams(
        max_tokens=12, temperature=0.0, min_tokens=6, stop_token_ids=(7,), logit_bias=((7, 30.0),)
    ),
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=0.7, top_logprobs=2),
]


# Greedy alone: a batch the greedy graph would take if processing did not keep it out.
GREEDY_PROCESSED = [PROCESSED[0], PROCESSED[2], PROCESSED[0], PROCESSED[2]]


@pytest.mark.parametrize("params", [PROCESSED, GREEDY_PROCESSED], ids=["mixed", "greedy"])
@pytest.mark.parametrize("wrong", [0, 3], ids=["right", "some-wrong"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "pipelined"])
def test_processed_requests_speculate_and_decode_as_plain(path, prompts, graphs, wrong, params):
    """Penalties, bias and min_tokens apply at every offset of a verify, the drafts before it counted as
    generated (and, pipelined, the tokens of the step read but not yet postprocessed, which the device has
    recorded): with drafts planted from the plain run (all right, or every third wrong), requests that ask for
    processing accept drafts and emit the plain run's tokens and logprobs, eagerly and through the graphs'
    steps (all right: the stop token min_tokens holds back arrives at a step's last offset)."""
    want = generate(engine(path), prompts, params)
    assert all(len(t) == 7 and t[-1] == 7 for (t, _, _), sp in zip(want, params) if sp.min_tokens)
    e, steps = graph_engine(config(path, 2), [1, 2, 8]) if graphs else (engine(path, 2), [])
    plant(e, [t for t, _, _ in want], e.model_cfg.vocab_size, wrong=wrong)
    same(generate(e, prompts, params), want)
    assert e.spec is not None and sum(e.spec.stats.accepted_at) > 0  # every request here asks for processing
    assert (("ahead", 4) in steps) == graphs


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "pipelined"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_top_logprobs_of_speculating_requests_equal_plain(path, prompts, temperature, graphs):
    """A request asking for top logprobs drafts like any other; the alternatives of every emitted token (from
    the target's logits at its offset of the verify, read with the step) equal a plain run's."""
    params = SamplingParams(max_tokens=9, temperature=temperature, seed=3, ignore_eos=True, top_logprobs=4)

    def run(e: Engine) -> list[tuple[list[int], list]]:
        reqs = [e.add_request(p, params) for p in prompts]
        while e.has_work():
            e.step()
        return [(r.output_ids, r.output_top_logprobs) for r in reqs]

    want = run(engine(path))
    e, steps = graph_engine(config(path, 2), [1, 2, 4]) if graphs else (engine(path, 2), [])
    plant(e, [ids + [0] * 2 for ids, _ in want], e.model_cfg.vocab_size)  # every draft right
    got = run(e)
    assert (("ahead", 4) in steps) == graphs
    assert e.spec.stats.emitted_hist[3] > 0  # steps that emitted three tokens, two of them drafts
    for (g_ids, g_top), (w_ids, w_top) in zip(got, want, strict=True):
        assert g_ids == w_ids and len(g_top) == len(w_top) == len(w_ids)
        for g, w in zip(g_top, w_top):
            assert [t for t, _ in g] == [t for t, _ in w]
            assert [lp for _, lp in g] == pytest.approx([lp for _, lp in w], abs=1e-4)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "pipelined"])
def test_preemption_and_aborts_free_every_page_once(path, prompts, graphs):
    """A pool too small for all four requests preempts some (with pipelined steps, while one is in flight):
    the plain run's tokens still come out; aborts mid-run free every page once. Pipelined, no page of the step
    in flight is free while it is (a transfer or another request could take it while the step writes it)."""

    def make(k: int, num_pages: int = 256) -> Engine:
        cfg = config(path, k, num_pages=num_pages)
        if not graphs:
            return Engine(cfg)
        e = graph_engine(cfg, [1, 2, 4])[0]
        assert e.spec is not None
        launch, step, flying = e.spec.launch, e.step, set()

        def launched(batch, ahead=None):
            flying.clear()
            flying.update(p for r in batch.reqs for p in r.pages)
            return launch(batch, ahead)

        def checked_step():
            outputs = step()
            assert e._verifying is None or flying.isdisjoint(e.allocator._free)
            return outputs

        e.spec.launch, e.step = launched, checked_step  # type: ignore[method-assign]
        return e

    want = generate(engine(path), prompts, GREEDY)
    small = make(3, num_pages=40)
    preempt, preempted = small.scheduler._preempt, []
    small.scheduler._preempt = lambda r: (preempted.append(r.rid), preempt(r))[1]  # type: ignore[method-assign]
    same(generate(small, prompts, GREEDY), want)
    assert preempted
    e = make(2)
    reqs = [e.add_request(p, GREEDY) for p in prompts]
    for _ in range(6):
        e.step()
    assert any(r.output_ids for r in reqs) and e.pages_held > 0
    for r in reqs:
        e.abort(r)
    while e.has_work():  # a step in flight holds its pages until it is read; it emits nothing
        assert not e.step()
    assert e.pages_held == 0 and not e.spec.drafter.drafts


def test_mtp_drafts_are_the_dense_reference_mtp_over_the_sequence(path, hf_model):
    """After prefill and after verify steps, a request's drafts are what the MTP layer computes densely over
    its whole sequence: its MTP KV is consistent with the tokens emitted."""
    from tests.test_mtp import Reference

    ref, hf = Reference(path), hf_model(path)
    e = engine(path, 2)
    req = e.add_request(random_prompt(random.Random(3), 20, 100), GREEDY)
    checked = 0
    while not req.finished and len(req.output_ids) < 8:
        e.step()
        drafts = e.spec.drafter.drafts.get(req)
        if not drafts:
            continue
        ids = req.all_ids
        with torch.no_grad():
            hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]
        logits, head = ref(hidden[:-1], torch.tensor(ids[1:]))
        assert drafts[0] == int(logits[-1].argmax())
        if len(drafts) > 1:
            second, _ = ref(torch.cat([hidden[:-1], head[-1:]]), torch.tensor([*ids[1:], drafts[0]]))
            assert drafts[1] == int(second[-1].argmax())
        checked += 1
    assert checked >= 3


def test_the_colocated_role_counts_drafts_and_acceptance_per_position(path, prompts):
    from pd.engine.colocated import ColocatedEngine
    from pd.worker.metrics import SPEC_ACCEPTED, SPEC_DRAFTS, SPEC_STEP_TOKENS

    want = generate(engine(path), prompts, GREEDY)
    e = engine(path, 2)
    role = ColocatedEngine(e)
    plant(e, [w[0] for w in want], e.model_cfg.vocab_size, wrong=4)
    generate(e, prompts, GREEDY)
    stats = e.spec.stats
    text = role.metrics.render()

    def value(name: str, **labels: str) -> float:
        want_labels = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        line = next(x for x in text.splitlines() if x.startswith(f"{name}{{") and want_labels in x)
        return float(line.rsplit(" ", 1)[1])

    assert stats.drafted > 0 and sum(stats.accepted_at) > 0
    for j in range(2):
        assert value(SPEC_ACCEPTED, position=str(j), role="colocated") == stats.accepted_at[j]
    drafted = sum(value(SPEC_DRAFTS, position=str(j), role="colocated") for j in range(2))
    assert drafted == stats.drafted
    assert value(f"{SPEC_STEP_TOKENS}_count", role="colocated") == sum(stats.emitted_hist)
    assert value(f"{SPEC_STEP_TOKENS}_sum", role="colocated") == sum(
        c * n for c, n in enumerate(stats.emitted_hist)
    )


def test_prefill_ships_the_mtp_kv_and_first_drafts_and_decode_drafts_as_colocated(path, prompts):
    """A prefill engine and a decode engine (pages copied in-process, every layer, the MTP layer's too):
    the aux record carries the first drafts, and the decode engine's drafts after each step are the
    colocated engine's, which they could not be without the prompt's MTP KV."""
    from pd.engine.decode import DecodeEngine
    from pd.engine.messages import DecodeRoom, PrefillRoom, Tokens, TransferEnded
    from pd.engine.prefill import PrefillEngine
    from pd.transfer.aux import SlotAllocator
    from pd.transfer.state import TransferState
    from tests.test_role_engines import Loopback

    prompt = prompts[2]  # chunked
    colocated = engine(path, 2)
    req = colocated.add_request(prompt, GREEDY)
    want: list[list[int]] = []
    while colocated.has_work():
        colocated.step()
        if req.output_ids and not req.finished:
            want.append(list(colocated.spec.drafter.drafts[req]))

    p, d = engine(path, 2), engine(path, 2)
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link)
    decode = DecodeEngine(d, link, SlotAllocator(4), headroom_tokens=8, max_pending=4)
    prefill.handle(PrefillRoom(0, tuple(prompt), GREEDY))
    decode.handle(DecodeRoom(0, tuple(prompt), GREEDY, "prefill:1"))
    while prefill.has_work():
        prefill.step()
    link.copy(0)
    prefill.handle(TransferEnded(0, TransferState.DONE))
    aux = link.aux[0]
    assert list(aux.drafts) == want[0]
    [first] = decode.handle(TransferEnded(0, TransferState.DONE, aux=aux))
    tokens = list(first.token_ids)
    got = [list(aux.drafts)]
    [running] = d.scheduler.running
    while decode.has_work():
        for event in decode.step():
            assert isinstance(event, Tokens)
            tokens += event.token_ids
        if not running.finished:
            got.append(list(d.spec.drafter.drafts[running]))
    assert got == want and tokens == req.output_ids
    assert p.pages_held == 0 and d.pages_held == 0


def test_a_pipelined_decode_engine_emits_the_colocated_tokens_as_rooms_arrive(path, prompts):
    """A decode engine on the verify graphs' steps, pipelined: rooms whose KV and first drafts arrive from a
    prefill engine while others verify (one between a step's launch and its read) emit the plain colocated
    run's tokens, and every page is free on both sides at the end."""
    from pd.engine.decode import DecodeEngine
    from pd.engine.messages import DecodeRoom, PrefillRoom, Tokens, TransferEnded
    from pd.engine.prefill import PrefillEngine
    from pd.transfer.aux import SlotAllocator
    from pd.transfer.state import TransferState
    from tests.test_role_engines import Loopback

    params = dataclasses.replace(GREEDY, max_tokens=9)
    want = generate(engine(path), prompts[:3], params)
    p = engine(path, 2)
    d, steps = graph_engine(config(path, 2), [1, 2, 4])
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link)
    decode = DecodeEngine(d, link, SlotAllocator(4), headroom_tokens=8, max_pending=4)
    tokens: dict[int, list[int]] = {}

    def arrive(room: int) -> None:
        prefill.handle(PrefillRoom(room, tuple(prompts[room]), params))
        decode.handle(DecodeRoom(room, tuple(prompts[room]), params, "prefill:1"))
        while prefill.has_work():
            prefill.step()
        link.copy(room)
        prefill.handle(TransferEnded(room, TransferState.DONE))
        for event in decode.handle(TransferEnded(room, TransferState.DONE, aux=link.aux[room])):
            assert isinstance(event, Tokens)
            tokens.setdefault(room, []).extend(event.token_ids)

    arrive(0)
    arrive(1)
    while decode.has_work():
        for event in decode.step():
            assert isinstance(event, Tokens)
            tokens.setdefault(event.room, []).extend(event.token_ids)
        if 2 not in tokens and len(tokens[0]) >= 4:
            arrive(2)
    assert [tokens[i] for i in range(3)] == [t for t, _, _ in want]
    assert ("ahead", 2) in steps and ("ahead", 3) in steps
    assert p.pages_held == 0 and d.pages_held == 0


def graph_engine(cfg: EngineConfig, buckets: list[int]) -> tuple[Engine, list[tuple[str, int]]]:
    """An engine whose runner has the verify graphs' steps, run uncaptured on their static buffers (CPU), so
    it pipelines its verify steps (unless ``cfg.overlap`` is off); returns it and the list each step appends
    (which graph: ``verify``, then ``draft``, or ``greedy`` alone; its batch size) to, with ``("ahead", n)``
    for each step launched before the one before it was postprocessed."""
    from pd.engine.verify_graph import VerifyGraphs

    r = ModelRunner(cfg, ModelConfig.from_dir(cfg.model_path))  # CPU: no graphs of its own
    spec = cfg.speculative
    assert isinstance(r.model, DeepseekV3WithMTP)
    graphs = VerifyGraphs(
        r.model, r.attn, r.pool, buckets, r.context_len, spec.num_tokens, spec.oracle, capture=False
    )
    steps: list[tuple[str, int]] = []
    for name in ("verify", "greedy"):
        step = getattr(graphs, name)
        setattr(
            graphs,
            name,
            lambda t, n, p, step=step, name=name: (steps.append((name, len(t))), step(t, n, p))[1],
        )
    r.verify_graphs = graphs
    e = Engine(cfg, runner=r)
    assert e.pipelined == cfg.overlap and e.spec is not None
    launch = e.spec.launch

    def launched(batch, ahead=None):
        if ahead is not None:
            steps.append(("ahead", len(batch.reqs)))
        return launch(batch, ahead)

    e.spec.launch = launched  # type: ignore[method-assign]
    return e, steps


PIPELINED = pytest.mark.parametrize("overlap", [False, True], ids=["serial", "pipelined"])


@PIPELINED
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("k", [1, 3])
def test_verify_graph_steps_emit_the_plain_tokens(path, prompts, params, k, overlap):
    """The graphs' static-buffer steps (pd.engine.verify_graph; uncaptured here): rows padded to K + 1 tokens
    and buckets padded with dummy rows, drafts planted right and wrong, give the plain run's tokens (greedy
    requests through the greedy graph's own acceptance, seeded ones through the verify and draft graphs),
    serially and pipelined (each verify step launched before the host postprocesses the one before)."""
    want = generate(engine(path), prompts, params)
    e, steps = graph_engine(config(path, k, overlap=overlap), [1, 2, 8])
    plant(e, [t for t, _, _ in want], e.model_cfg.vocab_size, wrong=3)
    same(generate(e, prompts, params), want)
    assert (
        (("greedy" if params is GREEDY else "verify"), 4) in steps
        and e.spec is not None
        and sum(e.spec.stats.accepted_at) > 0
    )
    assert (("ahead", 4) in steps) == overlap


@PIPELINED
@pytest.mark.parametrize("k", [2, 3])
def test_draft_graph_drafts_what_the_eager_mtp_layer_drafts(path, prompts, k, overlap):
    """Under the oracle every draft is accepted and fed to the target, so the output depends on every draft
    the MTP layer makes: the graphs' (the MTP layer over all K + 1 offsets, the row picked by the count on the
    device, then the chain graphs) must equal eager drafting's."""
    params = dataclasses.replace(GREEDY, max_tokens=20)
    want = generate(engine(path, k, oracle=True), prompts, params)
    e, steps = graph_engine(config(path, k, oracle=True, overlap=overlap), [2, 4])
    same(generate(e, prompts, params), want)
    assert ("greedy", 4) in steps and (("ahead", 4) in steps) == overlap


def test_spec_step_bench_emits_k_plus_one_tokens_per_step_under_the_oracle(tmp_path):
    """pd.bench.spec_step's CPU smoke run (graph steps uncaptured): every step emits K + 1 tokens a request, in
    the engine's pipelined speculative loop too."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "pd.bench.spec_step", "--device", "cpu", "--preset", "ci", "--batches", "1,3",
           "--ks", "1,3", "--context", "12", "--iters", "2", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())
    got = [(r["batch"], r["k"], r["tokens_per_step"]) for r in rows]
    assert got == [(1, 0, 1.0), (3, 0, 1.0), (1, 1, 2.0), (3, 1, 2.0), (1, 3, 4.0), (3, 3, 4.0)]
    assert [r["loop_tokens_per_step"] for r in rows if r["k"]] == [2.0, 2.0, 4.0, 4.0]
