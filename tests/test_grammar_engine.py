"""Structured output in the engine, without processes: the tiny model (random weights) sampling under
grammars. Oracles: llguidance's own matcher, built here from the tokenizer and the grammar text, replays
every output (each sampled token must be allowed where it was sampled, the output must be complete), and
the alternatives returned as top logprobs must be allowed too (logprobs are taken after the mask);
jsonschema validates the JSON; the colocated engine's seeded outputs equal the disaggregated ones (first
token on the prefill engine, the rest on the decode engine); the page allocator and the matcher count say
every request's state is gone, whichever way it ended."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pd.config import EngineConfig
from pd.engine.colocated import ColocatedEngine
from pd.engine.decode import DecodeEngine
from pd.engine.engine import Engine
from pd.engine.messages import AbortRoom, DecodeRoom, Failure, PrefillRoom, RoomFailed, Tokens, TransferEnded
from pd.engine.prefill import PrefillEngine
from pd.grammar import GrammarError, GrammarSpec
from pd.tokenizer import Tokenizer
from pd.transfer.aux import SlotAllocator
from pd.transfer.state import TransferState
from pd.types import FinishReason, Req, SamplingParams
from tests.support.schemas import SCHEMAS
from tests.test_role_engines import Loopback

llg = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

PROMPTS = [[5, 17, 99, 3, 42, 8, 61, 7, 12, 30, 2], [9, 4, 77], [33, 21, 56, 80, 14, 6, 70], [1, 2]]
MAX_TOKENS = 120  # every grammar here finishes well within it (the test asserts "stop")
SPECS = {
    "nested": GrammarSpec.json_schema(SCHEMAS["nested"], strict=True),
    "enums": GrammarSpec.json_schema(SCHEMAS["enums"]),
    "object": GrammarSpec.json_object(),
    "regex": GrammarSpec.regex(r"[a-c]{2,5}-[0-9]{1,3}"),
    "choice": GrammarSpec.choice(["yes", "no", "maybe so"]),
}


def make_engine(model: str, tok: Tokenizer, **kw) -> Engine:
    cfg = EngineConfig(
        model_path=model, **{"page_size": 4, "chunk_size": 8, "max_running": 8, "num_pages": 128, **kw}
    )
    return Engine(cfg, tok)


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tok) -> Engine:
    return make_engine(str(tiny_model_dir), tok)


class Oracle:
    """llguidance's matcher for one spec, independent of pd's backend and engine."""

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        from pd.grammar.text import grammar_text

        self.grammar_text = grammar_text
        self.ll_tok = llg.LLTokenizer(tok.to_json(), n_vocab=vocab, eos_token=sorted(tok.eos_token_ids))
        self.eos = tok.eos_token_ids

    def replay(self, spec: GrammarSpec, req: Req) -> None:
        """Each output token was allowed where it was sampled, every top-logprob alternative with a finite
        logprob too, and the output is complete (the grammar stopped, or ended on an allowed EOS)."""
        m = llg.LLMatcher(self.ll_tok, self.grammar_text(spec))
        for i, token in enumerate(req.output_ids):
            allowed = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            assert allowed[token], f"token {i} ({token}) was not allowed"
            if req.output_top_logprobs:
                for alt, lp in req.output_top_logprobs[i]:
                    assert allowed[alt] or lp == -math.inf, f"alternative {alt} of token {i} has logprob {lp}"
            assert math.isfinite(req.output_logprobs[i])
            assert m.consume_token(token), m.get_error()
        assert m.is_stopped() and not m.is_error()


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Req]:
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return reqs


def idle(*engines: Engine) -> bool:
    return all(
        e.pages_held == 0 and e.scheduler.num_unfinished == 0 and e.grammar.active == 0 for e in engines
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_tokens_are_allowed_by_the_library_matcher(engine, tok, temperature) -> None:
    """A batch of constrained requests (every spec, twice with other seeds) beside a free one: every output
    replays through llguidance's matcher and ends with "stop"; the JSON ones validate. The free request
    shows the mask matters: the same model unconstrained leaves each grammar at once."""
    oracle = Oracle(tok, engine.model_cfg.vocab_size)
    cases = [(name, seed) for seed in (0, 1) for name in SPECS]
    params = [
        SamplingParams(
            temperature=temperature, seed=seed, max_tokens=MAX_TOKENS, top_logprobs=5, grammar=SPECS[name]
        )
        for name, seed in cases
    ]
    free = SamplingParams(temperature=temperature, seed=0, max_tokens=8, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(cases))]
    *reqs, plain = run(engine, [*prompts, PROMPTS[0]], [*params, free])
    for (name, _), req in zip(cases, reqs):
        assert req.finish_reason is FinishReason.STOP, (name, tok.decode(req.output_ids))
        oracle.replay(SPECS[name], req)
        text = tok.decode(req.output_ids)
        if name in SCHEMAS:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        elif name == "object":
            assert isinstance(json.loads(text), dict)
    assert len(plain.output_ids) == 8, "the free request ran beside them, unconstrained"
    for name, spec in SPECS.items():
        m = llg.LLMatcher(oracle.ll_tok, oracle.grammar_text(spec))
        assert m.validate_tokens(plain.output_ids) < len(plain.output_ids), f"{name}: a weak test"
    assert idle(engine)


def test_disaggregated_outputs_equal_the_colocated_engine(tiny_model_dir, tok, engine) -> None:
    """The prefill engine samples the first token under the grammar and ships it; the decode engine's
    matcher consumes it, then continues: the seeded outputs equal the colocated engine's, token for token."""
    specs = [SPECS["nested"], SPECS["regex"], SPECS["choice"], SPECS["object"]]
    params = [SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS, grammar=g) for g in specs]
    expected = [r.output_ids for r in run(engine, PROMPTS, params)]
    p, d = make_engine(str(tiny_model_dir), tok), make_engine(str(tiny_model_dir), tok)
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link)
    decode = DecodeEngine(d, link, SlotAllocator(8), headroom_tokens=8, max_pending=16)
    for room, (prompt, sp) in enumerate(zip(PROMPTS, params)):
        assert prefill.handle(PrefillRoom(room, tuple(prompt), sp)) == []
        assert decode.handle(DecodeRoom(room, tuple(prompt), sp, "prefill:1")) == []
    while prefill.has_work():
        prefill.step()
    assert p.grammar.active == 0, "a room leaves the prefill engine (and its matcher) with its first token"
    tokens: dict[int, list[int]] = {room: [] for room in range(len(PROMPTS))}
    for room in range(len(PROMPTS)):
        link.copy(room)
        prefill.handle(TransferEnded(room, TransferState.DONE))
        [first] = decode.handle(TransferEnded(room, TransferState.DONE, aux=link.aux[room]))
        tokens[room] += first.token_ids
    while decode.has_work():
        for event in decode.step():
            assert isinstance(event, Tokens)
            tokens[event.room] += event.token_ids
    assert [tokens[r] for r in range(len(PROMPTS))] == expected
    assert idle(p, d)


