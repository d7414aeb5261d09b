"""Cache-aware routing (pd/proxy/prefix_routing.py and its use in pd.proxy.router.Router).

The oracle is the policy as the module states it: a repeated prefix goes back to the rank that computed it
while the ranks are equally idle, load wins once one rank is loaded, a prompt without a recorded prefix
goes to the least loaded rank, and least_load ignores prefixes. The Router runs without a registry (its
view of the ranks is set directly) and without calls to ranks (pick only chooses).
"""

from __future__ import annotations

import random

import pytest

from pd.proxy.prefix_routing import BLOCK_TOKENS, PrefixRecord, RoutingConfig, block_digests, choose
from pd.proxy.router import Rank, Router
from pd.rpc import bootstrap_pb2 as bpb

MODEL = "m"


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def test_digests_chain_over_full_blocks():
    a = prompt(1, 3 * BLOCK_TOKENS + 5)
    b = a[: 2 * BLOCK_TOKENS] + prompt(2, 40)  # shares two blocks
    c = [a[0] + 1, *a[1:]]  # differs in the first token
    da, db, dc = block_digests(a), block_digests(b), block_digests(c)
    assert len(da) == 3 and len(db) == 4 and block_digests(a[: BLOCK_TOKENS - 1]) == []
    assert da[:2] == db[:2] and da[2] != db[2]
    assert not set(da) & set(dc)  # a block's digest covers every token before it
    assert block_digests(list(a)) == da  # deterministic


def test_the_record_matches_leading_blocks_and_forgets_the_oldest():
    record = PrefixRecord(max_blocks=4)
    a, b = block_digests(prompt(1, 3 * BLOCK_TOKENS)), block_digests(prompt(2, 3 * BLOCK_TOKENS))
    record.add("r1", a)
    assert record.matched("r1", a) == 3 and record.matched("r1", a[:1] + b[1:]) == 1
    assert record.matched("r2", a) == 0
    record.add("r1", b)  # 6 blocks > 4: a's first two are forgotten
    assert record.matched("r1", b) == 3 and record.matched("r1", a) == 0
    record.retain({"r2"})
    assert record.matched("r1", b) == 0


def test_choose_follows_the_prefix_while_balanced_and_load_when_not():
    cfg = RoutingConfig(balance_abs=2, balance_rel=1.5, cache_threshold=0.5)
    record = PrefixRecord(1000)
    p = prompt(3, 10 * BLOCK_TOKENS)
    d = block_digests(p)
    record.add("b", d[:6])
    idle = {"a": (0, 0), "b": (0, 0)}
    assert choose(cfg, ["a", "b"], idle, record, d, len(p)) == ("b", "cache")
    assert choose(cfg, ["a", "b"], {"a": (0, 0), "b": (2, 9)}, record, d, len(p)) == ("b", "cache")
    assert choose(cfg, ["a", "b"], {"a": (0, 0), "b": (3, 9)}, record, d, len(p)) == ("a", "imbalance")
    short = PrefixRecord(1000)
    short.add("b", d[:4])  # 40% of the prompt < cache_threshold
    assert choose(cfg, ["a", "b"], {"a": (0, 5), "b": (0, 0)}, short, d, len(p)) == ("b", "load")
    assert choose(cfg, ["a", "b"], {"a": (0, 0), "b": (0, 5)}, short, d, len(p)) == ("a", "load")
    least = RoutingConfig(policy="least_load")
    assert choose(least, ["a", "b"], {"a": (0, 0), "b": (0, 1)}, record, d, len(p)) == ("a", "load")
    with pytest.raises(ValueError, match="policy must be one of"):
        RoutingConfig(policy="random")


def rank(role: int, name: str) -> Rank:
    return Rank(role, name, 0, f"127.0.0.1:{abs(hash(name)) % 50000 + 1000}", MODEL, 4096, "i1")


@pytest.fixture
def router() -> Router:
    r = Router("127.0.0.1:1", routing=RoutingConfig(balance_abs=2, balance_rel=1.5))
    for x in (rank(bpb.ROLE_PREFILL, "p1"), rank(bpb.ROLE_PREFILL, "p2"), rank(bpb.ROLE_DECODE, "d1")):
        r.ranks[x.key] = x
    return r


