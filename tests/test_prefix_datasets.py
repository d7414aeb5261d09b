"""pd-bench's shared-prefix workloads (pd/bench/prefix_datasets.py): what the prompts share, and that a
conversation's turns are sent one after the other (against the stub server of test_bench)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from pd.bench.prefix_datasets import (
    chained_offsets,
    multiturn_requests,
    shared_prefix_requests,
    synthetic_sharegpt,
)
from pd.bench.report import format_table
from pd.bench.serve import BenchConfig, run_benchmark
from tests.test_bench import bounded, stub_server


def test_shared_prefix_prompts_share_their_groups_system_prompt_and_interleave():
    reqs = shared_prefix_requests(4, 5, system_len=30, question_len=7, output_len=3, vocab_size=1000, seed=1)
    assert len(reqs) == 20 and all(r.prompt_len == 37 == len(r.prompt) and r.output_len == 3 for r in reqs)
    systems = [tuple(r.prompt[:30]) for r in reqs]
    assert len(set(systems)) == 4 and all(systems.count(s) == 5 for s in set(systems))
    questions = {tuple(r.prompt[30:]) for r in reqs}
    assert len(questions) == 20
    order = [sorted(set(systems)).index(s) for s in systems]
    assert order != sorted(order)  # groups arrive interleaved
    assert shared_prefix_requests(4, 5, 30, 7, 3, 1000, seed=1) == reqs
    with pytest.raises(ValueError, match="expected all >= 1"):
        shared_prefix_requests(0, 5, 30, 7, 3, 1000)


def sharegpt_file(tmp_path):
    convs = [
        {"conversations": [{"from": "human", "value": "only one turn"}, {"from": "gpt", "value": "reply"}]},
        {
            "conversations": [
                {"from": "human", "value": "first question"},
                {"from": "gpt", "value": "first answer"},
                {"from": "human", "value": "second question"},
                {"from": "gpt", "value": "second answer"},
                {"from": "human", "value": "third question"},
                {"from": "gpt", "value": "third answer"},
            ]
        },
        {
            "conversations": [
                {"from": "user", "value": "hello"},
                {"from": "assistant", "value": "hi there"},
                {"from": "user", "value": "how are you"},
                {"from": "assistant", "value": "fine"},
            ]
        },
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    return path


def test_multiturn_prompts_hold_the_earlier_turns_and_chain(tmp_path):
    reqs = multiturn_requests(sharegpt_file(tmp_path), conversations=2, max_turns=3, seed=0)
    assert len([r for r in reqs if r.turn == 0]) == 2  # two conversations
    assert len(reqs) == 5  # 3 + 2 turns; the one-turn conversation is skipped
    for i, r in enumerate(reqs):
        if r.turn == 0:
            assert r.after is None
            continue
        prev = reqs[i - 1]
        assert r.after == i - 1 and prev.turn == r.turn - 1
        assert isinstance(r.prompt, str) and isinstance(prev.prompt, str)
        assert r.prompt.startswith(prev.prompt)  # the whole earlier turn is a prefix
    three = [r for r in reqs if "third question" in str(r.prompt)]
    assert len(three) == 1 and "second answer" in str(three[0].prompt) and three[0].turn == 2
    assert len(multiturn_requests(sharegpt_file(tmp_path), 2, max_turns=1)) == 2


def test_chained_offsets_give_later_turns_their_conversations_start(tmp_path):
    reqs = multiturn_requests(sharegpt_file(tmp_path), conversations=2, max_turns=3, seed=0)
    offsets = chained_offsets(reqs, [0.5, 1.5])
    firsts = [i for i, r in enumerate(reqs) if r.after is None]
    assert [offsets[i] for i in firsts] == [0.5, 1.5]
    assert all(offsets[i] == offsets[r.after] for i, r in enumerate(reqs) if r.after is not None)


@bounded
def test_a_turn_is_sent_after_the_previous_one_ended(tmp_path):
    reqs = multiturn_requests(sharegpt_file(tmp_path), conversations=2, max_turns=3, seed=0)
    reqs = [dataclasses.replace(r, output_len=3) for r in reqs]
    with stub_server() as (_, url):
        cfg = BenchConfig(base_url=url, request_rate=100.0, disable_tqdm=True, return_phases=False)
        result = asyncio.run(run_benchmark(cfg, reqs))
    records = sorted(result.records, key=lambda r: r.index)
    assert all(r.ok for r in records) and [r.turn for r in records] == [r.turn for r in reqs]
    for r, sample in zip(records, reqs):
        if sample.after is not None:
            assert r.start >= records[sample.after].end
    assert "Time to First Token by turn" in format_table(result)


def test_synthetic_conversations_replay_as_growing_turns(tmp_path):
    data = synthetic_sharegpt(conversations=3, turns=4, question_words=5, answer_words=7, seed=2)
    assert synthetic_sharegpt(3, 4, 5, 7, seed=2) == data and synthetic_sharegpt(3, 4, 5, 7, seed=3) != data
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(data))
    reqs = multiturn_requests(path, conversations=3, max_turns=4, output_len=2)
    assert len(reqs) == 12 and [r.turn for r in reqs] == [0, 1, 2, 3] * 3
    for i, nxt in enumerate(reqs[1:], 1):
        prev = reqs[i - 1]
        if nxt.turn:  # a later turn's prompt holds the earlier turn's prompt and reply
            assert nxt.after == i - 1 and nxt.prompt.startswith(prev.prompt)
            assert (
                len(nxt.prompt.split()) == len(prev.prompt.split()) + 7 + 1 + 5 + 1
            )  # reply, User:, question, Assistant:
