"""Tool calls: parsing them out of model output (whole or streamed). A request's ``tools`` and ``tool_choice``
and the grammar that forces a call: ``pd.proxy.tool_choice``.

Formats (the exact markers; DeepSeek's bars are U+FF5C FULLWIDTH VERTICAL LINE and its spaces U+2581 LOWER
ONE EIGHTH BLOCK), as the models' chat templates write an assistant turn's calls:

- ``deepseek_v3`` (DeepSeek-V3, V3-0324, R1, R1-0528: ``tokenizer_config.json`` chat_template)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

  (calls separated by a newline; ``function`` is the call's type).
- ``deepseek_v31`` (DeepSeek-V3.1's chat_template and model card: no type, no fence, no separator)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

- ``kimi_k2`` (Kimi-K2: ``chat_template.jinja`` and the model repository's docs/tool_call_guidance.md)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>...<|tool_calls_section_end|>

  ``functions.NAME:IDX`` is the call's id (IDX counts the turn's calls from 0); the template writes it back
  as ``## Return of ID`` for the tool's answer, so it is kept as the OpenAI ``id``. DeepSeek's formats
  carry no id: ``call_<random hex>_<index>`` (or the caller's ``id_prefix`` + index).

SGLang's detectors (deepseekv3, deepseekv31, kimik2) and vLLM's tool parsers read the same markers.
DeepSeek's published templates do not render ``tools`` (the tool list goes in the system prompt, e.g.
through a template of the operator's); Kimi-K2's declares them in a ``tool_declare`` system turn.

Parsing rules, the same for whole texts and streams (``parse`` runs the stream on the whole text):

- text outside a tool-calls section is content, verbatim; text after the section's end is content again;
- inside a section only calls count: whitespace between calls is dropped, other text there is content;
- a call's arguments are the text between its header and its end marker, whitespace-stripped (and, for
  ``deepseek_v3``, without the closing fence). They are passed on as written, not checked as JSON;
- a call whose header does not parse (no name, or its end comes before the arguments marker) is not a call:
  its raw text, markers included, goes to content, so nothing the model wrote is lost;
- at the end of the output an unfinished call whose arguments had begun is kept (its arguments are what
  came, possibly cut-off JSON: the finish reason says ``length``); one still in its header is content;
  a missing section end is fine.

Marker text only shows up if the detokenizer keeps special tokens (Kimi-K2's markers are special tokens):
decode with ``skip_special_tokens=False`` when parsing tools. Reasoning (``pd.proxy.reasoning``) is split
off first; tool calls are parsed from the content that remains.
"""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pd.proxy.markers import Delta, MarkerStream, closing_tail_len, first_marker, partial_marker_len

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        """The call as ``choices[].message.tool_calls[]`` has it."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Markers:
    """The fixed strings of a format (see the module docstring)."""

    section_begin: str
    section_end: str
    call_begin: str
    call_end: str
    args_begin: str  # ends a call's header; the arguments follow
    fence: str = ""  # closes the arguments before call_end, after optional whitespace
    others: tuple[str, ...] = ()  # further markers inside a call's header

    def all(self) -> tuple[str, ...]:
        """Every marker string (most are single added tokens of the model's vocabulary)."""
        return (
            self.section_begin,
            self.section_end,
            self.call_begin,
            self.call_end,
            self.args_begin,
            *self.others,
        )


class ToolParser(ABC):
    """One model family's tool-call format: parse whole texts, stream deltas, build a forcing grammar."""

    name: ClassVar[str]
    markers: ClassVar[Markers]
    separator: ClassVar[str] = ""  # what the template writes between two calls

    @abstractmethod
    def call_header(self, header: str, index: int, id_prefix: str) -> tuple[str, str] | None:
        """``(id, name)`` of call ``index`` from its header (the text between call_begin and args_begin),
        or None if the header is malformed."""

    @abstractmethod
    def grammar_call(self, name: str, args: str, lit: Callable[[str], str]) -> str:
        """The Lark rule body of one call to ``name`` with the arguments rule ``args``; ``lit`` writes a
        marker or a piece of text as a Lark item."""

    def stream(self, id_prefix: str | None = None) -> ToolCallStream:
        """A per-request parser of streamed output deltas."""
        return ToolCallStream(self, new_id_prefix() if id_prefix is None else id_prefix)

    def parse(self, text: str, id_prefix: str | None = None) -> tuple[str, list[ToolCall]]:
        """The content (``text`` without its calls) and the calls of a whole output."""
        stream = self.stream(id_prefix)
        stream.feed(text)
        stream.finish()
        return stream.content, stream.calls


def new_id_prefix() -> str:
    return f"call_{secrets.token_hex(8)}_"


def _plain_name(name: str) -> str | None:
    name = name.strip()
    return name if name and not any(c.isspace() for c in name) else None


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    markers = Markers(
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "```json",
        "```",
        others=("<｜tool▁sep｜>",),
    )
    separator = "\n"
    SEP = markers.others[0]

    def call_header(self, header: str, index: int, id_prefix: str) -> tuple[str, str] | None:
        kind, sep, name = header.partition(self.SEP)
        plain = _plain_name(name) if sep and kind.strip() == "function" else None
        return None if plain is None else (f"{id_prefix}{index}", plain)

    def grammar_call(self, name: str, args: str, lit: Callable[[str], str]) -> str:
        m = self.markers
        opening, closing = name + "\n" + m.args_begin + "\n", "\n" + m.fence  # the fenced JSON block
        head = f"{lit(m.call_begin)} {lit('function')} {lit(self.SEP)} {lit(opening)}"
        return f"{head} {args} {lit(closing)} {lit(m.call_end)}"


class DeepSeekV31ToolParser(ToolParser):
    name = "deepseek_v31"
    markers = Markers(
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
    )

    def call_header(self, header: str, index: int, id_prefix: str) -> tuple[str, str] | None:
        plain = _plain_name(header)
        return None if plain is None else (f"{id_prefix}{index}", plain)

    def grammar_call(self, name: str, args: str, lit: Callable[[str], str]) -> str:
        m = self.markers
        return f"{lit(m.call_begin)} {lit(name)} {lit(m.args_begin)} {args} {lit(m.call_end)}"


class KimiK2ToolParser(ToolParser):
    name = "kimi_k2"
    markers = Markers(
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_end|>",
        "<|tool_call_argument_begin|>",
    )

    def call_header(self, header: str, index: int, id_prefix: str) -> tuple[str, str] | None:
        call_id = header.strip()
        head, colon, idx = call_id.rpartition(":")
        name = head if colon and idx.isdigit() else call_id
        plain = _plain_name(name.removeprefix("functions."))
        return None if plain is None else (call_id, plain)

    def grammar_call(self, name: str, args: str, lit: Callable[[str], str]) -> str:
        m = self.markers
        head = f"{lit(m.call_begin)} {lit('functions.' + name + ':')} /[0-9]+/ {lit(m.args_begin)}"
        return f"{head} {args} {lit(m.call_end)}"


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (DeepSeekV3ToolParser, DeepSeekV31ToolParser, KimiK2ToolParser)
}