def test_a_repeated_prefix_goes_back_to_its_rank_while_both_are_idle(router):
    system = prompt(4, 20 * BLOCK_TOKENS)  # a shared system prompt, then different questions
    firsts = []
    for q in range(6):
        route = router.pick(MODEL, system + prompt(100 + q, 30))
        assert route.prefill is not None
        firsts.append(route.prefill.instance_id)
        router.release(*route.ranks)  # each request done before the next: both ranks idle
    assert len(set(firsts)) == 1, firsts
    assert router.decisions["cache"] == 5 and router.decisions["load"] == 1
    other = router.pick(MODEL, prompt(5, 20 * BLOCK_TOKENS))  # an unrelated prompt: the less used rank
    assert other.prefill is not None and other.prefill.instance_id != firsts[0]


def test_load_spreads_a_shared_prefix_once_its_rank_is_loaded(router):
    system = prompt(6, 20 * BLOCK_TOKENS)
    held = [router.pick(MODEL, system + prompt(200 + q, 30)) for q in range(8)]  # none released
    used = [r.prefill.instance_id for r in held if r.prefill is not None]
    assert used[:3] == [used[0]] * 3  # balanced up to balance_abs: the prefix's rank
    assert set(used) == {"p1", "p2"}  # then the other one takes load
    counts = {p: used.count(p) for p in ("p1", "p2")}
    assert max(counts.values()) - min(counts.values()) <= 3, counts
    assert router.decisions["imbalance"] >= 1


def test_least_load_ignores_prefixes(router):
    router.routing = RoutingConfig(policy="least_load")
    system = prompt(7, 20 * BLOCK_TOKENS)
    used = []
    for q in range(4):
        route = router.pick(MODEL, system + prompt(300 + q, 30))
        assert route.prefill is not None
        used.append(route.prefill.instance_id)
        router.release(*route.ranks)
    assert used == ["p1", "p2", "p1", "p2"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--routing-cache-threshold", "2"], r"cache_threshold must be in \[0, 1\], got 2.0"),
        (["--routing-balance-rel", "0.5"], "balance_rel >= 1"),
    ],
)
def test_bad_routing_flags_stop_pd_serve_and_pd_proxy_with_the_value_named(flags, words):
    pytest.importorskip("uvicorn")
    from pd.launch import proxy, serve

    with pytest.raises(SystemExit, match=f"pd-serve: error: .*{words}"):  # before any child starts
        serve.main(flags)
    with pytest.raises(SystemExit, match=f"pd-proxy: error: .*{words}"):
        proxy.main(["--bootstrap", "127.0.0.1:1", *flags])


def test_a_conversation_goes_back_to_the_decode_rank_holding_its_earlier_turns():
    """Decode ranks keep the pages of requests that ended there (decode-side reuse): the decode rank is
    chosen by the same policy, so a next turn (earlier turns + a new question) goes back while both decode
    ranks are equally idle, and an unrelated prompt goes to the other."""
    r = Router("127.0.0.1:1", routing=RoutingConfig(balance_abs=2, balance_rel=1.5))
    for x in (rank(bpb.ROLE_PREFILL, "p1"), rank(bpb.ROLE_DECODE, "d1"), rank(bpb.ROLE_DECODE, "d2")):
        r.ranks[x.key] = x
    turn = prompt(8, 10 * BLOCK_TOKENS)
    firsts = []
    for t in range(4):
        route = r.pick(MODEL, turn)
        firsts.append(route.decode.instance_id)
        r.release(*route.ranks)
        turn = turn + prompt(400 + t, 3 * BLOCK_TOKENS)  # the answer and the next question
    assert len(set(firsts)) == 1 and r.decode_decisions["cache"] == 3, (firsts, r.decode_decisions)
    other = r.pick(MODEL, prompt(9, 10 * BLOCK_TOKENS))
    assert other.decode.instance_id != firsts[0]
