"""The engine: scheduler + model runner + output processing for one rank.

``step()`` reads as schedule -> run -> postprocess and returns what each request produced. It is the
colocated reference engine (``generate``), and the core of the role engines: ``DecodeEngine`` admits
requests whose KV arrived from a prefill rank with ``add_prefilled``; ``PrefillEngine`` runs its
scheduler's extend batches and ships the pages.

A request of ``n > 1`` choices is computed once; its first token is sampled n times from the prompt's
last logits (``StepResult.forks``), and ``_fork`` makes choices 1..n-1 new sequences (``Req.index``, listed
in choice 0's ``Req.forks``) that share every page of the prompt by reference count. No KV is copied at
the fork: the prompt's last page, when partial, is copied on the first write into it by a sequence that
does not hold it alone (``Scheduler._reserve_pages``), so at most one page per choice is ever copied.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pd.config import EngineConfig, ModelConfig
from pd.detokenizer import IncrementalDetokenizer
from pd.engine.decode_graph import Launched
from pd.engine.grammar import GrammarMatchers
from pd.engine.logits import LogitsProcessor
from pd.engine.prefix_cache import PrefixCache
from pd.engine.runner import ModelRunner
from pd.engine.scheduler import Scheduler
from pd.engine.speculative import MTPSpeculator, Verified, Verifying, lookahead
from pd.grammar import GRAMMAR_BACKENDS, GrammarBackend, make_grammar_backend
from pd.kv_cache import PageAllocator
from pd.sampling import choice_seed
from pd.tokenizer import Tokenizer
from pd.types import Batch, BatchMode, FinishReason, Req, Sampled, SamplingParams, StepResult, TopLogprobs

log = logging.getLogger(__name__)


@dataclass
class TokenOutput:
    """What one request produced in one step: new tokens, the text they completed, and whether it ended."""

    req: Req  # the sequence: a choice of its request (``req.index``)
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason | None
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, where asked
    prompt_logprobs: list[tuple[float, TopLogprobs]] = field(default_factory=list)  # first output, echo
    error: str | None = None  # the request failed (its output left its grammar): it ends with this error


@dataclass
class Completion:
    rid: int
    index: int  # the choice
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str | None = None


class Engine:
    def __init__(
        self, cfg: EngineConfig, tokenizer: Tokenizer | None = None, runner: ModelRunner | None = None
    ) -> None:
        self.cfg = cfg
        self.model_cfg = ModelConfig.from_dir(cfg.model_path)
        self.tokenizer = tokenizer
        self.runner = runner or ModelRunner(cfg, self.model_cfg)
        eos = tokenizer.eos_token_ids if tokenizer is not None else frozenset(self.model_cfg.eos_token_ids)
        self.allocator = PageAllocator(self.runner.pool.layout.num_pages)  # the one owner of page ids
        cache = PrefixCache(self.allocator, cfg.page_size) if cfg.prefix_cache else None
        # Decode steps overlap the host's work (``step``) on a single rank with decode graphs, without MTP; with
        # MTP, verify steps on the verify graphs are launched before the host postprocesses the one before.
        single = cfg.overlap and not self.runner.lockstep
        self.overlap = single and self.runner.graphs is not None and not cfg.speculative.enabled
        self.pipelined = single and self.runner.verify_graphs is not None
        # A step in flight computes past what the host knows of (a token; with MTP, its drafts and, pipelined, the
        # tokens of the step read before): its pages are reserved that far ahead.
        ahead = lookahead(cfg.speculative, self.pipelined) or int(self.overlap)
        self.scheduler = Scheduler(cfg.scheduler, self.allocator, frozenset(eos), cache, ahead)
        # Per-request logits state (penalties, grammar matchers); freed wherever a request ends.
        self.grammar = GrammarMatchers(self._grammar_backend(), self.runner.device)
        self.logits = LogitsProcessor(
            self.model_cfg.vocab_size, cfg.max_running, self.runner.device, frozenset(eos), self.grammar
        )
        self.spec = (
            MTPSpeculator(self.runner, self.logits, cfg.speculative) if cfg.speculative.enabled else None
        )
        self.scheduler.on_end = self._released
        self.forwards = 0  # target forwards run (extend, decode or verify steps)
        self._inflight: Launched | None = None  # the decode step on the device whose tokens are not read yet
        self._verifying: Verifying | None = None  # the same, a verify step (pipelined MTP)
        self.context_len = cfg.context_len(self.model_cfg)
        self._rids = itertools.count()
        self._seed_rng = random.Random(cfg.seed)
        self._detok: dict[Req, IncrementalDetokenizer] = {}

    def _released(self, req: Req) -> None:
        self.logits.release(req)
        if self.spec is not None:
            self.spec.drafter.release(req)

    def _grammar_backend(self) -> GrammarBackend | None:
        """Structured output needs the tokenizer (and an EOS token in it); without, it is refused."""
        if self.tokenizer is None or not self.tokenizer.eos_token_ids:
            return None
        try:
            return make_grammar_backend(GRAMMAR_BACKENDS[0], self.tokenizer, self.model_cfg.vocab_size)
        except (ValueError, RuntimeError) as e:  # e.g. a tokenizer the grammar library cannot read
            log.warning("structured output is off on this rank: %s", e)
            return None

    # ---- requests in ----

    def make_request(self, prompt_ids: Sequence[int], params: SamplingParams, rid: int | None = None) -> Req:
        """Validates a prompt and builds its request (not queued yet)."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if params.n > self.cfg.max_running:
            raise ValueError(f"n={params.n} choices exceed this rank's max_running {self.cfg.max_running}")
        if len(prompt_ids) >= self.context_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.context_len}")
        vocab = self.model_cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:4]} outside the vocabulary [0, {vocab})")
        if params.grammar is not None:
            self.grammar.check(params.grammar)  # GrammarError is a ValueError
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        return Req(next(self._rids) if rid is None else rid, list(prompt_ids), params, seed, self.context_len)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, rid: int | None = None) -> Req:
        """Queues a request for prefill and decode here (colocated). Raises QueueFull or ValueError."""
        req = self.make_request(prompt_ids, params, rid)
        self.scheduler.add(req)
        self._track(req)
        return req

    def add_prefilled(
        self, req: Req, first: Sampled, forks: Sequence[Sampled] = (), drafts: Sequence[int] = ()
    ) -> list[TokenOutput]:
        """Admits a request whose prompt KV is already in ``req.pages`` and whose first token was sampled
        elsewhere (by a prefill rank), with its other choices' first tokens (``forks``, n > 1); each choice
        joins the running batch unless its first token ends it; ``drafts``: choice 0's first speculative
        drafts, from the prefill rank's MTP layer (its KV came with the pages). Returns the first outputs."""
        self._track(req)
        n = len(req.prompt_ids)
        self.scheduler.admit_prefilled(req)
        # As if the prompt's last position had just been computed here and sampled the tokens.
        batch = Batch(BatchMode.DECODE, [req], [n - 1], [n])
        result = StepResult([first.token], [first.logprob], [first.top], [[]], [list(forks)])
        outputs = self._postprocess(batch, result)
        if self.spec is not None and drafts and not req.finished:
            self.spec.drafter.drafts[req] = list(drafts)
        return outputs

    def abort(self, req: Req) -> list[Req]:
        """Ends every unfinished choice of ``req`` (choice 0, and its forks); returns those it ended."""
        ended = [r for r in (req, *req.forks) if not r.finished]
        for r in ended:
            self.scheduler.finish(r, FinishReason.ABORT)
            self._detok.pop(r, None)
        return ended

    # ---- the loop ----

    @property
    def pages_held(self) -> int:
        """Pages a request (or a prefill rank's transfer) holds: pages in use less those only the prefix cache
        holds. Zero on an idle engine."""
        cache = self.scheduler.cache
        return self.allocator.num_used - (cache.num_idle_pages() if cache is not None else 0)

    def has_work(self) -> bool:
        in_flight = self._inflight is not None or self._verifying is not None
        return self.scheduler.num_unfinished > 0 or in_flight

    def step(self) -> list[TokenOutput]:
        """One forward step; returns the outputs of the requests that sampled in it or, overlapped (below), in
        the step before it.

        Overlapped: a decode step is launched before the host reads the step in flight (``_land``), so the
        host's work (reading and postprocessing one step, scheduling and planning the next) runs while the GPU
        computes. A request that the landed step ends ran one token too many in the new one: that token is
        dropped. A step that is not a launched decode step (a prompt, a request with a grammar) first lands the
        one in flight and runs as before. With MTP the loop is pipelined instead (``_speculate``)."""
        if self.pipelined:
            return self._speculate()
        if not self.overlap:
            return self._step()
        outputs = self._land() if self._inflight is not None and not self._keeps_overlapping() else []
        batch = self.scheduler.schedule()
        if batch is None:
            return outputs + self._land()
        if not self.runner.launches(batch.mode, batch.reqs):
            assert self._inflight is None, "a step in flight is followed by a decode step it can launch"
            self.forwards += 1
            return outputs + self._run(batch)
        self.forwards += 1
        landing, self._inflight = self._inflight, self.runner.launch(batch, self._inflight, self.logits)
        # A request of this step that ends or is preempted holds its pages until the step lands.
        self.scheduler.in_flight, self.scheduler.flight_tag = frozenset(batch.reqs), self.forwards
        return outputs + (self._land(landing, self.forwards - 1) if landing is not None else [])

    def _speculate(self) -> list[TokenOutput]:
        """A step of the pipelined speculative loop: the verify step in flight is read (its tokens, counts and
        the next drafts, which the next step takes as inputs), the next one is launched, and only then does
        the host postprocess what it read, so postprocessing and scheduling run while the GPU verifies. A
        request that the read step ends ran one step too far in the launched one: its tokens are dropped.
        A prompt step, or a request with a grammar, first lands the step in flight."""
        spec = self.spec
        assert spec is not None
        sch = self.scheduler
        keeps = not sch.waiting and not sch.prefilling and spec.launches(sch.running)
        outputs = self._land_verify() if self._verifying is not None and not keeps else []
        batch = sch.schedule()
        if batch is None:
            if self._verifying is None:
                self.idle()
            return outputs + self._land_verify()
        self.forwards += 1
        if batch.mode is not BatchMode.DECODE or not spec.launches(batch.reqs):
            assert self._verifying is None, "a verify step in flight is followed by one launched after it"
            return outputs + self._run(batch)
        done = self._read_verify()
        self._verifying = spec.launch(batch, done)
        # A request of this step that ends or is preempted holds its pages until the step is read.
        sch.in_flight, sch.flight_tag = frozenset(batch.reqs), self.forwards
        return outputs + (spec.emit(done, self._postprocess) if done is not None else [])

    def _read_verify(self) -> Verified | None:
        """Reads the verify step in flight (None if there is none); the pages held for it are free from here."""
        step, self._verifying = self._verifying, None
        if step is None:
            return None
        assert self.spec is not None
        done = self.spec.read(step)
        self.allocator.release(self.scheduler.flight_tag)
        self.scheduler.in_flight = frozenset()
        return done

    def _land_verify(self) -> list[TokenOutput]:
        """Reads and postprocesses the verify step in flight, if there is one."""
        done = self._read_verify()
        assert self.spec is not None
        return self.spec.emit(done, self._postprocess) if done is not None else []

    def _step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            self.idle()
            return []
        self.forwards += 1
        return self._run(batch)

    def _run(self, batch: Batch) -> list[TokenOutput]:
        if self.spec is not None and batch.mode is BatchMode.DECODE:
            return self.spec.decode(batch, self._postprocess)
        result = self.runner.run(batch, self.logits)
        outputs = self._postprocess(batch, result)
        if self.spec is not None:
            self.spec.drafter.after_extend(batch, result.tokens)
        return outputs

    def _keeps_overlapping(self) -> bool:
        """Whether the next step is a decode step the step in flight can be followed by (no prompt to
        compute, no request with a grammar)."""
        sch = self.scheduler
        return not sch.waiting and not sch.prefilling and self.runner.launches(BatchMode.DECODE, sch.running)

    def _land(self, launched: Launched | None = None, tag: int | None = None) -> list[TokenOutput]:
        """Reads and postprocesses a launched step (default: the one in flight; ``tag``: its step tag, default
        the last). Its rows of requests that ended since its launch are dropped; a request preempted meanwhile
        keeps its token (computed before its pages were freed, and counted by its penalties already) and
        recomputes its KV when admitted again. The pages freed while the step ran are free from here on."""
        if launched is None:
            launched, self._inflight = self._inflight, None
        if launched is None:
            return []
        result = launched.result()
        self.allocator.release(self.forwards if tag is None else tag)
        if self._inflight is None:
            self.scheduler.in_flight = frozenset()
        step = launched.batch
        keep = [i for i, r in enumerate(step.reqs) if not r.finished]
        if len(keep) < len(step.reqs):
            reqs = [step.reqs[i] for i in keep]
            step = Batch(BatchMode.DECODE, reqs, [step.starts[i] for i in keep], [step.ends[i] for i in keep])
            top = [result.top[i] for i in keep]
            result = StepResult.of([result.tokens[i] for i in keep], [result.logprobs[i] for i in keep])
            result.top = top
        return self._postprocess(step, result)

    def idle(self) -> None:
        """A step with nothing to run here, which other ranks of the instance may be running: joins their EP
        collectives (the model's and, with MTP, the draft layer's)."""
        self.runner.run_idle()
        if self.spec is not None:
            self.spec.drafter.join_collectives()

    def _postprocess(self, batch: Batch, result: StepResult) -> list[TokenOutput]:
        # Forks are made before choice 0's token is recorded: a token that ends choice 0 frees its pages.
        forks = [
            (self._fork(req, i), draw)
            for req, draws in zip(batch.reqs, result.forks)
            if not req.finished
            for i, draw in enumerate(draws, 1)
        ]
        self.scheduler.postprocess(batch, result)
        outputs = []
        for req, token, logprob, top in zip(batch.reqs, result.tokens, result.logprobs, result.top):
            if token is None:
                continue
            assert logprob is not None  # sampled together with the token
            error = None
            if req.sampling.grammar is not None and not req.finished:
                complete, error = self.grammar.advance(req)
                if complete or error:
                    self.scheduler.finish(req, FinishReason.ABORT if error else FinishReason.STOP)
            text = ""
            detok = self._detok.get(req)
            if detok is not None:
                text = detok.add(token)
                if detok.stopped and not req.finished:
                    self.scheduler.finish(req, FinishReason.STOP)
                if req.finished:
                    text += detok.flush()
            if req.finished:
                self._detok.pop(req, None)
            first = len(req.output_ids) == 1 and req.sampling.prompt_logprobs is not None
            prompt = list(req.prompt_logprobs) if first else []
            tops = [top] if req.sampling.top_logprobs else []
            outputs.append(TokenOutput(req, [token], [logprob], text, req.finish_reason, tops, prompt, error))
        for fork, draw in forks:  # each joins the batch with its first token, as if sampled here
            self.scheduler.admit_prefilled(fork)
            n = len(fork.prompt_ids)
            one = StepResult([draw.token], [draw.logprob], [draw.top], [[]], [[]])
            outputs += self._postprocess(Batch(BatchMode.DECODE, [fork], [n - 1], [n]), one)
        return outputs

    def _fork(self, req: Req, index: int) -> Req:
        """Choice ``index`` of ``req``, whose prompt KV is computed: a new sequence holding one more reference
        to each of the prompt's pages (none is copied here; see ``Scheduler._reserve_pages``)."""
        pages = req.pages[: self.runner.pool.layout.pages_for(len(req.prompt_ids))]
        self.allocator.incref(pages)
        fork = Req(
            req.rid,
            list(req.prompt_ids),
            req.sampling,
            choice_seed(req.seed, index),
            req.max_context_len,
            pages=list(pages),
            index=index,
        )
        req.forks.append(fork)
        self._track(fork)
        return fork

    def _track(self, req: Req) -> None:
        if self.tokenizer is not None:
            self._detok[req] = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, stop=req.sampling.stop)

    # ---- offline API ----

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Runs ``prompts`` (text, or token ids) to completion together; results in prompt order (a prompt
        of ``n`` choices gives n results, in choice order)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.add_request(self._encode(p), sp) for p, sp in zip(prompts, params)]
        texts: dict[tuple[int, int], list[str]] = {}
        while self.has_work():
            for out in self.step():
                texts.setdefault((out.req.rid, out.req.index), []).append(out.text)
        completions = []
        for r in (choice for req in reqs for choice in (req, *req.forks)):
            assert r.finish_reason is not None  # no work left: every request finished
            text = "".join(texts[r.rid, r.index]) if self.tokenizer is not None else None
            completions.append(
                Completion(
                    r.rid, r.index, r.prompt_ids, r.output_ids, r.output_logprobs, r.finish_reason, text
                )
            )
        return completions

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or give the engine one")
            return self.tokenizer.encode(prompt)
        return list(prompt)
