"""Cache-aware choice of the rank that computes a prompt: requests sharing a prefix go where it was computed.

The proxy cannot see the ranks' prefix caches. Like SGLang's cache-aware router it keeps its own record
instead: per rank, the chained digests of the ``BLOCK_TOKENS``-token blocks of the prompts it routed there
(a block's digest covers every token before it, so one digest names a whole prefix), most recently used
last, at most ``max_blocks`` per rank (older ones are forgotten, as the rank's cache evicts its oldest
pages). The record is an estimate: a rank that restarted or evicted early is found out by its cache
metrics, not here.

Policy (``RoutingConfig.policy``):

- ``least_load``: the rank with the fewest outstanding requests (ties: the fewest so far).
- ``cache_aware`` (default): when the load is balanced, the rank whose record holds the longest prefix of
  the prompt, if that prefix covers at least ``cache_threshold`` of it; otherwise, or when the load is not
  balanced, the least loaded. Balanced means the busiest candidate has at most ``balance_abs`` more
  outstanding requests than the idlest, or at most ``balance_rel`` times as many. A prefill rank runs its
  queue in order, so a hit on a rank with a longer queue is worth less than the queue costs beyond a few
  requests: the defaults (4 and 1.5) favour load, as Dynamo's KV router weighs overlap against load.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

BLOCK_TOKENS = 16  # tokens per recorded block (a prefix shorter than one block is not recorded)
POLICIES = ("cache_aware", "least_load")


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "cache_aware"
    cache_threshold: float = 0.3  # least share of the prompt a recorded prefix must cover to route by it
    balance_abs: int = 4  # outstanding requests the busiest rank may have beyond the idlest: balanced
    balance_rel: float = 1.5  # or at most this many times the idlest's
    max_blocks: int = 1 << 16  # blocks recorded per rank (1M tokens)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"RoutingConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"RoutingConfig.cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs < 0 or self.balance_rel < 1.0 or self.max_blocks < 1:
            raise ValueError(
                "RoutingConfig: balance_abs >= 0, balance_rel >= 1 and max_blocks >= 1 are required, got "
                f"{self.balance_abs}, {self.balance_rel}, {self.max_blocks}"
            )


def block_digests(token_ids: Sequence[int]) -> list[bytes]:
    """The chained digest of each full block of ``token_ids``: digest i covers tokens ``[0, (i+1) * BLOCK_TOKENS)``."""
    out: list[bytes] = []
    parent = b""
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = array("q", token_ids[start : start + BLOCK_TOKENS]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        out.append(parent)
    return out


class PrefixRecord:
    """Which prompt prefixes were routed to which rank (keys: any hashable rank key). Not thread-safe: the
    proxy's event loop is its only user."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: dict[Hashable, OrderedDict[bytes, None]] = {}

    def matched(self, rank: Hashable, digests: Sequence[bytes]) -> int:
        """How many leading blocks of ``digests`` the record of ``rank`` holds."""
        held = self._blocks.get(rank)
        if not held:
            return 0
        n = 0
        for d in digests:
            if d not in held:
                break
            n += 1
        return n

    def add(self, rank: Hashable, digests: Sequence[bytes]) -> None:
        """Records that ``rank`` computed these blocks (now its most recent); forgets its oldest beyond the bound."""
        held = self._blocks.setdefault(rank, OrderedDict())
        for d in digests:
            held[d] = None
            held.move_to_end(d)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def retain(self, ranks: set) -> None:
        """Forgets the ranks not in ``ranks`` (gone, or restarted: a new incarnation is a new key)."""
        for key in [k for k in self._blocks if k not in ranks]:
            del self._blocks[key]


K = TypeVar("K", bound=Hashable)


def choose(
    config: RoutingConfig,
    candidates: Sequence[K],
    load: Mapping[K, tuple[int, int]],
    record: PrefixRecord,
    digests: Sequence[bytes],
    prompt_len: int,
) -> tuple[K, str]:
    """The candidate for a prompt with these block ``digests``, and why: ``"cache"``, ``"load"`` (no
    recorded prefix long enough) or ``"imbalance"``. ``load[key]``: (outstanding, routed so far)."""
    least = min(candidates, key=lambda k: (*load.get(k, (0, 0)), str(k)))
    if config.policy == "least_load" or not digests or len(candidates) == 1:
        return least, "load"
    busy = [load.get(k, (0, 0))[0] for k in candidates]
    lo, hi = min(busy), max(busy)
    if hi - lo > config.balance_abs and hi > config.balance_rel * lo:
        return least, "imbalance"
    best = max(candidates, key=lambda k: (record.matched(k, digests), -load.get(k, (0, 0))[0]))
    covered = record.matched(best, digests) * BLOCK_TOKENS
    if covered and covered >= config.cache_threshold * prompt_len:
        return best, "cache"
    return least, "load"
