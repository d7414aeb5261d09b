"""Tool calls: parsing them out of model output (whole or streamed), checking a request's ``tools`` and
``tool_choice``, and the grammar that makes the model call one.

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

import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

from pd.proxy.markers import closing_tail_len, first_marker, partial_marker_len

Delta = dict[str, Any]  # an OpenAI chat.completion.chunk ``delta``: {"content": ...} or {"tool_calls": [...]}

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


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


def assistant_message(content: str, calls: list[ToolCall]) -> dict[str, Any]:
    """``choices[].message`` of a response: content is null when the model only called tools."""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message


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


class ToolCallStream:
    """Turns one request's output deltas into OpenAI deltas: ``{"content": ...}`` for text, and per call
    ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name"}}]}`` once its header is
    complete, then ``{"tool_calls": [{"index", "function": {"arguments": piece}}]}``. Text that may be part
    of a marker (or arguments' trailing whitespace and fence) is held back until it is known not to be.
    The deltas of all ``feed`` calls and ``finish`` add up to ``content`` and ``calls``."""

    def __init__(self, parser: ToolParser, id_prefix: str) -> None:
        self._parser, self._m, self._id_prefix = parser, parser.markers, id_prefix
        self._state = "content"  # content | section | header | args | broken
        self._buf = ""  # received, not yet consumed
        self._gap = ""  # whitespace between calls, dropped unless more than whitespace follows
        self._gap_live = False
        self._raw = ""  # a malformed call's text so far
        self._lead = True  # the current call's arguments have not started (leading whitespace is dropped)
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # id, name, argument pieces
        self._out: list[Delta] = []

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def calls(self) -> list[ToolCall]:
        return [ToolCall(i, n, "".join(a)) for i, n, a in self._calls]

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[Delta]:
        """The deltas still held back, at the end of the output."""
        while self._step(final=True):
            pass
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

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


# ------------------------------------------------------------------------------ request validation


class ToolRequestError(ValueError):
    """A bad ``tools`` or ``tool_choice`` value; ``param`` names the field (for the error body)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    """What the request asks: ``mode`` none | auto | required; ``name`` set when one function is forced
    (mode required)."""

    mode: str
    name: str | None = None


_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


def validate_tools(tools: Any, tool_choice: Any) -> tuple[list[dict[str, Any]], ToolChoice]:
    """Checks ``tools`` (null or a list of ``{"type": "function", "function": {name, description?,
    parameters?, strict?}}``) and ``tool_choice`` (null, "none", "auto", "required" or ``{"type":
    "function", "function": {"name": ...}}``). Returns the tools and the choice; a null choice is "auto"
    with tools and "none" without. Raises ToolRequestError naming the field."""
    tools = [] if tools is None else tools
    if not isinstance(tools, list):
        raise ToolRequestError(f"'tools' must be an array, got {type(tools).__name__}", "tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _check_keys(tool, _TOOL_KEYS, where)
        if tool.get("type") != "function":
            raise ToolRequestError(f"'{where}.type' must be \"function\", got {tool.get('type')!r}", where)
        function = tool.get("function")
        _check_keys(function, _FUNCTION_KEYS, f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolRequestError(
                f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}", where
            )
        if name in names:
            raise ToolRequestError(f"'{where}.function.name': function {name!r} is defined twice", where)
        names.append(name)
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            value = function.get(key)
            if value is not None and not isinstance(value, kind):
                raise ToolRequestError(f"'{where}.function.{key}' must be of type {_JSON[kind]}", where)
    return tools, _tool_choice(tool_choice, names)


_JSON = {str: "string", dict: "object", bool: "boolean"}


def _check_keys(obj: Any, allowed: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ToolRequestError(f"'{where}' must be an object, got {type(obj).__name__}", where)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ToolRequestError(f"unknown field '{where}.{unknown[0]}'", where)


def _tool_choice(choice: Any, names: list[str]) -> ToolChoice:
    if choice is None or (choice == "auto" and not names):
        return ToolChoice("auto" if names else "none")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise ToolRequestError("'tool_choice' is \"required\" but 'tools' is empty", "tool_choice")
        return ToolChoice(choice)
    named = (
        isinstance(choice, dict)
        and set(choice) == {"type", "function"}
        and choice["type"] == "function"
        and isinstance(choice["function"], dict)
        and set(choice["function"]) == {"name"}
        and isinstance(choice["function"]["name"], str)
    )
    if not named:
        raise ToolRequestError(
            '\'tool_choice\' must be "none", "auto", "required" or '
            f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r:.100}',
            "tool_choice",
        )
    name = choice["function"]["name"]
    if name not in names:
        raise ToolRequestError(f"'tool_choice' names function {name!r} that is not in 'tools'", "tool_choice")
    return ToolChoice("required", name)


# ------------------------------------------------------------------------------ forcing a call


def tool_call_grammar(
    parser: ToolParser,
    tools: list[dict[str, Any]],
    name: str | None = None,
    parallel: bool = True,
    token_markers: Collection[str] = (),
) -> str:
    """A Lark grammar (llguidance's dialect) for output that is only a tool-calls section: one call to
    ``name`` if given, else one (``parallel=False``) or more calls to any of ``tools`` (validated by
    ``validate_tools``), each call's arguments held to its function's ``parameters`` JSON schema (any
    object if it has none). For ``tool_choice`` "required" or a named function.

    ``token_markers``: the markers that are single tokens of the model's vocabulary (its added tokens,
    e.g. ``[m for m in parser.markers.all() if tokenizer.token_to_id(m) is not None]``). llguidance
    matches an added token only by its special-token syntax, which for a token spelled ``<...>`` (all
    markers that are tokens are) is its text, bare; other strings are Lark string literals, matched as
    text."""

    def lit(text: str) -> str:
        return text if text in token_markers else json.dumps(text, ensure_ascii=False)

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise ValueError(f"no function to call: {name!r} is not in tools" if name else "no tools to call")
    m = parser.markers
    more = ""  # further calls
    if parallel and name is None:
        more = f"({lit(parser.separator)} call)*" if parser.separator else "call*"
    lines = [
        "%llguidance {}",
        f"start: {lit(m.section_begin)} call {more} {lit(m.section_end)}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(functions))),
    ]
    for i, function in enumerate(functions):
        schema = function.get("parameters") or {"type": "object"}
        lines.append(f"call_{i}: {parser.grammar_call(function['name'], f'args_{i}', lit)}")
        lines.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
