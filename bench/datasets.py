"""Benchmark prompts: random token ids, or ShareGPT conversations.

A dataset is a list of `SampleRequest`s; the load generator sends them in order.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

# ShareGPT filters: drop conversations whose prompt or reply is shorter than this (too little to
# measure), whose prompt is longer than the prompt limit, or whose prompt + reply exceeds the
# total limit (so every sample fits a modest context).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
# Without a tokenizer ShareGPT lengths are estimated as characters / this.
CHARS_PER_TOKEN = 4

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to send.

    `prompt` is text, or token ids (the completions API accepts a list of ints).
    `prompt_len` is the prompt's token count; exact when `prompt_len_exact`, else estimated.
    `output_len` is the `max_tokens` to ask for.
    `turn` is its turn in a conversation (0: the first); `after`, the index of the request that must have
    ended before this one is sent (the conversation's previous turn), else None.
    """

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    prompt_len_exact: bool = True
    turn: int = 0
    after: int | None = None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a Hugging Face `tokenizer.json`, given the file or the directory that holds it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"--tokenizer {path}: expected a tokenizer.json file or a directory holding one"
        )
    return Tokenizer.from_file(str(file))


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _sample_len(rng: random.Random, mean: int, range_ratio: float) -> int:
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.randint(low, high)


# Rounds of decode / re-encode / cut or top up that text prompts get to reach their exact length.
TEXT_LENGTH_ROUNDS = 16


def _whole_tokens(tokenizer: Tokenizer, vocab: Sequence[int]) -> list[int]:
    """The ids of ``vocab`` that decode, alone, to text that encodes back to that one id (no pieces of a
    UTF-8 sequence, nothing that decodes to nothing): what text prompts are topped up with."""
    ids = list(vocab)
    texts = tokenizer.decode_batch([[i] for i in ids])
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    whole = [i for i, t, e in zip(ids, texts, encoded) if t and "\ufffd" not in t and e.ids == [i]]
    return whole or ids


def _text_of_length(
    tokenizer: Tokenizer, ids: list[int], whole: Sequence[int], rng: random.Random
) -> tuple[str, int]:
    """Text that encodes (without special tokens) to exactly ``len(ids)`` tokens, made from ``ids``;
    returns (text, its token count).

    Decoding random ids and encoding the text does not give the ids back: neighbours merge into fewer
    tokens, and ids that are pieces of a UTF-8 sequence decode to U+FFFD, which encodes to several. So
    the re-encoded ids are cut to the target (and back to a whole character) or topped up with random
    ids of ``whole`` tokens, and decoded again, until the count is exact; after TEXT_LENGTH_ROUNDS
    rounds the closest text is kept (its count is what the sample says).
    """
    target = len(ids)
    best: tuple[str, int] | None = None
    for _ in range(TEXT_LENGTH_ROUNDS):
        text = tokenizer.decode(ids)
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if best is None or abs(len(got) - target) < abs(best[1] - target):
            best = (text, len(got))
        if len(got) == target:
            break
        ids = got[:target]
        while ids and tokenizer.decode(ids[-4:]).endswith("\ufffd"):  # a cut UTF-8 sequence
            ids.pop()
        ids += [whole[rng.randrange(len(whole))] for _ in range(target - len(ids))]
    assert best is not None
    return best


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    as_text: bool = False,
) -> list[SampleRequest]:
    """Prompts of random token ids; lengths uniform in [len*(1-r), len*(1+r)], deterministic in `seed`.

    Ids are drawn below the vocabulary size: the tokenizer's (without its special tokens), capped by
    `vocab_size` when both are given; one of the two is required, since ids the model does not know
    are refused by the server. With `as_text` (chat) the ids are made into text (needs `tokenizer`)
    of exactly the drawn length in tokens, counted without special tokens: the server's chat
    template adds its own tokens (role markers, BOS) on top, as in vllm's random dataset.
    """
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError(
            f"random dataset: num_prompts={num_prompts}, input_len={input_len}, output_len={output_len}; "
            "expected all >= 1"
        )
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random dataset: range_ratio={range_ratio}, expected 0 <= ratio < 1")
    if as_text and tokenizer is None:
        raise ValueError(
            "random dataset: text prompts (chat endpoint) need --tokenizer to decode ids into text"
        )
    if tokenizer is None and vocab_size is None:
        raise ValueError(
            "random dataset: the model's vocabulary size is unknown, and ids beyond it are refused by the "
            "server: pass --tokenizer (the model's tokenizer.json or its directory) or --random-vocab-size N "
            "(ids are drawn from [0, N))"
        )
    vocab: Sequence[int]
    if tokenizer is not None:
        limit = tokenizer.get_vocab_size()
        if vocab_size is not None:
            limit = min(limit, vocab_size)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        vocab = [i for i in range(limit) if i not in special]
    else:
        vocab = range(vocab_size)
    if len(vocab) == 0:
        raise ValueError(f"random dataset: no usable token ids below vocab_size={vocab_size}")

    whole = _whole_tokens(tokenizer, vocab) if as_text else []
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n_in = _sample_len(rng, input_len, range_ratio)
        n_out = _sample_len(rng, output_len, range_ratio)
        ids = [vocab[rng.randrange(len(vocab))] for _ in range(n_in)]
        if as_text:
            text, n_in = _text_of_length(tokenizer, ids, whole, rng)
            requests.append(SampleRequest(prompt=text, prompt_len=n_in, output_len=n_out))
        else:
            requests.append(SampleRequest(prompt=ids, prompt_len=n_in, output_len=n_out))
    return requests


