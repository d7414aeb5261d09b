"""Multi-rank instances on CPU (gloo): DP attention + EP MoE, lockstep, greedy tokens unchanged."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.support.clients import async_openai_client, greedy_request, random_prompt
from tests.support.cluster import kv_pages_used, metric_samples, pd_serve, wait_pages_idle
from tests.support.oracle import hf_greedy
from tests.support.polling import wait_until

# The official client is a test extra (`pip install -e .[test]`), not on every host that runs `-m gpu`.
openai = pytest.importorskip("openai")


def greedy_token_ids(url: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The token ids of greedy completions of every prompt, all sent at once."""

    async def run():
        c = async_openai_client(url)
        outs = await asyncio.gather(*(c.completions.create(**greedy_request(p, max_tokens)) for p in prompts))
        await c.close()
        return [o.choices[0].model_extra["token_ids"] for o in outs]

    return asyncio.run(run())


@pytest.fixture(scope="module", params=["linear", "round_robin"])
def deployment_dp2(request, tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-dp2") / "pd-serve.log"
    flags = ["--dp", "2", "--ep", "2", "--chunk-size", "16", "--model-name", "tiny-ci"]
    with pd_serve(tiny_model_dir, log, *flags, "--expert-placement", request.param) as url:
        yield url, request.param


def test_two_rank_instances_give_transformers_tokens(deployment_dp2, tiny_model_dir, hf_model):
    deployment_dp2, placement = deployment_dp2
    hf = hf_model(tiny_model_dir)
    # /health is OK once one prefill and one decode rank registered; the others follow within a moment.
    wait_until(lambda: len(kv_pages_used(deployment_dp2)) >= 4, 30, "4 ranks registered", interval=0.2)
    assert sorted((role, rank) for role, _, rank in kv_pages_used(deployment_dp2)) == [
        ("decode", "0"),
        ("decode", "1"),
        ("prefill", "0"),
        ("prefill", "1"),
    ]
    rng = random.Random(7)
    prompts = [random_prompt(rng, rng.choice([3, 20, 45]), 1000) for _ in range(12)]

    # Concurrent requests spread over both ranks of each instance: one rank may decode while the
    # other prefills again or idles, and every MoE collective still lines up.
    got = greedy_token_ids(deployment_dp2, prompts, 12)
    assert got == [hf_greedy(hf, p, 12) for p in prompts]
    assert all(v == 0 for v in wait_pages_idle(deployment_dp2).values())
    # Per-rank expert counters, relayed by the proxy: each rank reports the experts it holds.
    counts: dict[tuple[str, str], set[int]] = {}
    for (name, labels), value in metric_samples(deployment_dp2).items():
        if name == "pd_expert_tokens":
            d = dict(labels)
            counts.setdefault((d["role"], d["rank"]), set()).add(int(d["expert"]))
            assert value >= 0
    held = {
        "linear": {"0": {0, 1, 2, 3}, "1": {4, 5, 6, 7}},
        "round_robin": {"0": {0, 2, 4, 6}, "1": {1, 3, 5, 7}},
    }
    for role in ("prefill", "decode"):
        for rank in ("0", "1"):
            assert counts[(role, rank)] == held[placement][rank], (role, rank)
    from pd.bench.report import expert_balance

    summary = expert_balance(deployment_dp2)
    assert "prefill:" in summary and "decode:" in summary and "max/mean over ranks" in summary


def prefix_hits(url: str) -> dict[str, float]:
    """Prefix-cache hit tokens of each prefill rank so far (relayed by the proxy with the rank's label)."""
    out: dict[str, float] = {}
    for (name, labels), value in metric_samples(url).items():
        d = dict(labels)
        if name == "pd_prefix_cache_hit_tokens_total" and d.get("role") == "prefill":
            out[d["rank"]] = out.get(d["rank"], 0.0) + value
    return out


def test_cache_aware_routing_sends_a_shared_prefix_to_the_rank_that_holds_it(deployment_dp2):
    """Four requests in turn that share a 64-token prefix (4 pages of 16): the proxy sends them to one
    prefill DP rank, whose cache then holds the prefix for the three after the first (least-load routing
    would alternate the ranks, and each would find it only once)."""
    url, _ = deployment_dp2
    wait_until(lambda: len(kv_pages_used(url)) >= 4, 30, "4 ranks registered", interval=0.2)
    before = prefix_hits(url)
    rng = random.Random(11)
    shared = random_prompt(rng, 64, 1000)
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="-")
    for _ in range(4):
        c.completions.create(**greedy_request(shared + random_prompt(rng, 3, 1000), 2))
    after = prefix_hits(url)
    grown = sorted(after.get(r, 0.0) - before.get(r, 0.0) for r in ("0", "1"))
    assert grown == [0.0, 3 * 64.0], (before, after)


