"""A chat request's output text split into reasoning, content and tool calls, chunk by chunk.

``ChatOutput`` chains the two output parsers of a request: the reasoning splitter (``--reasoning-parser``,
``pd.proxy.reasoning``) first, then the tool-call parser (``--tool-call-parser``, ``pd.proxy.tools``) on the
content that remains. Each decode chunk becomes one ``Piece``: what the SSE event carries (reasoning and
content text, tool-call delta items), and the pieces of a whole request add up to its response's message.

Marker tokens: a decode rank detokenizes with ``skip_special_tokens`` (as it must for plain chat), so a
marker that is a *special* added token of the vocabulary (Kimi-K2's tool-call markers are) never reaches
the proxy as text. When a request's markers include such tokens, ``ChatOutput`` detokenizes the chunks' token
ids itself, dropping the special tokens that are not its markers (what the decode rank drops) and keeping
those that are, with the request's stop strings applied as the decode rank applies them. (A stop string
that only matches across a kept marker's text is a difference the decode rank cannot see.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pd.detokenizer import IncrementalDetokenizer
from pd.proxy.markers import Delta
from pd.proxy.reasoning import REASONING_PARSERS, ReasoningStream
from pd.proxy.tools import ToolCall, ToolCallStream, make_tool_parser
from pd.tokenizer import Tokenizer

TOOL_CALLS_FINISH = "tool_calls"  # finish_reason of an output that called tools and stopped


@dataclass
class Piece:
    """What one chunk of output adds: ``reasoning_content`` text, ``content`` text (either may be empty)
    and tool-call delta items (``choices[].delta.tool_calls[]``: a call's first item carries index, id,
    type, name and ``arguments`` "" or their first piece; later ones an argument piece)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class ChatOutput:
    """One chat request's output: ``feed`` each chunk (its text and token ids) in order, the last with
    ``final``. ``calls`` and ``finish_reason`` tell the parsed calls and the reason to report."""

    def __init__(
        self,
        reasoning: ReasoningStream | None,
        tools: ToolCallStream | None,
        detokenizer: _MarkerDetokenizer | None = None,
    ) -> None:
        self._reasoning, self._tools, self._detok = reasoning, tools, detokenizer

    def feed(self, text: str, token_ids: Sequence[int], final: bool) -> Piece:
        """``text``: the decode rank's text of ``token_ids`` (replaced by the proxy's own where markers are
        special tokens); ``final``: this is the last chunk (held-back text comes out)."""
        if self._detok is not None:
            text = self._detok.add(token_ids, final)
        piece = Piece()
        contents = [text]
        if self._reasoning is not None:
            deltas = [*self._reasoning.feed(text), *(self._reasoning.finish() if final else [])]
            piece.reasoning = _joined(deltas, "reasoning_content")
            contents = [d["content"] for d in deltas if "content" in d]
        if self._tools is None:
            piece.content = "".join(contents)
            return piece
        deltas = [d for c in contents for d in self._tools.feed(c)]
        if final:
            deltas += self._tools.finish()
        piece.content = _joined(deltas, "content")
        piece.tool_calls = call_items(deltas)
        return piece

    @property
    def calls(self) -> list[ToolCall]:
        """The calls parsed so far (all of them once the final chunk is fed)."""
        return [] if self._tools is None else self._tools.calls

    def finish_reason(self, finish: str) -> str:
        """The reason to report for the decode rank's ``finish``: "tool_calls" when the model called tools
        and stopped (not when it was cut off: "length" stays)."""
        return TOOL_CALLS_FINISH if finish == "stop" and self.calls else finish


def call_items(deltas: list[Delta]) -> list[dict[str, Any]]:
    """The tool-call deltas of a ``ToolCallStream`` as the items of one ``delta.tool_calls``: a call's
    header item gets ``arguments`` (its first piece, or ""), and consecutive pieces of a call are merged."""
    items: list[dict[str, Any]] = []
    for delta in deltas:
        for item in delta.get("tool_calls", ()):
            function = item["function"]
            if "id" in item:
                items.append({**item, "function": {"name": function["name"], "arguments": ""}})
            elif items and items[-1]["index"] == item["index"]:
                items[-1]["function"]["arguments"] += function["arguments"]
            else:
                items.append({"index": item["index"], "function": {"arguments": function["arguments"]}})
    return items


def _joined(deltas: list[Delta], key: str) -> str:
    return "".join(d[key] for d in deltas if key in d)


class _MarkerDetokenizer:
    """Token ids to text as the decode rank writes it (special tokens skipped, stop strings applied), but
    keeping the special tokens in ``keep`` (marker tokens) as their text."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], keep: frozenset[int], stop: Sequence[str]
    ) -> None:
        self._skip = tokenizer.special_token_ids - keep
        context = [t for t in prompt_ids if t not in self._skip]
        self._detok = IncrementalDetokenizer(tokenizer, context, skip_special_tokens=False, stop=stop)

    def add(self, token_ids: Sequence[int], final: bool) -> str:
        text = "".join(self._detok.add(t) for t in token_ids if t not in self._skip)
        return text + self._detok.flush() if final else text


def chat_output(
    reasoning_parser: str | None,
    tool_call_parser: str | None,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    parse_tools: bool,
    stop: Sequence[str] = (),
) -> ChatOutput | None:
    """The output parsers of one chat request, None without any: the server's reasoning parser, and its
    tool-call parser when ``parse_tools`` (the request has tools and a tool_choice other than "none")."""
    reasoning, tools, markers = None, None, []
    if reasoning_parser is not None:
        parser = REASONING_PARSERS[reasoning_parser]
        tail = tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
        reasoning = parser.stream(starts_in_reasoning=parser.starts_inside(tail))
        markers += [parser.open_tag, parser.close_tag]
    if parse_tools:
        if tool_call_parser is None:
            raise ValueError("tools are parsed only with a tool-call parser")
        tool_parser = make_tool_parser(tool_call_parser)
        tools = tool_parser.stream()
        markers += tool_parser.markers.all()
    if reasoning is None and tools is None:
        return None
    ids = {tokenizer.token_to_id(m) for m in markers}
    keep = frozenset(i for i in ids if i is not None) & tokenizer.special_token_ids
    detok = _MarkerDetokenizer(tokenizer, prompt_ids, keep, stop) if keep else None
    return ChatOutput(reasoning, tools, detok)
