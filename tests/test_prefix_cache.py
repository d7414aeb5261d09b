"""The prefix cache alone and under the scheduler, with a fake model. Oracles: the page allocator's
reference counts (it raises on a double free), recomputed here from who holds each page."""

from __future__ import annotations

import random
from collections import Counter

from pd.config import SchedulerConfig
from pd.engine.prefix_cache import PrefixCache
from pd.engine.scheduler import Scheduler
from pd.kv_cache import PageAllocator
from pd.types import FinishReason, Req, SamplingParams, StepResult

PS = 4  # tokens per page
EOS = 0


def computed(alloc: PageAllocator, tokens: list[int]) -> list[int]:
    """Pages of a request that computed ``tokens`` (its own references)."""
    pages = alloc.alloc(-(-len(tokens) // PS))
    assert pages is not None
    return pages


def test_match_returns_full_cached_pages_before_the_last_token():
    alloc = PageAllocator(32)
    cache = PrefixCache(alloc, PS)
    prompt = list(range(10, 23))  # 13 tokens: 3 full pages and one token
    pages = computed(alloc, prompt)
    assert cache.insert(prompt, pages) == 3
    assert [alloc.refcount(p) for p in pages] == [2, 2, 2, 1]
    alloc.free(pages)  # the request ends: the cache alone holds its full pages
    assert cache.num_pages == 3 and cache.num_idle_pages() == 3 and alloc.num_used == 3

    assert cache.match(prompt) == pages[:3], "an exact repeat: every full page"
    assert cache.match(prompt[:12]) == pages[:2], "a page-aligned repeat: never the last token's page"
    assert cache.match(prompt[:9]) == pages[:2], "a prefix ending mid-page: the full pages before it"
    assert cache.match([*prompt[:8], 1, 2, 3, 4, 5]) == pages[:2], "a shared prefix, then others"
    assert cache.match([99, *prompt[1:]]) == [], "the first token differs: nothing"
    assert cache.match(prompt[:4]) == [] and cache.match(prompt[:1]) == []
    # Each match took a reference per page for its caller.
    assert [alloc.refcount(p) for p in pages[:3]] == [1 + 4, 1 + 4, 1 + 1]
    assert cache.num_idle_pages() == 0
    alloc.free(pages[:3] + pages[:2] * 3)
    assert cache.num_idle_pages() == 3


def test_insert_keeps_the_cached_copy_of_a_prefix_and_adds_the_rest():
    alloc = PageAllocator(32)
    cache = PrefixCache(alloc, PS)
    a = list(range(1, 9))  # 2 pages
    pa = computed(alloc, a)
    cache.insert(a, pa)
    b = a + list(range(50, 56))  # the same 2 pages, then 1 full page of its own
    pb = computed(alloc, b)  # computed in full alongside a: its own copies of a's pages
    assert cache.insert(b, pb) == 1
    assert [alloc.refcount(p) for p in pb] == [1, 1, 2, 1], "only the new full page is cached"
    alloc.free(pa)
    alloc.free(pb)
    assert alloc.num_used == cache.num_pages == 3
    assert cache.match([*b, 7]) == pa + pb[2:3]
    alloc.free(pa + pb[2:3])


def test_evict_frees_idle_pages_least_recent_first_and_deepest_first():
    alloc = PageAllocator(64)
    cache = PrefixCache(alloc, PS)
    shared = list(range(1, 9))  # 2 pages every prompt below starts with
    old = [*shared, *range(20, 28)]  # 4 pages
    new = [*shared, 30, 31, 32, 33]  # 3 pages
    p_old, p_new = computed(alloc, old), computed(alloc, new)
    cache.insert(old, p_old)
    alloc.free(p_old)
    cache.insert(new, p_new)  # a later walk: the shared pages (old's copies) are recent now
    alloc.free(p_new)
    assert cache.num_pages == 5
    # old's own pages go first, its last page before its third (a walk's pages tie: deepest first).
    assert cache.evict(1) == 1 and alloc.refcount(p_old[3]) == 0 and alloc.refcount(p_old[2]) == 1
    assert cache.evict(1) == 1 and alloc.refcount(p_old[2]) == 0
    # A request now holds new's cached pages: the only leaf is its third page, which it holds.
    held = cache.match([*new, 1])
    assert held == p_old[:2] + p_new[2:3]
    assert cache.evict(10) == 0, "pages a request holds are never evicted, nor their prefixes"
    alloc.free(held)
    assert cache.evict(10) == 3 and alloc.num_used == 0 and cache.num_pages == 0


def test_evict_never_takes_a_prefix_whose_longer_page_is_held():
    alloc = PageAllocator(32)
    cache = PrefixCache(alloc, PS)
    a = list(range(1, 9))
    pa = computed(alloc, a)
    cache.insert(a, pa)
    alloc.free(pa)
    b = [*a, 40, 41, 42, 43, 44]
    pb = computed(alloc, b)  # b computed its own first two pages, so holds none of a's
    cache.insert(b, pb)  # its third page is cached under a's pages
    assert alloc.refcount(pa[0]) == 1 and alloc.refcount(pb[2]) == 2
    assert cache.evict(5) == 0, "a's pages are idle but not leaves: the page b holds hangs from them"
    alloc.free(pb)
    assert cache.evict(5) == 3 and alloc.num_used == 0


def req(rid: int, prompt: list[int], max_tokens: int = 3, **kw) -> Req:
    return Req(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw), 0, 10_000)


def make(num_pages: int, chunk: int = 64) -> tuple[Scheduler, PageAllocator, PrefixCache]:
    alloc = PageAllocator(num_pages)
    cache = PrefixCache(alloc, PS)
    return Scheduler(SchedulerConfig(PS, chunk, 8), alloc, frozenset({EOS}), cache), alloc, cache


def step(sched: Scheduler) -> bool:
    batch = sched.schedule()
    if batch is None:
        return False
    tokens = [7 if s else None for s in batch.samples]
    sched.postprocess(batch, StepResult.of(tokens, [0.0 if t is not None else None for t in tokens]))
    return True


def test_scheduler_admits_after_the_cached_prefix_and_evicts_only_idle_pages():
    """A prefix a running request holds survives another request's eviction; that request waits instead."""
    sched, alloc, cache = make(num_pages=13)  # 12 usable pages
    a, x = list(range(1, 18)), list(range(100, 113))  # 17 tokens (4 full pages), 13 tokens (3)
    for i, p in enumerate((a, x)):
        sched.add(req(i, p, max_tokens=1))
        while step(sched):
            pass
    assert cache.num_pages == 7 and alloc.num_used == 7 and cache.num_idle_pages() == 7
    queries: list[tuple[int, int]] = []
    sched.on_prefix_match = lambda q, h: queries.append((q, h))
    b = req(2, a[:16] + list(range(200, 220)), max_tokens=4)  # 36 tokens: 4 pages cached, 5 to allocate
    sched.add(b)
    sched.add(c := req(3, list(range(300, 311)), max_tokens=1))  # 11 tokens: 3 pages, only by eviction
    sched.add(d := req(4, list(range(400, 404)), max_tokens=1))  # 1 page: there is none left
    batch = sched.schedule()
    assert batch is not None and batch.reqs == [b, c]
    assert (batch.starts, batch.ends) == ([16, 0], [36, 11]), "b computes after its 16 cached tokens"
    assert queries == [(36, 16), (11, 0)]
    assert all(alloc.refcount(p) == 2 for p in b.pages[:4]), "b's cached prefix: the cache's and b's"
    assert cache.num_pages == 4 and alloc.num_free == 0, "x's idle pages were evicted for c"
    assert list(sched.waiting) == [d], "d waits: no idle page is left, and b's are never evicted"
    sched.postprocess(batch, StepResult.of([7, 7], [0.0, 0.0]))
    while step(sched):
        pass
    assert all(r.finish_reason is FinishReason.LENGTH for r in (b, c, d))
    assert alloc.num_used == cache.num_pages == cache.num_idle_pages()


def test_random_workload_keeps_every_reference_accounted():
    """Shared prefixes, aborts, preemption and eviction at random: each page's count is always the number
    of requests holding it plus one if cached, and what is left at the end is the cache's alone."""
    rng = random.Random(1)
    sched, alloc, cache = make(num_pages=30, chunk=16)
    stems = [[rng.randrange(3, 50) for _ in range(rng.randint(1, 14))] for _ in range(4)]
    reqs = []
    for i in range(60):
        tail = [rng.randrange(3, 50) for _ in range(rng.randint(1, 10))]
        reqs.append(req(i, rng.choice(stems) + tail, max_tokens=rng.randint(1, 12)))
    pending = list(reqs)
    hits = []
    sched.on_prefix_match = lambda q, h: hits.append(h)
    for _ in range(10_000):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop(0))
        if not step(sched) and not pending:
            break
        if rng.random() < 0.05:
            sched.finish(rng.choice(reqs), FinishReason.ABORT)
        holders = Counter(p for r in reqs for p in r.pages)
        for page in range(1, alloc.num_pages):
            assert alloc.refcount(page) == holders[page] + (page in cache), page
    assert all(r.finished for r in reqs)
    assert sum(hits) > 0, "the shared stems were found in the cache"
    assert alloc.num_used == cache.num_pages == cache.num_idle_pages()
    cache.evict(cache.num_pages)
    assert alloc.num_used == 0