def test_two_rank_instances_with_mtp_give_transformers_tokens(tiny_model, hf_model, tmp_path):
    """MTP (K = 2) on 2-rank prefill and decode instances: each rank drafts for its own requests and runs the
    MTP layer's MoE K times a step (with no tokens where it drafted less), so the EP collectives line up
    while the ranks verify different numbers of drafts; greedy output is transformers'."""
    path = tiny_model("ci", with_mtp=True)
    hf = hf_model(path)
    flags = ["--dp", "2", "--ep", "2", "--chunk-size", "16", "--model-name", "tiny-ci"]
    flags += ["--speculative-algorithm", "mtp", "--num-speculative-tokens", "2"]
    rng = random.Random(11)
    prompts = [random_prompt(rng, rng.choice([3, 20, 45]), 1000) for _ in range(8)]
    with pd_serve(path, tmp_path / "pd-serve.log", *flags) as url:
        wait_until(lambda: len(kv_pages_used(url)) >= 4, 30, "4 ranks registered", interval=0.2)

        assert greedy_token_ids(url, prompts, 12) == [hf_greedy(hf, p, 12) for p in prompts]
        assert all(v == 0 for v in wait_pages_idle(url).values())
        verified: dict[str, float] = {}  # verify steps of each decode rank (the histogram's count)
        for (name, labels), value in metric_samples(url).items():
            d = dict(labels)
            if name == "pd_spec_tokens_per_step_count" and d.get("role") == "decode":
                verified[d["rank"]] = verified.get(d["rank"], 0.0) + value
        assert sorted(verified) == ["0", "1"] and all(v > 0 for v in verified.values())


def test_two_rank_decode_in_normal_mode_with_piecewise_graphs_gives_transformers_tokens(
    tiny_model_dir, hf_model, tmp_path
):
    """``--piecewise-graphs``: decode ranks dispatch in the EP backend's normal mode (between piecewise graphs on
    GPUs, eager here) instead of low-latency; a rank with nothing to decode still joins each layer's normal
    collectives, so concurrent requests on both ranks give transformers' tokens."""
    hf = hf_model(tiny_model_dir)
    flags = ["--dp", "2", "--ep", "2", "--chunk-size", "16", "--model-name", "tiny-ci", "--piecewise-graphs"]
    rng = random.Random(13)
    prompts = [random_prompt(rng, rng.choice([3, 20, 45]), 1000) for _ in range(8)]
    log = tmp_path / "pd-serve.log"
    with pd_serve(tiny_model_dir, log, *flags) as url:
        wait_until(lambda: len(kv_pages_used(url)) >= 4, 30, "4 ranks registered", interval=0.2)

        assert greedy_token_ids(url, prompts, 12) == [hf_greedy(hf, p, 12) for p in prompts]
        assert all(v == 0 for v in wait_pages_idle(url).values())
    text = log.read_text()
    assert "low-latency MoE True" not in text and text.count("low-latency MoE False") == 4, text[-3000:]
