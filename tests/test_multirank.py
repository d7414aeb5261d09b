"""Multi-rank instances on CPU (gloo): DP attention + EP MoE, lockstep, greedy tokens unchanged."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from pd.metrics import parse_samples
from tests.oracle import hf_greedy
from tests.serving import kv_pages_used, pd_serve, wait_pages_idle

# The official client is a test extra (`pip install -e .[test]`), not on every host that runs `-m gpu`.
openai = pytest.importorskip("openai")


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
    deadline = time.monotonic() + 30
    while len(pages := kv_pages_used(deployment_dp2)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted((role, rank) for role, _, rank in pages) == [
        ("decode", "0"),
        ("decode", "1"),
        ("prefill", "0"),
        ("prefill", "1"),
    ]
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.choice([3, 20, 45]))] for _ in range(12)]

    async def run():
        c = openai.AsyncOpenAI(base_url=f"{deployment_dp2}/v1", api_key="-", max_retries=0, timeout=120)
        outs = await asyncio.gather(
            *(
                c.completions.create(
                    model="tiny-ci",
                    prompt=p,
                    max_tokens=12,
                    temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                for p in prompts
            )
        )
        await c.close()
        return [o.choices[0].model_extra["token_ids"] for o in outs]

    # Concurrent requests spread over both ranks of each instance: one rank may decode while the
    # other prefills again or idles, and every MoE collective still lines up.
    got = asyncio.run(run())
    assert got == [hf_greedy(hf, p, 12) for p in prompts]
    assert all(v == 0 for v in wait_pages_idle(deployment_dp2).values())
    # Per-rank expert counters, relayed by the proxy: each rank reports the experts it holds.
    counts: dict[tuple[str, str], set[int]] = {}
    for (name, labels), value in parse_samples(
        httpx.get(f"{deployment_dp2}/metrics", timeout=10).text
    ).items():
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
    from pd.bench.serve import expert_balance

    summary = expert_balance(deployment_dp2)
    assert "prefill:" in summary and "decode:" in summary and "max/mean over ranks" in summary
