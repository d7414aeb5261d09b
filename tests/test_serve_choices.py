"""n > 1 end to end: pd-serve (disaggregated, and colocated), real gRPC and transfer, the openai client.

Oracles: choice i of a request seeded s is what a request of one choice seeded ``choice_seed(s, i)`` gets;
greedy choices are transformers' greedy tokens; a stream reassembled per choice index is the whole
response; the ranks' page and room gauges (every page back, every room closed, after a client leaves)."""

from __future__ import annotations

import httpx
import pytest

from pd.sampling import choice_seed
from tests.support.clients import openai_client
from tests.support.cluster import pd_serve, wait_idle
from tests.support.oracle import hf_greedy

openai = pytest.importorskip("openai")

SEED = 2024
PROMPT = list(range(1, 14))  # 13 tokens: ends mid-page (pages of 4), so every choice copies that page
MAX_TOKENS = 10
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def deployment(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("choices") / "pd-serve.log"
    with pd_serve(
        tiny_model_dir, log, "--chunk-size", "8", "--page-size", "4", "--model-name", "tiny-ci"
    ) as url:
        yield url


def sampled(url: str, n: int = 3, seed: int = SEED, **kw):
    return openai_client(url).completions.create(
        model="tiny-ci",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=seed,
        n=n,
        extra_body=EXTRA,
        **kw,
    )


def tokens(response) -> list[list[int]]:
    assert [c.index for c in response.choices] == list(range(len(response.choices)))
    return [c.model_extra["token_ids"] for c in response.choices]


def assert_idle(url: str) -> None:
    reading = wait_idle(url)
    assert reading and all(v == 0 for v in reading.values()), reading


def test_seeded_choices_reproducible_distinct_and_each_its_seed_alone(deployment):
    first, again = sampled(deployment), sampled(deployment)
    assert tokens(first) == tokens(again)
    assert len({tuple(t) for t in tokens(first)}) == 3, "choices at temperature 1 differ"
    alone = [tokens(sampled(deployment, n=1, seed=choice_seed(SEED, i)))[0] for i in range(3)]
    assert tokens(first) == alone
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.prompt_tokens == len(PROMPT)
    assert first.usage.completion_tokens == 3 * MAX_TOKENS
    assert all(c.finish_reason == "length" for c in first.choices)
    both = sampled(deployment, n=2, best_of=2)
    assert tokens(both) == tokens(first)[:2], "best_of equal to n"


def test_greedy_choices_are_transformers_tokens(deployment, tiny_model_dir, hf_model):
    expected = hf_greedy(hf_model(tiny_model_dir), PROMPT, MAX_TOKENS)
    c = openai_client(deployment)
    r = c.completions.create(
        model="tiny-ci", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, n=3, extra_body=EXTRA
    )
    assert tokens(r) == [expected] * 3
    # Logprobs and echo: each choice's, as a one-choice request gets them (the first token's come from
    # the prefill rank, one set per choice).
    kw = dict(model="tiny-ci", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    one = c.completions.create(**kw, extra_body=EXTRA).choices[0]
    for choice in c.completions.create(**kw, n=2, extra_body=EXTRA).choices:
        assert choice.text == one.text and choice.logprobs.tokens == one.logprobs.tokens
        assert choice.logprobs.token_logprobs == pytest.approx(one.logprobs.token_logprobs, abs=1e-5)
        assert choice.logprobs.top_logprobs[0] is None  # the echoed prompt's first token
        for mine, ref in zip(choice.logprobs.top_logprobs[1:], one.logprobs.top_logprobs[1:], strict=True):
            assert mine.keys() == ref.keys()
            assert list(mine.values()) == pytest.approx(list(ref.values()), abs=1e-5)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_reassembled_per_choice_is_the_whole_response(deployment, chat):
    c = openai_client(deployment)
    kw = dict(model="tiny-ci", max_tokens=MAX_TOKENS, temperature=1.0, seed=SEED, n=3, extra_body=EXTRA)
    if chat:
        messages = [{"role": "user", "content": "Where is the mill?"}]
        whole = c.chat.completions.create(messages=messages, **kw)
        chunks = list(
            c.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **kw
            )
        )
    else:
        whole = c.completions.create(prompt=PROMPT, **kw)
        chunks = list(
            c.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw)
        )
    *events, usage = chunks
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens == 3 * MAX_TOKENS
    order = [e.choices[0].index for e in events]
    assert sorted(set(order)) == [0, 1, 2] and order != sorted(order), "the choices' chunks interleave"
    for choice in whole.choices:
        mine = [e.choices[0] for e in events if e.choices[0].index == choice.index]
        assert [t for m in mine for t in m.model_extra["token_ids"]] == choice.model_extra["token_ids"]
        assert [m.finish_reason for m in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
        if chat:
            assert mine[0].delta.role == "assistant" and all(m.delta.role is None for m in mine[1:])
            assert "".join(m.delta.content or "" for m in mine) == choice.message.content
        else:
            assert "".join(m.text for m in mine) == choice.text
    assert len({tuple(ch.model_extra["token_ids"]) for ch in whole.choices}) == 3


def test_client_disconnect_mid_stream_frees_every_page(deployment):
    body = {
        "model": "tiny-ci",
        "prompt": PROMPT,
        "max_tokens": 2000,
        "n": 3,
        "seed": SEED,
        "stream": True,
        "ignore_eos": True,
    }
    for _ in range(2):
        with httpx.stream("POST", f"{deployment}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(12)]
            assert any(line.startswith("data: ") for line in got)
        # Leaving the block closes the connection mid-stream.
    assert_idle(deployment)


def test_too_many_choices_and_best_of_other_than_n_get_400(deployment):
    c = openai_client(deployment)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-ci", prompt="hi", max_tokens=2, n=17)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-ci", prompt="hi", max_tokens=2, n=2, best_of=3)
    assert e.value.body["param"] == "best_of"


def test_colocated_choices_equal_the_disaggregated_ones(deployment, tiny_model_dir, tmp_path):
    expected = tokens(sampled(deployment))
    with pd_serve(
        tiny_model_dir,
        tmp_path / "col.log",
        "--colocated",
        "1",
        "--page-size",
        "4",
        "--model-name",
        "tiny-ci",
    ) as url:
        assert tokens(sampled(url)) == expected
        stream = sampled(url, stream=True)
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for event in stream:
            got[event.choices[0].index] += event.choices[0].model_extra["token_ids"]
            if sum(map(len, got.values())) > 6:
                break  # the client leaves mid-stream
        stream.close()
        assert_idle(url)