def make_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}: expected one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The format a chat template writes tool calls in, from the markers it mentions (None: no known one).
    DeepSeek's templates with the fenced ```json form are ``deepseek_v3``, those without ``deepseek_v31``."""
    template = chat_template or ""
    if KimiK2ToolParser.markers.section_begin in template:
        return KimiK2ToolParser.name
    if DeepSeekV3ToolParser.markers.section_begin in template:
        fenced = DeepSeekV3ToolParser.markers.args_begin in template
        return DeepSeekV3ToolParser.name if fenced else DeepSeekV31ToolParser.name
    return None


class ToolCallStream(MarkerStream):
    """Turns one request's output deltas into OpenAI deltas: ``{"content": ...}`` for text, and per call
    ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name"}}]}`` once its header is
    complete, then ``{"tool_calls": [{"index", "function": {"arguments": piece}}]}``. Text that may be part
    of a marker (or arguments' trailing whitespace and fence) is held back until it is known not to be.
    The deltas of all ``feed`` calls and ``finish`` add up to ``content`` and ``calls``."""

    def __init__(self, parser: ToolParser, id_prefix: str) -> None:
        super().__init__()
        self._parser, self._m, self._id_prefix = parser, parser.markers, id_prefix
        self._state = "content"  # content | section | header | args | broken
        self._gap = ""  # whitespace between calls, dropped unless more than whitespace follows
        self._gap_live = False
        self._raw = ""  # a malformed call's text so far
        self._lead = True  # the current call's arguments have not started (leading whitespace is dropped)
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # id, name, argument pieces

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def calls(self) -> list[ToolCall]:
        return [ToolCall(i, n, "".join(a)) for i, n, a in self._calls]

    def _step(self, final: bool) -> bool:
        """Consumes what it can of the buffer; True if the state changed (step again)."""
        m, buf = self._m, self._buf
        if self._state == "content":
            i, _ = first_marker(buf, (m.section_begin,))
            if i >= 0:
                self._emit_content(buf[:i])
                return self._goto("section", buf[i + len(m.section_begin) :])
            keep = 0 if final else partial_marker_len(buf, (m.section_begin,))
            self._emit_content(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
        elif self._state == "section":
            i, marker = first_marker(buf, (m.call_begin, m.section_end))
            if i >= 0:
                self._gap_text(buf[:i])
                self._gap, self._gap_live = "", False
                return self._goto("header" if marker == m.call_begin else "content", buf[i + len(marker) :])
            keep = 0 if final else partial_marker_len(buf, (m.call_begin, m.section_end))
            self._gap_text(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
        elif self._state == "header":
            i, marker = first_marker(buf, (m.args_begin, m.call_end, m.section_end))
            if marker == m.args_begin:
                call = self._parser.call_header(buf[:i], len(self._calls), self._id_prefix)
                if call is not None:
                    self._start_call(*call)
                    return self._goto("args", buf[i + len(marker) :])
                self._raw = m.call_begin + buf[: i + len(marker)]
                return self._goto("broken", buf[i + len(marker) :])
            if i >= 0:
                self._raw = m.call_begin
                return self._goto("broken", buf)
            if final:
                self._emit_content(m.call_begin + buf)
                self._buf = ""
        elif self._state == "args":
            i, marker = first_marker(buf, (m.call_end, m.section_end))
            if i >= 0:
                self._emit_args(buf[:i], last=True)
                return self._goto("section" if marker == m.call_end else "content", buf[i + len(marker) :])
            keep = 0 if final else closing_tail_len(buf, (m.call_end, m.section_end), m.fence)
            self._emit_args(buf[: len(buf) - keep], last=final)
            self._buf = buf[len(buf) - keep :]
        else:  # broken: a malformed call, content up to its end
            i, marker = first_marker(buf, (m.call_end, m.section_end))
            if i >= 0:
                closing = marker if marker == m.call_end else ""
                self._emit_content(self._raw + buf[:i] + closing)
                return self._goto("section" if closing else "content", buf[i + len(marker) :])
            if final:
                self._emit_content(self._raw + buf)
                self._buf = ""
        return False

    def _goto(self, state: str, rest: str) -> bool:
        self._state, self._buf = state, rest
        return True

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._push({"content": text})

    def _gap_text(self, text: str) -> None:
        if self._gap_live:
            self._emit_content(text)
            return
        self._gap += text
        if self._gap.strip():
            self._emit_content(self._gap)
            self._gap, self._gap_live = "", True

    def _start_call(self, call_id: str, name: str) -> None:
        index = len(self._calls)
        self._calls.append((call_id, name, []))
        self._lead = True
        self._push(
            {"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": {"name": name}}]}
        )

    def _emit_args(self, text: str, last: bool) -> None:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        if last:
            text = text.rstrip()
            if self._m.fence and text.endswith(self._m.fence):
                text = text[: -len(self._m.fence)].rstrip()
        if text:
            index = len(self._calls) - 1
            self._calls[index][2].append(text)
            self._push({"tool_calls": [{"index": index, "function": {"arguments": text}}]})

    def _push(self, delta: Delta) -> None:
        """Appends ``delta``, merged into the last one when both are content or argument pieces of a call."""
        last = self._out[-1] if self._out else None
        if last is not None and "content" in delta and "content" in last:
            last["content"] += delta["content"]
            return
        if last is not None and "tool_calls" in delta and "tool_calls" in last:
            new, old = delta["tool_calls"][0], last["tool_calls"][0]
            if "id" not in new and new["index"] == old["index"] and "arguments" in old["function"]:
                old["function"]["arguments"] += new["function"]["arguments"]
                return
        self._out.append(delta)
