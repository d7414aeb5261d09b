"""Every metric a worker rank exports, and the names the proxy relays from each rank.

A rank's metrics carry ``role`` (and the per-rank gauges ``instance`` and ``rank``) labels. The proxy's
``/metrics`` fetches ``RELAYED`` from every registered rank at scrape time, so page and room leaks can be
checked from one scrape.
"""

from __future__ import annotations

from pd.metrics import Registry

RANK_LABELS = ("role", "instance", "rank")

KV_PAGES_USED = "pd_kv_pages_used"
KV_PAGES_CAPACITY = "pd_kv_pages_capacity"
KV_PAGES_CACHED = "pd_kv_pages_cached"
ROOMS_OPEN = "pd_rooms_open"
TRANSFER_ROOMS_OPEN = "pd_transfer_rooms_open"
EXPERT_TOKENS = "pd_expert_tokens"

DECODE_BATCH = "pd_decode_batch_size"
DECODE_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)

KV_CHECKSUM_FAILURES = "pd_kv_checksum_failures_total"
PREFIX_QUERY_TOKENS = "pd_prefix_cache_query_tokens_total"
PREFIX_HIT_TOKENS = "pd_prefix_cache_hit_tokens_total"
SPEC_DRAFTS = "pd_spec_draft_tokens_total"
SPEC_ACCEPTED = "pd_spec_accepted_tokens_total"
SPEC_STEP_TOKENS = "pd_spec_tokens_per_step"
SPEC_STEP_BUCKETS = (1, 2, 3, 4)  # tokens a request emits per verify step: 1 .. MAX_SPECULATIVE_TOKENS + 1

# Relayed by the proxy from every registered rank: gauges (with RANK_LABELS), and histograms and counters
# (labelled with the rank's instance and rank by the proxy).
RELAYED = (KV_PAGES_USED, KV_PAGES_CAPACITY, KV_PAGES_CACHED, ROOMS_OPEN, TRANSFER_ROOMS_OPEN, EXPERT_TOKENS)
RELAYED_HISTOGRAMS = (DECODE_BATCH, SPEC_STEP_TOKENS)
RELAYED_COUNTERS = (KV_CHECKSUM_FAILURES, PREFIX_QUERY_TOKENS, PREFIX_HIT_TOKENS, SPEC_DRAFTS, SPEC_ACCEPTED)


class WorkerMetrics:
    """One rank's metrics, in its own ``Registry`` (rendered by the ``Metrics`` RPC)."""

    def __init__(self, role: str) -> None:
        self.role = role
        m = self.registry = Registry()
        self.pages_used = m.gauge(KV_PAGES_USED, "KV cache pages in use.", RANK_LABELS)
        self.pages_capacity = m.gauge(
            KV_PAGES_CAPACITY, "KV cache pages that can hold requests.", RANK_LABELS
        )
        self.pages_cached = m.gauge(
            KV_PAGES_CACHED,
            "KV cache pages the prefix cache holds that no request holds (counted in pd_kv_pages_used).",
            RANK_LABELS,
        )
        self.rooms = m.gauge(ROOMS_OPEN, "Rooms (requests) this rank holds, in any stage.", RANK_LABELS)
        self.transfer_rooms = m.gauge(
            TRANSFER_ROOMS_OPEN, "Rooms the KV transfer manager tracks (not yet released).", RANK_LABELS
        )
        self.expert_tokens = m.gauge(
            EXPERT_TOKENS,
            "Cumulative (token, expert) pairs each expert received on this rank, summed over MoE layers.",
            (*RANK_LABELS, "expert"),
        )
        self.requests = m.counter("pd_requests_total", "Requests by outcome.", ["role", "outcome"])
        self.aborts = m.counter("pd_aborts_total", "Requests aborted.", ["role"])
        self.queue = m.gauge("pd_queue_length", "Requests per queue.", ["role", "queue"])
        self.transfer_failures = m.counter(
            "pd_transfer_failures_total", "KV transfers that failed.", ["role"]
        )
        self.transfer_bytes = m.counter(
            "pd_transfer_bytes_total", "KV bytes handed to the transfer.", ["role"]
        )
        self.decode_batch = m.histogram(
            DECODE_BATCH,
            "Requests decoded in each step (the achieved batch).",
            ["role"],
            DECODE_BATCH_BUCKETS,
        )
        self.kv_checksum_failures = m.counter(
            KV_CHECKSUM_FAILURES,
            "Rooms whose received KV pages did not match the sender's checksums (--kv-checksum).",
            ["role"],
        )
        self.prefix_query_tokens = m.counter(
            PREFIX_QUERY_TOKENS,
            "Tokens of admitted requests looked up in the prefix cache.",
            ["role"],
        )
        self.prefix_hit_tokens = m.counter(
            PREFIX_HIT_TOKENS,
            "Tokens found in the prefix cache (not computed again).",
            ["role"],
        )
        self.transfer_seconds = m.histogram(
            "pd_transfer_seconds", "Time from a room's arrival to its KV transfer's end.", ["role"]
        )

        self.spec_drafts = m.counter(
            SPEC_DRAFTS,
            "Draft tokens verified (speculative decoding), by draft position (0-based).",
            ["role", "position"],
        )
        self.spec_accepted = m.counter(
            SPEC_ACCEPTED,
            "Draft tokens accepted (speculative decoding), by draft position (0-based).",
            ["role", "position"],
        )
        self.spec_step_tokens = m.histogram(
            SPEC_STEP_TOKENS,
            "Tokens a request emitted per speculative verify step (accepted drafts + 1).",
            ["role"],
            SPEC_STEP_BUCKETS,
        )

    def speculated(self, drafts: list[int], counts: list[int]) -> None:
        """One verify step (``MTPSpeculator.on_verify``): per request, the drafts it verified and the tokens
        it emitted (``accepted + 1``)."""
        for d, c in zip(drafts, counts):
            self.spec_step_tokens.observe(c, role=self.role)
            for j in range(d):
                self.spec_drafts.inc(role=self.role, position=str(j))
                if j < c - 1:
                    self.spec_accepted.inc(role=self.role, position=str(j))

    def ended(self, outcome: str) -> None:
        """A room ended here: ``outcome`` is a finish reason, a transfer state, "abort", "refused" or
        "failed" (a request that failed while running)."""
        self.requests.inc(role=self.role, outcome=outcome)

    def prefix_matched(self, query_tokens: int, hit_tokens: int) -> None:
        """The scheduler's ``on_prefix_match``: a request was admitted with ``hit_tokens`` of its
        ``query_tokens`` found in the prefix cache."""
        self.prefix_query_tokens.inc(query_tokens, role=self.role)
        self.prefix_hit_tokens.inc(hit_tokens, role=self.role)

    def checksum_failed(self, room: int, reason: str) -> None:
        """``KVReceiver``'s ``on_checksum_failure``: one more room failed KV verification here."""
        self.kv_checksum_failures.inc(role=self.role)

    def render(self) -> str:
        return self.registry.render()