def _first_exchange(conversation: list[dict]) -> tuple[str, str] | None:
    """The first human turn and the assistant reply that follows it, or None."""
    for i, turn in enumerate(conversation):
        if turn.get("from") in HUMAN_ROLES:
            for reply in conversation[i + 1 :]:
                if reply.get("from") in GPT_ROLES:
                    prompt, completion = turn.get("value"), reply.get("value")
                    if isinstance(prompt, str) and isinstance(completion, str):
                        return prompt, completion
                    return None
            return None
    return None


def sharegpt_requests(
    path: str | Path,
    num_prompts: int,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    output_len: int | None = None,
    min_len: int = SHAREGPT_MIN_LEN,
    max_prompt_len: int = SHAREGPT_MAX_PROMPT_LEN,
    max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
) -> list[SampleRequest]:
    """Samples `num_prompts` conversations from a ShareGPT JSON file (shuffled with `seed`).

    The file is a list of {"conversations": [{"from": "human"|"gpt", "value": str}, ...]}. The first
    human turn is the prompt; the reply's token count is the output length (`output_len`, when given,
    replaces it). Without a tokenizer token counts are estimated as characters / CHARS_PER_TOKEN and
    the samples say so (`prompt_len_exact=False`). Too short / too long conversations are skipped.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(
            f"ShareGPT file {path}: expected a JSON list of conversations, got {type(data).__name__}"
        )

    def length(text: str) -> int:
        if tokenizer is not None:
            return count_tokens(tokenizer, text)
        return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))

    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    requests = []
    for i in order:
        if len(requests) == num_prompts:
            break
        entry = data[i]
        conversation = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(conversation, list):
            continue
        exchange = _first_exchange(conversation)
        if exchange is None:
            continue
        prompt, completion = exchange
        n_in = length(prompt)
        n_out = output_len if output_len is not None else length(completion)
        too_short = n_in < min_len or (output_len is None and n_out < min_len)
        if too_short or n_in > max_prompt_len or n_in + n_out > max_total_len:
            continue
        requests.append(
            SampleRequest(
                prompt=prompt, prompt_len=n_in, output_len=n_out, prompt_len_exact=tokenizer is not None
            )
        )
    if len(requests) < num_prompts:
        raise ValueError(
            f"ShareGPT file {path}: only {len(requests)} usable conversations "
            f"(prompt >= {min_len} and <= {max_prompt_len} tokens, reply >= {min_len}, total <= {max_total_len}), "
            f"but --num-prompts is {num_prompts}"
        )
    return requests