def test_matchers_go_with_their_requests_however_they_end(tiny_model_dir, tok) -> None:
    """Complete, max_tokens, aborted mid-decode, and failed (its output left the grammar: injected here)
    requests; the failure ends its room alone, with an error."""
    e = make_engine(str(tiny_model_dir), tok)
    colocated = ColocatedEngine(e)
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS, grammar=SPECS["nested"])
    cases = {0: sp, 1: SamplingParams(seed=3, max_tokens=3, grammar=SPECS["nested"]), 2: sp, 3: sp}
    for room, params in cases.items():
        assert colocated.handle(DecodeRoom(room, tuple(PROMPTS[room]), params)) == []
    events: dict[int, list] = {room: [] for room in cases}
    for _ in range(10):  # until every prompt is prefilled (chunks of 8) and each first token sampled
        if len(e.scheduler.running) == len(cases):
            break
        for event in colocated.step():
            events[event.room].append(event)
    assert len(e.scheduler.running) == len(cases), events
    assert e.grammar.active == len(cases)
    [aborted] = colocated.handle(AbortRoom(2, "client gone"))
    assert aborted.finish_reason == "abort" and e.grammar.active == len(cases) - 1
    # Room 3's matcher refuses whatever it is given next: its output has left the grammar.
    [room3] = [r for r in e.grammar._entries if r.rid == 3]  # matchers are kept by sequence
    e.grammar._entries[room3].matcher.accept = lambda token: False  # type: ignore[method-assign]
    while colocated.has_work():
        for event in colocated.step():
            events[event.room].append(event)
    assert events[0][-1].finish_reason == "stop"
    jsonschema.validate(
        json.loads(tok.decode([t for ev in events[0] for t in ev.token_ids])), SCHEMAS["nested"]
    )
    assert events[1][-1].finish_reason == "length" and sum(len(ev.token_ids) for ev in events[1]) == 3
    failed = events[3][-1]
    assert isinstance(failed, RoomFailed) and failed.failure is Failure.FAILED
    assert "structured output failed at output token" in failed.message
    assert idle(e) and colocated.rooms_open == 0


