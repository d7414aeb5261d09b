"""Workloads whose prompts share prefixes (what a prefix cache and cache-aware routing are for).

- ``generated-shared-prefix``: ``groups`` system prompts of ``system_len`` random token ids, each followed
  by ``per_group`` questions of ``question_len`` random ids; the requests are shuffled across groups (seeded),
  so each group's arrive interleaved with the others'. Token ids, for the completions API.
- ``sharegpt-multiturn``: ShareGPT conversations replayed turn by turn. Turn k's prompt holds every earlier
  human turn and the recorded reply (the dataset's, not the model's: the prompts are the same whatever the
  model says) and then the k-th human turn, as ``User:`` / ``Assistant:`` text. Turn k is sent once turn
  k-1 of its conversation has ended (``SampleRequest.after``); conversations start at the request rate.
  ``synthetic_sharegpt`` writes conversations in that format (random words) where no ShareGPT file is at hand.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from pd.bench.datasets import CHARS_PER_TOKEN, GPT_ROLES, HUMAN_ROLES, SampleRequest, count_tokens
from pd.bench.metrics import RequestRecord

PREFIX_DATASETS = ("generated-shared-prefix", "sharegpt-multiturn")


def shared_prefix_requests(
    groups: int,
    per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
) -> list[SampleRequest]:
    """``groups * per_group`` prompts of ``system_len + question_len`` ids drawn below ``vocab_size``."""
    if min(groups, per_group, system_len, question_len, output_len, vocab_size) < 1:
        raise ValueError(
            f"generated-shared-prefix: groups={groups}, per_group={per_group}, system_len={system_len}, "
            f"question_len={question_len}, output_len={output_len}, vocab_size={vocab_size}; expected all >= 1"
        )
    rng = random.Random(seed)
    requests = []
    for _ in range(groups):
        system = [rng.randrange(vocab_size) for _ in range(system_len)]
        for _ in range(per_group):
            question = [rng.randrange(vocab_size) for _ in range(question_len)]
            requests.append(SampleRequest(system + question, system_len + question_len, output_len))
    rng.shuffle(requests)
    return requests


def multiturn_requests(
    path: str | Path,
    conversations: int,
    max_turns: int,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    output_len: int | None = None,
    max_prompt_len: int = 8192,
) -> list[SampleRequest]:
    """Up to ``max_turns`` turns of ``conversations`` ShareGPT conversations of at least two turns (shuffled
    with ``seed``), conversation by conversation; a conversation stops before a turn whose prompt would pass
    ``max_prompt_len`` tokens. Without a tokenizer token counts are estimated (characters / CHARS_PER_TOKEN)."""
    if conversations < 1 or max_turns < 1:
        raise ValueError(
            f"sharegpt-multiturn: conversations={conversations}, max_turns={max_turns}; expected >= 1"
        )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {path}: expected a JSON list of conversations")

    def length(text: str) -> int:
        if tokenizer is not None:
            return count_tokens(tokenizer, text)
        return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))

    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    requests: list[SampleRequest] = []
    used = 0
    for i in order:
        if used == conversations:
            break
        entry = data[i]
        turns = _exchanges(entry.get("conversations") if isinstance(entry, dict) else None)
        if len(turns) < 2:
            continue
        used += 1
        history = ""
        for k, (question, answer) in enumerate(turns[:max_turns]):
            prompt = f"{history}User: {question}\n\nAssistant:"
            n_in = length(prompt)
            if n_in > max_prompt_len:
                break
            n_out = output_len if output_len is not None else max(1, length(answer))
            after = len(requests) - 1 if k else None
            requests.append(
                SampleRequest(
                    prompt, n_in, n_out, prompt_len_exact=tokenizer is not None, turn=k, after=after
                )
            )
            history = f"{prompt} {answer}\n\n"
    if not requests:
        raise ValueError(f"ShareGPT file {path}: no conversation with two or more turns")
    return requests


def _exchanges(conversation: object) -> list[tuple[str, str]]:
    """The (human turn, reply) pairs of a ShareGPT conversation, in order, up to the first malformed one."""
    if not isinstance(conversation, list):
        return []
    pairs: list[tuple[str, str]] = []
    for a, b in zip(conversation[0::2], conversation[1::2]):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            break
        if a.get("from") not in HUMAN_ROLES or b.get("from") not in GPT_ROLES:
            break
        question, answer = a.get("value"), b.get("value")
        if not (isinstance(question, str) and isinstance(answer, str)):
            break
        pairs.append((question, answer))
    return pairs


_COMMON = (
    "the a of to and in is it that for on with as was be at by this from or have an they which one you were "
    "all we there can more if about when what so up out no time only new some could these two may first"
)
WORDS = _COMMON.split()


def synthetic_sharegpt(
    conversations: int, turns: int, question_words: int, answer_words: int, seed: int = 0
) -> list[dict]:
    """ShareGPT-format conversations of ``turns`` (human, gpt) exchanges of random common words: the shape
    of a multi-turn replay (each turn's prompt holds every earlier one) without the dataset."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [
        {
            "id": f"synthetic-{c}",
            "conversations": [
                {"from": role, "value": text(question_words if role == "human" else answer_words)}
                for _ in range(turns)
                for role in ("human", "gpt")
            ],
        }
        for c in range(conversations)
    ]


def chained_offsets(requests: Sequence[SampleRequest], starts: Sequence[float]) -> list[float]:
    """Send offsets: the requests without ``after`` take ``starts`` in order; a chained request takes its
    predecessor's (it is sent as soon as that one ended)."""
    offsets: list[float] = []
    first = iter(starts)
    for r in requests:
        offsets.append(offsets[r.after] if r.after is not None else next(first))
    return offsets


def turn_lines(records: Sequence[RequestRecord]) -> list[str]:
    """TTFT median and p99 by turn (multi-turn workloads), or nothing when every request is a first turn."""
    by_turn: dict[int, list[float]] = {}
    for r in records:
        if r.ok and r.ttft is not None:
            by_turn.setdefault(r.turn, []).append(r.ttft)
    if len(by_turn) < 2:
        return []
    lines = [f"{'turn':<8}{'requests':>10}{'median TTFT ms':>18}{'P99 TTFT ms':>14}"]
    for turn, values in sorted(by_turn.items()):
        values.sort()
        median, p99 = values[len(values) // 2], values[min(len(values) - 1, int(0.99 * len(values)))]
        lines.append(f"{turn + 1:<8}{len(values):>10}{median * 1e3:>18.2f}{p99 * 1e3:>14.2f}")
    return lines
