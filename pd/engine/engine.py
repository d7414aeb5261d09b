"""The engine: scheduler + model runner + output processing for one rank.

``step()`` reads as schedule -> run -> postprocess and returns what each request produced. It is the
colocated reference engine (``generate``), and the core of the role engines: ``DecodeEngine`` admits
requests whose KV arrived from a prefill rank with ``add_prefilled``; ``PrefillEngine`` runs its
scheduler's extend batches and ships the pages.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pd.config import EngineConfig, ModelConfig
from pd.detokenizer import IncrementalDetokenizer
from pd.engine.grammar import GrammarMatchers
from pd.engine.logits import LogitsProcessor
from pd.engine.prefix_cache import PrefixCache
from pd.engine.runner import ModelRunner
from pd.engine.scheduler import Scheduler
from pd.grammar import GRAMMAR_BACKENDS, GrammarBackend, make_grammar_backend
from pd.kv_cache import PageAllocator
from pd.tokenizer import Tokenizer
from pd.types import Batch, BatchMode, FinishReason, Req, SamplingParams, StepResult, TopLogprobs

log = logging.getLogger(__name__)


@dataclass
class TokenOutput:
    """What one request produced in one step: new tokens, the text they completed, and whether it ended."""

    req: Req
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
        self.scheduler = Scheduler(cfg.scheduler, self.allocator, frozenset(eos), cache)
        # Per-request logits state (penalties, grammar matchers); freed wherever a request ends.
        self.grammar = GrammarMatchers(self._grammar_backend(), self.runner.device)
        self.logits = LogitsProcessor(
            self.model_cfg.vocab_size, cfg.max_running, self.runner.device, frozenset(eos), self.grammar
        )
        self.scheduler.on_end = self.logits.release
        self.context_len = cfg.context_len(self.model_cfg)
        self._rids = itertools.count()
        self._seed_rng = random.Random(cfg.seed)
        self._detok: dict[int, IncrementalDetokenizer] = {}

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

    def add_prefilled(self, req: Req, first_token: int, first_logprob: float) -> TokenOutput:
        """Admits a request whose prompt KV is already in ``req.pages`` and whose first token was
        sampled elsewhere (by a prefill rank); it joins the running batch unless that token ends it."""
        self._track(req)
        n = len(req.prompt_ids)
        self.scheduler.admit_prefilled(req)
        # As if the prompt's last position had just been computed here and sampled the token.
        batch = Batch(BatchMode.DECODE, [req], [n - 1], [n])
        return self._postprocess(batch, StepResult.of([first_token], [first_logprob]))[0]

    def abort(self, req: Req) -> None:
        self.scheduler.finish(req, FinishReason.ABORT)
        self._detok.pop(req.rid, None)

    # ---- the loop ----

    @property
    def pages_held(self) -> int:
        """Pages a request (or a prefill rank's transfer) holds: pages in use less those only the prefix cache
        holds. Zero on an idle engine."""
        cache = self.scheduler.cache
        return self.allocator.num_used - (cache.num_idle_pages() if cache is not None else 0)

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[TokenOutput]:
        """One forward step; returns the outputs of the requests that sampled in it."""
        batch = self.scheduler.schedule()
        if batch is None:
            self.runner.run_idle()  # other ranks of the instance may be stepping
            return []
        return self._postprocess(batch, self.runner.run(batch, self.logits))

    def _postprocess(self, batch: Batch, result: StepResult) -> list[TokenOutput]:
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
            detok = self._detok.get(req.rid)
            if detok is not None:
                text = detok.add(token)
                if detok.stopped and not req.finished:
                    self.scheduler.finish(req, FinishReason.STOP)
                if req.finished:
                    text += detok.flush()
            if req.finished:
                self._detok.pop(req.rid, None)
            first = len(req.output_ids) == 1 and req.sampling.prompt_logprobs is not None
            prompt = list(req.prompt_logprobs) if first else []
            tops = [top] if req.sampling.top_logprobs else []
            outputs.append(TokenOutput(req, [token], [logprob], text, req.finish_reason, tops, prompt, error))
        return outputs

    def _track(self, req: Req) -> None:
        if self.tokenizer is not None:
            self._detok[req.rid] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_ids, stop=req.sampling.stop
            )

    # ---- offline API ----

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Runs ``prompts`` (text, or token ids) to completion together; results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.add_request(self._encode(p), sp) for p, sp in zip(prompts, params)]
        texts: dict[int, list[str]] = {r.rid: [] for r in reqs}
        while self.has_work():
            for out in self.step():
                texts[out.req.rid].append(out.text)
        completions = []
        for r in reqs:
            assert r.finish_reason is not None  # no work left: every request finished
            text = "".join(texts[r.rid]) if self.tokenizer is not None else None
            completions.append(
                Completion(r.rid, r.prompt_ids, r.output_ids, r.output_logprobs, r.finish_reason, text)
            )
        return completions

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or give the engine one")
            return self.tokenizer.encode(prompt)
        return list(prompt)