def test_grammar_needs_a_tokenizer_and_a_valid_spec(tiny_model_dir, engine) -> None:
    bare = Engine(EngineConfig(model_path=str(tiny_model_dir), page_size=4, num_pages=16))
    with pytest.raises(GrammarError, match="not available on this rank"):
        bare.make_request([1, 2], SamplingParams(grammar=GrammarSpec.json_object()))
    with pytest.raises(GrammarError, match="nonsense"):
        engine.make_request([1, 2], SamplingParams(grammar=GrammarSpec.json_schema({"type": "nonsense"})))


@pytest.mark.parametrize("oracle", [False, True], ids=["", "oracle"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_requests_speculate_and_emit_the_plain_tokens(tiny_model, temperature, oracle) -> None:
    """With MTP, a request's grammar masks every offset of a verify after consuming the drafts before it
    (rolled back after the fill): with drafts planted from the plain run (every third wrong), grammar
    requests accept drafts and emit exactly the plain run's tokens and logprobs. The benchmark oracle leaves
    them verified for real (its argmax after a wrong draft would break the grammar)."""
    from pd.speculative import SpeculativeConfig
    from tests.test_speculative_engine import plant

    path = tiny_model("ci", with_mtp=True)
    tok = Tokenizer.from_dir(path)
    params = [
        SamplingParams(temperature=temperature, seed=i, max_tokens=MAX_TOKENS, grammar=spec)
        for i, spec in enumerate(list(SPECS.values())[: len(PROMPTS)])
    ]
    want = run(make_engine(str(path), tok), PROMPTS, params)
    e = make_engine(str(path), tok, speculative=SpeculativeConfig("mtp", 2, oracle))
    plant(e, [r.output_ids for r in want], e.model_cfg.vocab_size, wrong=3)
    got = run(e, PROMPTS, params)
    for g, w in zip(got, want, strict=True):
        assert g.output_ids == w.output_ids and g.finish_reason == w.finish_reason
        assert g.output_logprobs == pytest.approx(w.output_logprobs, abs=1e-4)
    assert e.spec is not None and sum(e.spec.stats.accepted_at) > 0 and idle(e)


def test_a_verifys_bitmasks_keep_their_own_buffers(engine) -> None:
    """A verify fills one bitmask per offset, each copied to the device without waiting: the host buffer of
    offset 0 must not be filled again for offset 1 before that copy ran. On CPU the "copy" is the host
    buffer itself, so the mask of offset 0 would change under it; it must stay the mask after no drafts."""
    matchers = engine.grammar
    req = engine.make_request([1, 2], SamplingParams(max_tokens=8, grammar=SPECS["choice"]))
    with torch.inference_mode():  # as the engine's steps (its buffers are inference tensors)
        first = matchers.fill([req], [[]], part=0)
        want = first.clone()
        allowed = np.flatnonzero(np.unpackbits(want.numpy().view(np.uint8), bitorder="little"))
        after = matchers.fill([req], [[int(allowed[0])]], part=1)  # the mask after one allowed draft
    assert after is not None and not torch.equal(after, want)
    assert torch.equal(first, want)
    matchers.release(req)
