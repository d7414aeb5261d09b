"""The colocated reference engine: one process, one rank, prefill and decode on the same device.

``step()`` reads as schedule -> run -> postprocess. It is the baseline the disaggregated workers
are measured against, and the workers reuse its scheduler, runner and output processing.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pd.config import EngineConfig, ModelConfig
from pd.engine.runner import ModelRunner
from pd.engine.scheduler import Scheduler
from pd.kv_cache import PageAllocator
from pd.types import Batch, FinishReason, Req, SamplingParams


@dataclass
class Completion:
    rid: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str | None = None


@dataclass
class _OutputText:
    """Incremental text of one request; None when the engine has no tokenizer."""

    detok: object | None
    text: list[str] = field(default_factory=list)


class Engine:
    def __init__(self, cfg: EngineConfig, tokenizer=None) -> None:
        self.cfg = cfg
        self.model_cfg = ModelConfig.from_dir(cfg.model_path)
        self.tokenizer = tokenizer
        self.runner = ModelRunner(cfg, self.model_cfg)
        eos = frozenset(tokenizer.eos_token_ids if tokenizer is not None else self.model_cfg.eos_token_ids)
        self.allocator = PageAllocator(self.runner.pool.layout.num_pages)
        self.scheduler = Scheduler(cfg.scheduler, self.allocator, eos)
        self.context_len = cfg.context_len(self.model_cfg)
        self._rids = itertools.count()
        self._seed_rng = random.Random(cfg.seed)
        self._texts: dict[int, _OutputText] = {}

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> Req:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.context_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.context_len}")
        vocab = self.model_cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:4]} outside the vocabulary [0, {vocab})")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req = Req(next(self._rids), list(prompt_ids), params, seed, self.context_len)
        self.scheduler.add(req)
        self._texts[req.rid] = _OutputText(self._new_detokenizer(req))
        return req

    def step(self) -> list[Req]:
        """One forward step; returns the requests that finished in it."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        tokens, logprobs = self.runner.run(batch)
        return self._postprocess(batch, tokens, logprobs)

    def _postprocess(self, batch: Batch, tokens: list[int | None], logprobs: list[float | None]) -> list[Req]:
        finished = self.scheduler.postprocess(batch, tokens, logprobs)
        for req, token in zip(batch.reqs, tokens):
            out = self._texts.get(req.rid)
            if token is None or out is None or out.detok is None:
                continue
            out.text.append(out.detok.add(token))
            if out.detok.stopped and not req.finished:
                self.scheduler.finish(req, FinishReason.STOP)
                finished.append(req)
        return finished

    def abort(self, req: Req) -> None:
        self.scheduler.finish(req, FinishReason.ABORT)

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Runs ``prompts`` (text, or token ids) to completion together; results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.add_request(self._encode(p), sp) for p, sp in zip(prompts, params)]
        while self.has_work():
            self.step()
        return [self.completion(r) for r in reqs]

    def completion(self, req: Req) -> Completion:
        out = self._texts.pop(req.rid, None)
        text = None
        if out is not None and out.detok is not None:
            text = "".join(out.text) + out.detok.flush()
        return Completion(
            req.rid, req.prompt_ids, req.output_ids, req.output_logprobs, req.finish_reason, text
        )

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or give the engine one")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _new_detokenizer(self, req: Req):
        if self.tokenizer is None:
            return None
        from pd.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, req.prompt_ids, stop=req.sampling.stop)
