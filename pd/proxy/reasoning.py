"""Reasoning in model output: the text between a reasoning model's tags, split from its answer, for the
``reasoning_content`` field of OpenAI-style responses (``--reasoning-parser``).

``deepseek-r1`` (DeepSeek-R1, R1-0528, and V3.1 in thinking mode): ``<think>\\n REASONING </think>\\n\\n
ANSWER``. R1's first template let the model write ``<think>`` itself; later ones (R1 after its update,
R1-0528's ``tokenizer_config.json``: ``{{'<｜Assistant｜><think>\\n'}}``, V3.1's thinking mode) end the
prompt with it, so the output starts inside the reasoning with no opening tag. Both are handled:

- with ``starts_in_reasoning`` (the default, for prompts that opened the tag, and for R1, which always
  thinks): the output is reasoning up to ``</think>``; an opening ``<think>`` at its very start (after
  whitespace) is dropped; without ``</think>`` it is all reasoning (cut off while thinking);
- without it (prompts that closed the tag, e.g. V3.1's non-thinking ``</think>``): only an output that
  opens with ``<think>`` has reasoning; any other is all content, verbatim.

The reasoning is whitespace-stripped and None when empty; the content after ``</think>`` loses its leading
whitespace. ``ReasoningParser.starts_inside(prompt)`` tells which case a rendered prompt is.
"""

from __future__ import annotations

from dataclasses import dataclass

from pd.proxy.markers import MarkerStream, closing_tail_len


@dataclass(frozen=True)
class ReasoningParser:
    open_tag: str
    close_tag: str

    def starts_inside(self, prompt: str) -> bool:
        """Whether ``prompt`` ends inside an opened reasoning block (its last opening tag is not closed)."""
        return prompt.rfind(self.open_tag) > prompt.rfind(self.close_tag)

    def stream(self, starts_in_reasoning: bool = True) -> ReasoningStream:
        """A per-request splitter of streamed output deltas."""
        return ReasoningStream(self, starts_in_reasoning)

    def split(self, text: str, starts_in_reasoning: bool = True) -> tuple[str | None, str]:
        """``(reasoning_content or None, content)`` of a whole output."""
        stream = self.stream(starts_in_reasoning)
        stream.feed(text)
        stream.finish()
        return stream.reasoning, stream.content


REASONING_PARSERS: dict[str, ReasoningParser] = {"deepseek-r1": ReasoningParser("<think>", "</think>")}


class ReasoningStream(MarkerStream):
    """Turns one request's output deltas into ``{"reasoning_content": ...}`` and ``{"content": ...}``
    deltas. A tail that may still become the closing tag (or the reasoning's trailing whitespace) is held
    back; so is the start of the output while it may still become the opening tag. The deltas of all
    ``feed`` calls and ``finish`` add up to ``reasoning`` and ``content``."""

    def __init__(self, parser: ReasoningParser, starts_in_reasoning: bool) -> None:
        super().__init__()
        self._parser = parser
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "start"  # start | reasoning | content
        self._lead = True  # the current part has not started: its leading whitespace is dropped
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def reasoning(self) -> str | None:
        return "".join(self._reasoning) or None

    @property
    def content(self) -> str:
        return "".join(self._content)

    def _step(self, final: bool) -> bool:
        p, buf = self._parser, self._buf
        if self._state == "start":
            rest = buf.lstrip()
            if rest.startswith(p.open_tag):
                self._state, self._buf = "reasoning", rest[len(p.open_tag) :]
            elif p.open_tag.startswith(rest) and not final:
                return False  # may still become the opening tag
            else:
                self._state = "reasoning" if self._starts_in_reasoning else "content"
                self._lead = self._starts_in_reasoning  # no reasoning: the content is verbatim
            return True
        if self._state == "reasoning":
            i = buf.find(p.close_tag)
            if i >= 0:
                self._emit_reasoning(buf[:i], last=True)
                self._state, self._buf, self._lead = "content", buf[i + len(p.close_tag) :], True
                return True
            keep = 0 if final else closing_tail_len(buf, (p.close_tag,))
            self._emit_reasoning(buf[: len(buf) - keep], last=final)
            self._buf = buf[len(buf) - keep :]
            return False
        text = buf.lstrip() if self._lead else buf
        self._lead = self._lead and not text
        self._buf = ""
        if text:
            self._content.append(text)
            self._push("content", text)
        return False

    def _emit_reasoning(self, text: str, last: bool) -> None:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        if last:
            text = text.rstrip()
        if text:
            self._reasoning.append(text)
            self._push("reasoning_content", text)

    def _push(self, key: str, text: str) -> None:
        if self._out and key in self._out[-1]:
            self._out[-1][key] += text
        else:
            self._out.append({key: text})
