"""Page-granular prefix cache: a radix tree over full KV pages computed on this rank (prompts on prefill and
colocated ranks; a finished request's prompt and output on decode ranks).

Each node of the tree is one full page: its edge from the parent is the ``page_size`` token ids the page
holds, and its page id holds their KV given every token on the path from the root (the page's whole prefix).
Children are keyed by the page's token ids as a tuple, so a lookup compares token ids exactly: two prefixes
that differ share no node, whatever their hashes (no digest, nothing to collide).

References: the cache holds one reference (``PageAllocator``) to each page in the tree. ``match`` takes one
more for its caller, who frees it like any page of its own; so a page whose count is 1 is held by the cache
alone (idle). ``evict`` frees idle pages only, leaves first: a cached page's prefix is always cached too.

Eviction order: least recently used first, by the tick of the last ``match`` or ``insert`` that walked the
node. One walk gives a whole path the same tick, so ties are broken deepest first: a prefix is trimmed from
its end, and the pages every longer prompt shares go last.

Writes: a cached page is never written again. ``match`` returns full pages that end before the prompt's last
token (that token is computed: its logits sample the first output), so the caller computes from a page
boundary into pages of its own (a decode rank has the prefill rank write them); ``insert`` is called once a
request's pages hold the final KV of the tokens it is given.

Threads: every method runs on the engine thread, except ``num_idle_pages`` (a metrics scrape reads it).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from pd.kv_cache import PageAllocator


class _Node:
    """One cached page. The root is a node without a page (``page`` -1, depth 0)."""

    __slots__ = ("children", "depth", "key", "page", "parent", "tick")

    def __init__(self, page: int, key: tuple[int, ...], parent: _Node | None, tick: int) -> None:
        self.page = page
        self.key = key  # the page's token ids: its edge from ``parent``
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.tick = tick  # when a match or insert last walked it


class PrefixCache:
    """Full KV pages of earlier prompts, by their token prefix (see the module docstring)."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self._root = _Node(-1, (), None, 0)
        self._nodes: dict[int, _Node] = {}  # page id -> its node
        self._leaves: set[_Node] = set()  # nodes without children (eviction candidates)
        self._tick = 0

    @property
    def num_pages(self) -> int:
        """Pages in the tree (whether or not a request holds them too)."""
        return len(self._nodes)

    def __contains__(self, page: int) -> bool:
        """Whether ``page`` is in the tree."""
        return page in self._nodes

    def num_idle_pages(self) -> int:
        """Pages only the cache holds (``pd_kv_pages_cached``): exact between steps; a scrape during a step
        may be off by the pages that step takes or frees."""
        pages = list(self._nodes)  # one C-level copy: safe against the engine thread's changes
        return sum(1 for p in pages if self.allocator.refcount(p) == 1)

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The pages of the longest cached prefix of ``token_ids``, in order, full pages only and never the
        last token's page (at most ``(len - 1) // page_size`` pages). Each comes with one reference taken
        for the caller, who frees it with its other pages."""
        ps, node = self.page_size, self._root
        tick = self._next_tick()
        pages: list[int] = []
        for i in range((len(token_ids) - 1) // ps):
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            child.tick = tick
            pages.append(child.page)
            node = child
        self.allocator.incref(pages)
        return pages

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> int:
        """Caches the full pages of ``token_ids``: ``pages[i]`` holds the KV of tokens ``[i * page_size,
        (i + 1) * page_size)``, computed. A prefix already cached keeps its page (the caller's copy stays the
        caller's); each page added gets the cache's reference. Returns the number of pages added."""
        ps, node = self.page_size, self._root
        full = len(token_ids) // ps
        if len(pages) < full:
            raise ValueError(f"{len(token_ids)} tokens fill {full} pages, got {len(pages)}")
        tick = self._next_tick()
        added = 0
        for i in range(full):
            key = tuple(token_ids[i * ps : (i + 1) * ps])
            child = node.children.get(key)
            if child is None:
                page = pages[i]
                if page in self._nodes:
                    raise ValueError(f"page {page} is cached already under another prefix")
                self.allocator.incref([page])
                child = _Node(page, key, node, tick)
                node.children[key] = child
                self._nodes[page] = child
                self._leaves.discard(node)
                self._leaves.add(child)
                added += 1
            child.tick = tick
            node = child
        return added

    def evict(self, num_pages: int) -> int:
        """Frees up to ``num_pages`` idle pages, least recently used first (deepest first on ties); returns
        how many it freed (fewer when requests hold the rest)."""
        heap = [(leaf.tick, -leaf.depth, leaf.page, leaf) for leaf in self._leaves if self._idle(leaf)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            *_, leaf = heapq.heappop(heap)
            parent = self._remove(leaf)
            freed += 1
            if parent is not self._root and not parent.children and self._idle(parent):
                heapq.heappush(heap, (parent.tick, -parent.depth, parent.page, parent))
        return freed

    def _remove(self, leaf: _Node) -> _Node:
        """Takes a leaf out of the tree and frees the cache's reference; returns its parent."""
        parent = leaf.parent
        assert parent is not None and not leaf.children
        del parent.children[leaf.key]
        del self._nodes[leaf.page]
        self._leaves.discard(leaf)
        if not parent.children and parent is not self._root:
            self._leaves.add(parent)
        self.allocator.free([leaf.page])
        return parent

    def _idle(self, node: _Node) -> bool:
        return self.allocator.refcount(node.page) == 1

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick
