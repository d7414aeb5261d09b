"""pd.proxy.reasoning: DeepSeek-R1's reasoning split from its answer, with and without the opening tag
(templates that end the prompt with it), and streamed deltas that add up to the same split for every way
of cutting the output into pieces."""

from __future__ import annotations

import random

import pytest

from pd.proxy.reasoning import REASONING_PARSERS

R1 = REASONING_PARSERS["deepseek-r1"]

# (output, starts_in_reasoning, reasoning_content, content)
# fmt: off
CASES = [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", True, "Let me think.", "The answer is 4."),
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", False, "Let me think.", "The answer is 4."),
    ("\nLet me think.\n</think>\n\nThe answer is 4.", True, "Let me think.", "The answer is 4."),  # tag in prompt
    ("  <think>a < b and c </thin k></think>x", True, "a < b and c </thin k>", "x"),
    ("Still thinking when cut off", True, "Still thinking when cut off", ""),
    ("<think>\nStill thinking", False, "Still thinking", ""),
    ("</think>Just the answer.", True, None, "Just the answer."),
    ("<think>\n\n</think>\n\nJust the answer.", True, None, "Just the answer."),
    ("  Plain answer, no reasoning.\n", False, None, "  Plain answer, no reasoning.\n"),
    ("<thinking is not a tag", False, None, "<thinking is not a tag"),
    ("<thinking is not a tag", True, "<thinking is not a tag", ""),
    ("<thi", False, None, "<thi"),
    ("", True, None, ""),
    ("   ", False, None, "   "),
    ("r1</think>answer with </think> and <think> inside\n", True, "r1", "answer with </think> and <think> inside\n"),
    ("r1 \n </thi", True, "r1 \n </thi", ""),
    ("思考。</think>\n答案：四", True, "思考。", "答案：四"),
]
# fmt: on


def reassemble(deltas: list[dict]) -> tuple[str | None, str]:
    reasoning, content = "", ""
    for delta in deltas:
        assert len(delta) == 1 and next(iter(delta.values()))  # one non-empty field per delta
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
    return reasoning or None, content


def stream_pieces(pieces: list[str], starts_in_reasoning: bool) -> tuple[str | None, str]:
    stream = R1.stream(starts_in_reasoning)
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    result = reassemble(deltas)
    assert result == (stream.reasoning, stream.content)
    return result


@pytest.mark.parametrize("text, inside, reasoning, content", CASES)
def test_split(text, inside, reasoning, content):
    assert R1.split(text, starts_in_reasoning=inside) == (reasoning, content)


@pytest.mark.parametrize("text, inside, reasoning, content", CASES)
def test_stream_every_split_and_random_splits(text, inside, reasoning, content):
    expected = (reasoning, content)
    for i in range(len(text) + 1):
        assert stream_pieces([text[:i], text[i:]], inside) == expected, i
    rng = random.Random(len(text))
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 10))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stream_pieces(pieces, inside) == expected, pieces
    assert stream_pieces(list(text), inside) == expected


def test_stream_random_texts():
    """Texts of tags, pieces of tags, whitespace and words, streamed in random pieces, give what split
    gives."""
    atoms = ["<think>", "</think>", "<", "</", "<th", "</thi", "think>", " ", "\n", "a", "b c"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        for inside in (True, False):
            assert stream_pieces(pieces, inside) == R1.split(text, inside), (pieces, inside)


def test_stream_emits_early_and_holds_only_what_may_be_a_tag():
    stream = R1.stream()
    assert stream.feed("<th") == []  # may be the opening tag
    assert stream.feed("ink>\nStep 1. ") == [{"reasoning_content": "Step 1."}]  # trailing space held
    assert stream.feed("Step 2.\n</th") == [{"reasoning_content": " Step 2."}]
    assert stream.feed("ink>\n\nDone") == [{"content": "Done"}]
    assert stream.feed(" </think>") == [{"content": " </think>"}]  # after the reasoning, tags are text
    assert stream.finish() == []
    assert (stream.reasoning, stream.content) == ("Step 1. Step 2.", "Done </think>")


def test_starts_inside():
    assert R1.starts_inside("<｜User｜>hi<｜Assistant｜><think>\n")  # R1-0528's generation prompt
    assert not R1.starts_inside("<｜User｜>hi<｜Assistant｜></think>")  # V3.1 without thinking
    assert not R1.starts_inside("<｜User｜>hi<｜Assistant｜>")  # R1's first template: the model opens it
    assert not R1.starts_inside("<think>a</think>b<｜User｜>hi<｜Assistant｜>")
    assert R1.starts_inside("<think>a</think>b<｜User｜>hi<｜Assistant｜><think>")
