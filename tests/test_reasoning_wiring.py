"""The proxy's reasoning split (--reasoning-parser) on chat responses: streamed deltas carry
reasoning_content and content, and what they add up to equals the whole response's split."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")
from pd.proxy.protocol import ChoiceResult, full_response, parse_request, stream_chunk
from pd.proxy.reasoning import REASONING_PARSERS


def _joined(deltas: list[dict], key: str) -> str | None:
    parts = [d[key] for d in deltas if key in d]
    return "".join(parts) if parts else None


TEXT = "<think>\nfirst, the mill.\n</think>\n\nThe mill is by the river."


@pytest.mark.parametrize("cut", [1, 3, 7, 9, 20, 30, 40])
def test_streamed_reasoning_deltas_add_up_to_the_whole_split(cut):
    req = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, chat=True)
    parser = REASONING_PARSERS["deepseek-r1"]
    whole_stream = parser.stream(starts_in_reasoning=False)
    deltas = [*whole_stream.feed(TEXT), *whole_stream.finish()]
    whole = ChoiceResult(
        _joined(deltas, "content") or "", "stop", [], None, _joined(deltas, "reasoning_content")
    )
    body = full_response(req, "id", "m", [whole], 3)
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "The mill is by the river.",
        "reasoning_content": "first, the mill.",
    }
    stream = parser.stream(starts_in_reasoning=False)
    reasoning, content = "", ""
    pieces = [TEXT[i : i + cut] for i in range(0, len(TEXT), cut)]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        d = [*stream.feed(piece), *(stream.finish() if last else [])]
        chunk = stream_chunk(
            req,
            "id",
            "m",
            _joined(d, "content") or "",
            "stop" if last else None,
            [],
            i == 0,
            None,
            _joined(d, "reasoning_content"),
        )
        delta = chunk["choices"][0]["delta"]
        reasoning += delta.get("reasoning_content", "")
        content += delta["content"]
    assert content == message["content"]
    assert reasoning.strip() == message["reasoning_content"]
