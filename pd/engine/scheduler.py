"""Continuous-batching scheduler with chunked prefill. Works on ``Req`` objects and page ids only.

Each step is either an extend batch (prefill chunks under a token budget) or a decode batch (every
running request, one token each). Pages are reserved for a request's whole prompt on admission,
and one page at a time as decoding crosses page boundaries; when none is free the newest running
request is preempted (its pages freed; it is recomputed later). A request of ``n`` choices counts as n
against ``max_running`` until it forks (``Req.width``); a page its choices share is copied before one of
them writes into it (``Batch.copies``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pd.config import SchedulerConfig
from pd.engine.prefix_cache import PrefixCache
from pd.kv_cache import PageAllocator
from pd.types import Batch, BatchMode, FinishReason, Req, ReqState, StepResult


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should refuse the request."""


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        allocator: PageAllocator,
        eos_token_ids: frozenset[int],
        cache: PrefixCache | None = None,
        lookahead: int = 0,
    ) -> None:
        self.cfg = cfg
        # Tokens past a request's length a decode step writes KV for (speculative drafts and their MTP
        # chain, pd.engine.speculative.lookahead); their pages are reserved with the step's own.
        self.lookahead = lookahead
        self.allocator = allocator
        self.cache = cache  # None: every prompt is computed in full
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []  # admitted, prompt not fully computed yet
        self.running: list[Req] = []  # decoding
        self.on_end: Callable[[Req], None] | None = None  # called once a request ends or leaves (release)
        # Called on each admission with a cache: (tokens looked up, tokens found cached).
        self.on_prefix_match: Callable[[int, int], None] | None = None
        # With a cache: a request that ends offers the full pages of its computed tokens (prompt and output)
        # to it before they are freed (a decode rank, whose requests' KV the next turn of a conversation
        # reuses; set by ``DecodeEngine``).
        self.cache_finished = False
        # The requests of the decode step in flight on the device (an overlapped engine's) and that step's tag:
        # pages such a request frees (it ended or was preempted) are held until the engine releases the tag.
        self.in_flight: frozenset[Req] = frozenset()
        self.flight_tag = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def add(self, req: Req) -> None:
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.cfg.max_waiting} requests)")
        need = self._pages_for(min(req.max_total_len() + self.lookahead, req.max_context_len))
        if need > self.allocator.capacity:
            raise ValueError(
                f"request needs {need} KV pages at its longest but the pool has {self.allocator.capacity}"
            )
        self.waiting.append(req)

    def schedule(self) -> Batch | None:
        return self._schedule_extend() or self._schedule_decode()

    def _schedule_extend(self) -> Batch | None:
        budget = self.cfg.chunk_size
        reqs, starts, ends = [], [], []
        # Requests already prefilling go first, then new ones, FIFO, while pages and budget last.
        for req in list(self.prefilling):
            if budget == 0:
                break
            n = min(budget, req.seq_len - req.num_computed)
            reqs.append(req)
            starts.append(req.num_computed)
            ends.append(req.num_computed + n)
            budget -= n
        while budget > 0 and self.waiting:
            req = self.waiting[0]
            if self.num_sequences + req.width > self.cfg.max_running:
                break
            taken = self.take_pages(req, self._pages_for(req.seq_len))
            if taken is None:
                break  # the head waits for pages; later requests do not overtake it
            self.waiting.popleft()
            req.pages, hit = taken
            req.state, req.num_computed = ReqState.RUNNING, hit * self.cfg.page_size
            self.prefilling.append(req)
            n = min(budget, req.seq_len - req.num_computed)
            reqs.append(req)
            starts.append(req.num_computed)
            ends.append(req.num_computed + n)
            budget -= n
        return Batch(BatchMode.EXTEND, reqs, starts, ends) if reqs else None

    @property
    def num_sequences(self) -> int:
        """Sequences decoding, or to decode once the requests prefilling now fork."""
        return sum(r.width for r in self.prefilling) + len(self.running)

    def _schedule_decode(self) -> Batch | None:
        copies: list[tuple[int, int]] = []
        for req in list(self.running):
            if req in self.running:  # not preempted while making room for an earlier one
                self._reserve_pages(req, copies)
        if not self.running:
            return None
        reqs = list(self.running)
        return Batch(
            BatchMode.DECODE, reqs, [r.seq_len - 1 for r in reqs], [r.seq_len for r in reqs], copies=copies
        )

    def postprocess(self, batch: Batch, result: StepResult) -> list[Req]:
        """Records the step's results; returns requests that finished on a token-level condition.

        ``result.tokens[i]`` is None for a request that did not sample this step (a non-final chunk).
        """
        finished = []
        for i, (req, end, token, logprob) in enumerate(
            zip(batch.reqs, batch.ends, result.tokens, result.logprobs)
        ):
            if req.finished:
                continue  # aborted while the step ran
            req.num_computed = end
            if not req.output_ids:  # a preempted request recomputes its prompt: score it once
                req.prompt_logprobs += result.prompt[i]
            if token is None:
                continue
            assert logprob is not None  # sampled together with the token
            if req in self.prefilling:
                self.prefilling.remove(req)
                self.running.append(req)
                self.cache_prompt(req)
            req.output_ids.append(token)
            req.output_logprobs.append(logprob)
            if req.sampling.top_logprobs:
                req.output_top_logprobs.append(result.top[i])
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    def finish(self, req: Req, reason: FinishReason) -> None:
        """Ends a request wherever it is and frees its pages exactly once."""
        if req.finished:
            return
        for queue in (self.prefilling, self.running):
            if req in queue:
                queue.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req.pages:
            if self.cache_finished and self.cache is not None and req.state is ReqState.RUNNING:
                # Positions before num_computed hold computed KV (a step that ran; the last sampled token
                # has none yet): correct whatever ended the request.
                self.cache.insert(req.ids(0, req.num_computed), req.pages)
            self._drop_pages(req)
        req.state, req.finish_reason = ReqState.FINISHED, reason
        if self.on_end is not None:
            self.on_end(req)

    def cache_prompt(self, req: Req) -> None:
        """Offers the full pages of a request's computed prompt to the prefix cache (if there is one)."""
        if self.cache is not None:
            assert req.num_computed >= len(req.prompt_ids), "only a computed prompt is cached"
            self.cache.insert(req.prompt_ids, req.pages)

    def admit_prefilled(self, req: Req) -> None:
        """Admits a request whose prompt KV is already in ``req.pages`` (computed by a prefill rank): it
        joins the running batch as if its prompt had just been computed here."""
        if req.finished or req.state is ReqState.RUNNING:
            raise ValueError(f"request {req.rid} is {req.state.value}; only a new request can be admitted")
        req.num_computed, req.state = len(req.prompt_ids), ReqState.RUNNING
        self.running.append(req)

    def release(self, req: Req) -> list[int]:
        """Takes a request out of every queue WITHOUT freeing its pages and returns them: the caller
        (a prefill engine, whose KV transfer still reads them) frees them later."""
        for queue in (self.prefilling, self.running):
            if req in queue:
                queue.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        pages, req.pages = req.pages, []
        if self.on_end is not None:
            self.on_end(req)
        return pages

    def _stop_reason(self, req: Req, token: int) -> FinishReason | None:
        sp = req.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if len(req.output_ids) >= sp.max_tokens or req.seq_len >= req.max_context_len:
            return FinishReason.LENGTH
        return None

    def _reserve_pages(self, req: Req, copies: list[tuple[int, int]]) -> None:
        """Makes room for the token this step writes, preempting the newest requests if needed (idle cached
        pages are evicted first, ``alloc``).

        Copy on write: if the page it writes into is shared (the prompt's partial last page, held by every
        choice of a forked request), it gets a page of its own, and ``(shared, own)`` is added to ``copies``
        (the KV the runner copies before the step). The last holder writes in place: n choices copy at most
        n - 1 pages. (Pages shared with the prefix cache are full: no request writes into them.)"""
        while True:
            write = (req.seq_len - 1) // self.cfg.page_size  # the page of the position written this step
            shared = write < len(req.pages) and self.allocator.refcount(req.pages[write]) > 1
            tokens = max(req.seq_len, min(req.seq_len + self.lookahead, req.max_context_len))
            need = self._pages_for(tokens) - len(req.pages) + shared
            if need <= 0:
                return
            pages = self.alloc(need)
            if pages is not None:
                if shared:
                    own = pages.pop()
                    copies.append((req.pages[write], own))
                    self.allocator.free([req.pages[write]])
                    req.pages[write] = own
                req.pages += pages
                return
            victim = self.running[-1]
            self._preempt(victim)  # may have held the shared page: look again
            if victim is req:
                return

    def _preempt(self, req: Req) -> None:
        self.running.remove(req)
        self._drop_pages(req)
        req.num_computed, req.state = 0, ReqState.WAITING
        self.waiting.appendleft(req)

    def _drop_pages(self, req: Req) -> None:
        """Frees a request's page references, held for the step in flight if it is in that step."""
        self.allocator.free(req.pages, self.flight_tag if req in self.in_flight else None)
        req.pages = []

    def take_pages(
        self, req: Req, num_pages: int, room_for: Callable[[int], bool] | None = None
    ) -> tuple[list[int], int] | None:
        """``num_pages`` pages for ``req``'s tokens from its first: its prefix's cached pages (one reference
        each), then fresh ones (idle cached pages evicted if too few are free). Returns the pages and how many
        were cached, and counts the lookup (``on_prefix_match``); None, holding nothing, when too few are
        free or ``room_for(cached pages)`` (the caller's own limit) says no."""
        hit = self._match(req)
        fresh = self.alloc(num_pages - len(hit)) if room_for is None or room_for(len(hit)) else None
        if fresh is None:
            self.allocator.free(hit)  # back to the cache alone
            return None
        if self.cache is not None and self.on_prefix_match is not None:
            self.on_prefix_match(req.seq_len, len(hit) * self.cfg.page_size)
        return hit + fresh, len(hit)

    def _match(self, req: Req) -> list[int]:
        """Cached pages of the request's leading tokens, one reference each taken for it (none without a
        cache, or when the request scores its prompt: every prompt position must be computed for that)."""
        if self.cache is None or req.sampling.prompt_logprobs is not None:
            return []
        return self.cache.match(req.all_ids)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` fresh pages, evicting pages only the cache holds if too few are free; None if still short."""
        pages = self.allocator.alloc(n)
        if pages is None and self.cache is not None:
            self.cache.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.page_size)
